"""Cross-resource rules, checked atomically inside each store write: references must resolve, a
REJECT_INVALID policy needs a non-empty TrustConfig, a referenced resource cannot be deleted, no node may be
given two listeners on one port, and no listener may forward (directly or through a BackendService's
endpoints on loopback) into a cycle of listeners on the same node.
Pure functions of (store state, the write)."""

from __future__ import annotations

from google.protobuf.message import Message
from mtlsgate.v1 import backends_pb2, resources_pb2

from control_plane.api.errors import InvalidResource, ReferenceConflict
from control_plane.resource_names import KINDS, SHADOW_COLLECTIONS, references
from control_plane.store.base import StoreState
from data_plane.validation.resources import FieldViolation, trust_config_is_empty

_REJECT_INVALID = resources_pb2.MTLSPolicy.ClientValidationMode.REJECT_INVALID


def referrers(state: StoreState, name: str) -> list[tuple[str, str]]:
    """(resource name, field) of every stored resource that references `name`, shadow candidates included
    (a candidate ServerTlsPolicy is judged with the trust config it names, and may be promoted)."""
    found = []
    for collection in (*(kind.collection for kind in KINDS), *SHADOW_COLLECTIONS.values()):
        for other_name, other in state.collection(collection).items():
            for ref in references(other):
                if ref.target == name:
                    found.append((other_name, ref.field))
    return found


def _shadow_of(name: str) -> str:
    collection, _, resource_id = name.partition("/")
    shadow = SHADOW_COLLECTIONS.get(collection)
    return f"{shadow}/{resource_id}" if shadow else ""


def _rejecting_policy_violation(policy: resources_pb2.ServerTlsPolicy, trust_config: Message) -> bool:
    return (policy.HasField("mtls_policy") and policy.mtls_policy.client_validation_mode == _REJECT_INVALID
            and trust_config_is_empty(trust_config))  # type: ignore[arg-type]


def selectors_overlap(a: dict[str, str] | object, b: dict[str, str] | object) -> bool:
    """Could one node match both node selectors? Yes unless some label is required with two values."""
    first, second = dict(a), dict(b)  # type: ignore[call-overload]
    return all(second.get(key, value) == value for key, value in first.items())


def check_write(state: StoreState, name: str, new: Message | None) -> None:
    """Raise ReferenceConflict / InvalidResource if writing `new` (None = deleting `name`) onto `state`
    would break a cross-resource rule."""
    if new is None:
        candidate = _shadow_of(name)
        if candidate and candidate in state.collection(candidate.partition("/")[0]):
            raise ReferenceConflict([FieldViolation("name", f"{name} has a shadow candidate; promote or discard "
                                                    f"it first (mtlsgate shadow discard {name})")])
        users = referrers(state, name)
        if users:
            listed = ", ".join(f"{n} ({field})" for n, field in users)
            raise ReferenceConflict([FieldViolation("name", f"{name} is still referenced by {listed}; "
                                                    "change or delete those first")])
        return
    missing = [FieldViolation(ref.field, f"{ref.target} does not exist")
               for ref in references(new) if ref.target not in state.collection(ref.kind.collection)]
    if missing:
        raise ReferenceConflict(missing)
    if isinstance(new, resources_pb2.ServerTlsPolicy) and new.HasField("mtls_policy"):
        tc_name = new.mtls_policy.client_validation_trust_config
        tc = state.trust_configs.get(tc_name) if tc_name else None
        if tc is not None and _rejecting_policy_violation(new, tc):
            raise InvalidResource([FieldViolation(
                "mtlsPolicy.clientValidationTrustConfig",
                f"{tc_name} has no trust anchor and no allowlisted certificate: REJECT_INVALID would refuse "
                "every client")])
    if isinstance(new, resources_pb2.TrustConfig) and trust_config_is_empty(new):
        policies = [p_name for p_name, p in state.server_tls_policies.items()
                 if p.mtls_policy.client_validation_trust_config == name and _rejecting_policy_violation(p, new)]
        if policies:
            raise ReferenceConflict([FieldViolation(
                "trustStores", f"would leave {name} empty, but REJECT_INVALID policies use it: {', '.join(policies)}")])
    if isinstance(new, resources_pb2.Node):
        owners = [other_name for other_name, other in state.nodes.items()
                  if other_name != name and other.identity == new.identity]
        if owners:
            raise ReferenceConflict([FieldViolation(
                "identity", f"{new.identity} is already the identity of {owners[0]}: one certificate identity "
                "is one node")])
    if isinstance(new, resources_pb2.Listener | backends_pb2.BackendService):
        cycle = forwarding_cycle(state, name, new)
        if cycle:
            raise ReferenceConflict([FieldViolation(cycle[0], cycle[1])])
    if isinstance(new, resources_pb2.Listener):
        _check_routes(state, new)
        clashes = [other_name for other_name, other in state.listeners.items()
                   if other_name != name and other.port == new.port
                   and selectors_overlap(other.node_selector, new.node_selector)]
        if clashes:
            raise ReferenceConflict([FieldViolation(
                "port", f"port {new.port} is already used by {', '.join(sorted(clashes))} on nodes this "
                "listener's nodeSelector also selects; use another port or disjoint nodeSelectors")])


def _check_routes(state: StoreState, listener: resources_pb2.Listener) -> None:
    """A route that requires a verified client certificate needs a listener that asks for one."""
    required = [i for i, route in enumerate(listener.routes) if route.client_certificate == backends_pb2.Route.REQUIRED]
    if not required:
        return
    policy = state.server_tls_policies.get(listener.server_tls_policy) if listener.server_tls_policy else None
    if policy is None or not policy.HasField("mtls_policy"):
        raise InvalidResource([FieldViolation(
            f"routes[{required[0]}].clientCertificate",
            "REQUIRED needs a serverTlsPolicy with an mtlsPolicy on this listener (without one no client "
            "certificate is asked for, so every request would be refused)")])


_LOOPBACK_HOSTS = frozenset({"localhost", "0.0.0.0", "::1", "::", "[::1]", "[::]"})


def _loopback_port(address: str) -> int | None:
    """The port of a HOST:PORT that names this very machine (loopback or any-address), else None."""
    host, _, port = address.rpartition(":")
    host = host.lower()
    if not port.isdigit() or not (host in _LOOPBACK_HOSTS or host.startswith("127.")):
        return None
    return int(port)


def forwarding_cycle(state: StoreState, name: str, new: Message) -> tuple[str, str] | None:
    """(field, problem) when, with `new` written, some listeners would forward requests round in a circle
    on one node: a backend or BackendService endpoint on loopback at the port of a listener that the same
    node may run, and so on back to the first. Such a request would loop until every connection is used."""
    listeners = {n: lst for n, lst in state.listeners.items() if n != name}
    services = {n: bs for n, bs in state.backend_services.items() if n != name}
    if isinstance(new, resources_pb2.Listener):
        listeners[name] = new  # type: ignore[assignment]
    elif isinstance(new, backends_pb2.BackendService):
        services[name] = new  # type: ignore[assignment]

    def targets(lst: resources_pb2.Listener) -> list[tuple[str, str]]:
        """(what forwards there, loopback address) of every place `lst` sends requests."""
        out = [("backend", lst.backend)] if lst.backend else []
        refs = [(f"routes[{i}]", r.backend, r.backend_service) for i, r in enumerate(lst.routes)]
        refs.append(("defaultBackendService", "", lst.default_backend_service))
        for where, backend, service_name in refs:
            if backend:
                out.append((f"{where}.backend", backend))
            service = services.get(service_name) if service_name else None
            if service is not None:
                out += [(f"{service_name} endpoint", e.address) for e in service.endpoints]
        return out

    edges: dict[str, list[tuple[str, str, str]]] = {}
    for a_name, a in listeners.items():
        for why, address in targets(a):
            port = _loopback_port(address)
            if port is None:
                continue
            for b_name, b in listeners.items():
                if b.port == port and selectors_overlap(a.node_selector, b.node_selector):
                    edges.setdefault(a_name, []).append((b_name, why, address))
    # Depth-first search for a cycle through the written resource's listeners (any cycle a write creates
    # passes through a listener it changed or one that uses the service it changed).
    involved = [n for n, lst in listeners.items() if n == name or name in (
        lst.default_backend_service, *(r.backend_service for r in lst.routes))]
    for start in sorted(involved):
        path = _cycle_from(start, edges)
        if path:
            hops = " -> ".join([start, *(f"{n} (via {why} {address})" for n, why, address in path)])
            field = "endpoints" if isinstance(new, backends_pb2.BackendService) else "backend"
            return field, (f"would make a forwarding loop on one node: {hops}; a request would go round until "
                           "every connection is used")
    return None


def _cycle_from(start: str, edges: dict[str, list[tuple[str, str, str]]]) -> list[tuple[str, str, str]]:
    """The hops (listener, via what, address) of a path from `start` back to itself, or []."""
    path: list[tuple[str, str, str]] = []
    seen: set[str] = set()

    def visit(node: str) -> bool:
        if node in seen:
            return False
        seen.add(node)
        for nxt, why, address in edges.get(node, ()):
            path.append((nxt, why, address))
            if nxt == start or visit(nxt):
                return True
            path.pop()
        return False

    return path if visit(start) else []
