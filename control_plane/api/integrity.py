"""Cross-resource rules, checked atomically inside each store write: references must resolve, a
REJECT_INVALID policy needs a non-empty TrustConfig, a referenced resource cannot be deleted, and no
node may be given two listeners on one port.
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
    """(resource name, field) of every stored resource that references `name`."""
    found = []
    for kind in KINDS:
        for other_name, other in state.collection(kind.collection).items():
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
    pending = [f"routes[{i}].backendService" for i, route in enumerate(listener.routes) if route.backend_service]
    pending += ["defaultBackendService"] if listener.default_backend_service else []
    if pending:
        raise InvalidResource([FieldViolation(field, "BackendService resources are not served by this control "
                                              "plane yet; use backend (HOST:PORT)") for field in pending])
    required = [i for i, route in enumerate(listener.routes) if route.client_certificate == backends_pb2.Route.REQUIRED]
    if not required:
        return
    policy = state.server_tls_policies.get(listener.server_tls_policy) if listener.server_tls_policy else None
    if policy is None or not policy.HasField("mtls_policy"):
        raise InvalidResource([FieldViolation(
            f"routes[{required[0]}].clientCertificate",
            "REQUIRED needs a serverTlsPolicy with an mtlsPolicy on this listener (without one no client "
            "certificate is asked for, so every request would be refused)")])
