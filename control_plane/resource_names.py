"""Resource kinds and names: the table of the kinds and the normalisation of names such as
`projects/P/locations/global/trustConfigs/ID` to the canonical `trustConfigs/ID` (SPEC §2)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.message import Message
from mtlsgate.v1 import backends_pb2, resources_pb2, rollouts_pb2

ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
# Full GCP names: projects/P/locations/L/<collection>/ID (L is `global` for everything we model).
_GCP_PREFIX = re.compile(r"projects/[^/]+/locations/[^/]+/")


@dataclass(frozen=True)
class Kind:
    """One resource kind: its manifest `kind:`, collection (name prefix), message type and CLI spellings."""

    kind: str  # manifest `kind:` value, e.g. "TrustConfig"
    collection: str  # name prefix, e.g. "trustConfigs"
    message: type[Message]
    cli_plural: str  # `mtlsgate get trust-configs`
    cli_singular: str  # `mtlsgate import trust-config`
    field: str  # snake_case request field holding the resource, e.g. "trust_config"
    list_field: str  # response field of List, e.g. "trust_configs"
    method_suffix: str  # RPC names: Create<suffix>, Get<suffix>, List<plural_suffix> …
    plural_suffix: str

    def name(self, resource_id: str) -> str:
        return f"{self.collection}/{resource_id}"

    @property
    def json_field(self) -> str:
        """The request field as error paths spell it: `trustConfig`, `serverTlsPolicy`, …"""
        head, *rest = self.field.split("_")
        return head + "".join(part.title() for part in rest)


TRUST_CONFIG = Kind("TrustConfig", "trustConfigs", resources_pb2.TrustConfig, "trust-configs", "trust-config",
                    "trust_config", "trust_configs", "TrustConfig", "TrustConfigs")
CERTIFICATE = Kind("Certificate", "certificates", resources_pb2.Certificate, "certificates", "certificate",
                   "certificate", "certificates", "Certificate", "Certificates")
SERVER_TLS_POLICY = Kind("ServerTlsPolicy", "serverTlsPolicies", resources_pb2.ServerTlsPolicy,
                         "server-tls-policies", "server-tls-policy", "server_tls_policy", "server_tls_policies",
                         "ServerTlsPolicy", "ServerTlsPolicies")
LISTENER = Kind("Listener", "listeners", resources_pb2.Listener, "listeners", "listener",
                "listener", "listeners", "Listener", "Listeners")
BACKEND_AUTHENTICATION_CONFIG = Kind(
    "BackendAuthenticationConfig", "backendAuthenticationConfigs", backends_pb2.BackendAuthenticationConfig,
    "backend-authentication-configs", "backend-authentication-config", "backend_authentication_config",
    "backend_authentication_configs", "BackendAuthenticationConfig", "BackendAuthenticationConfigs")
BACKEND_SERVICE = Kind("BackendService", "backendServices", backends_pb2.BackendService, "backend-services",
                       "backend-service", "backend_service", "backend_services", "BackendService",
                       "BackendServices")
NODE = Kind("Node", "nodes", resources_pb2.Node, "nodes", "node", "node", "nodes", "Node", "Nodes")
ROLLOUT_POLICY = Kind("RolloutPolicy", "rolloutPolicies", rollouts_pb2.RolloutPolicy, "rollout-policies",
                      "rollout-policy", "rollout_policy", "rollout_policies", "RolloutPolicy", "RolloutPolicies")
# Roll-out runs are stored like resources (durable, replicated, audited) but written only by the control
# plane's roll-out driver: not a kind users apply, get or delete (`mtlsgate rollout …` shows them).
ROLLOUT = Kind("Rollout", "rollouts", rollouts_pb2.RolloutRun, "rollouts", "rollout", "rollout", "rollouts",
               "Rollout", "Rollouts")

# Shadow candidates (SPEC §12): a candidate TrustConfig or ServerTlsPolicy stored beside the active one of the
# same ID (`shadowTrustConfigs/ID` beside `trustConfigs/ID`), judged on nodes but never enforced. Written only
# through ShadowService (`mtlsgate apply --shadow`, `mtlsgate shadow …`): not kinds users apply, get or delete.
SHADOW_TRUST_CONFIG = Kind("ShadowTrustConfig", "shadowTrustConfigs", resources_pb2.TrustConfig,
                           "shadow-trust-configs", "shadow-trust-config", "trust_config", "trust_configs",
                           "ShadowTrustConfig", "ShadowTrustConfigs")
SHADOW_SERVER_TLS_POLICY = Kind("ShadowServerTlsPolicy", "shadowServerTlsPolicies", resources_pb2.ServerTlsPolicy,
                                "shadow-server-tls-policies", "shadow-server-tls-policy", "server_tls_policy",
                                "server_tls_policies", "ShadowServerTlsPolicy", "ShadowServerTlsPolicies")
# active collection → its candidates' collection, and back
SHADOW_COLLECTIONS = {"trustConfigs": "shadowTrustConfigs", "serverTlsPolicies": "shadowServerTlsPolicies"}
ACTIVE_COLLECTIONS = {v: k for k, v in SHADOW_COLLECTIONS.items()}

# Dependency order: a kind only references kinds before it, so `apply` writes in this order (and deletes
# in the reverse one).
KINDS: tuple[Kind, ...] = (TRUST_CONFIG, CERTIFICATE, SERVER_TLS_POLICY, ROLLOUT_POLICY,
                           BACKEND_AUTHENTICATION_CONFIG, BACKEND_SERVICE, LISTENER, NODE)
# Every collection the store holds.
STORED_KINDS: tuple[Kind, ...] = (*KINDS, ROLLOUT, SHADOW_TRUST_CONFIG, SHADOW_SERVER_TLS_POLICY)

_BY_COLLECTION = {k.collection: k for k in STORED_KINDS}
_BY_MESSAGE = {k.message.DESCRIPTOR.full_name: k for k in KINDS}
_BY_SPELLING: dict[str, Kind] = {}
for _k in KINDS:
    for _spelling in (_k.kind, _k.collection, _k.cli_plural, _k.cli_singular, _k.field, _k.list_field):
        _BY_SPELLING[_spelling.lower().replace("_", "-")] = _k
        _BY_SPELLING[_spelling.lower().replace("-", "").replace("_", "")] = _k


class InvalidName(ValueError):
    """A resource name or kind that cannot be understood; the message says why."""


def kind_for_message(message: Message) -> Kind:
    return _BY_MESSAGE[message.DESCRIPTOR.full_name]


def kind_for_collection(collection: str) -> Kind:
    try:
        return _BY_COLLECTION[collection]
    except KeyError:
        raise InvalidName(f"unknown resource collection {collection!r}") from None


def parse_kind(text: str) -> Kind:
    """A kind as users type it: `trust-configs`, `trust-config`, `TrustConfig`, `trustconfig`, …"""
    kind = _BY_SPELLING.get(text.lower()) or _BY_SPELLING.get(text.lower().replace("-", "").replace("_", ""))
    if kind is None:
        known = ", ".join(k.cli_plural for k in KINDS)
        raise InvalidName(f"unknown kind {text!r} (expected one of: {known})")
    return kind


def normalise_name(name: str, kind: Kind | None = None) -> str:
    """`projects/P/locations/global/trustConfigs/ID` or `trustConfigs/ID` → `trustConfigs/ID`.

    With `kind`, a bare `ID` is accepted too and the collection must be that kind's."""
    text = name.strip()
    text = _GCP_PREFIX.sub("", text, count=1) if text.startswith("projects/") else text
    parts = text.split("/")
    if len(parts) == 1 and kind is not None:
        parts = [kind.collection, parts[0]]
    if len(parts) != 2:
        expected = f"{kind.collection}/ID" if kind else "COLLECTION/ID"
        raise InvalidName(f"invalid resource name {name!r} (expected {expected})")
    collection, resource_id = parts
    found = kind_for_collection(collection)
    if kind is not None and found is not kind:
        raise InvalidName(f"{name!r} is not a {kind.kind} name (expected {kind.collection}/ID)")
    check_id(resource_id)
    return f"{collection}/{resource_id}"


def check_id(resource_id: str) -> None:
    if not ID_PATTERN.fullmatch(resource_id):
        raise InvalidName(
            f"invalid resource id {resource_id!r}: must match [a-z][a-z0-9-]{{0,62}} "
            "(lowercase letter first, then lowercase letters, digits or '-', at most 63 characters)"
        )


def split_name(name: str) -> tuple[Kind, str]:
    """A normalised name → (kind, id)."""
    collection, _, resource_id = name.partition("/")
    return kind_for_collection(collection), resource_id


# ---------------------------------------------------------------- references between resources


@dataclass(frozen=True)
class Reference:
    """`field` (camelCase path) of a resource names `target` (normalised) of kind `kind`."""

    field: str
    target: str
    kind: Kind


def references(message: Message) -> Iterator[Reference]:
    """The other resources `message` names. Names must already be normalised (see `normalise_references`)."""
    if isinstance(message, resources_pb2.ServerTlsPolicy):
        if message.HasField("mtls_policy") and message.mtls_policy.client_validation_trust_config:
            yield Reference("mtlsPolicy.clientValidationTrustConfig",
                            message.mtls_policy.client_validation_trust_config, TRUST_CONFIG)
    elif isinstance(message, resources_pb2.Listener):
        if message.certificate:
            yield Reference("certificate", message.certificate, CERTIFICATE)
        for i, name in enumerate(message.certificates):
            yield Reference(f"certificates[{i}]", name, CERTIFICATE)
        if message.server_tls_policy:
            yield Reference("serverTlsPolicy", message.server_tls_policy, SERVER_TLS_POLICY)
        if message.rollout_policy:
            yield Reference("rolloutPolicy", message.rollout_policy, ROLLOUT_POLICY)
        for i, route in enumerate(message.routes):
            if route.backend_service:
                yield Reference(f"routes[{i}].backendService", route.backend_service, BACKEND_SERVICE)
        if message.default_backend_service:
            yield Reference("defaultBackendService", message.default_backend_service, BACKEND_SERVICE)
    elif isinstance(message, backends_pb2.BackendService):
        if message.backend_authentication:
            yield Reference("backendAuthentication", message.backend_authentication, BACKEND_AUTHENTICATION_CONFIG)
    elif isinstance(message, backends_pb2.BackendAuthenticationConfig):
        if message.client_certificate:
            yield Reference("clientCertificate", message.client_certificate, CERTIFICATE)
        if message.trust_config:
            yield Reference("trustConfig", message.trust_config, TRUST_CONFIG)


def normalise_references(message: Message) -> list[tuple[str, str]]:
    """Rewrite reference fields of `message` in place to canonical names (bare IDs and full GCP names
    accepted). Returns (field path, problem) for each reference that is not a valid name."""
    problems: list[tuple[str, str]] = []

    def fix(holder: Message, attr: str, path: str, kind: Kind) -> None:
        value = getattr(holder, attr)
        if not value:
            return
        try:
            setattr(holder, attr, normalise_name(value, kind))
        except InvalidName as exc:
            problems.append((path, str(exc)))

    if isinstance(message, resources_pb2.ServerTlsPolicy) and message.HasField("mtls_policy"):
        fix(message.mtls_policy, "client_validation_trust_config", "mtlsPolicy.clientValidationTrustConfig",
            TRUST_CONFIG)
    elif isinstance(message, resources_pb2.Listener):
        fix(message, "certificate", "certificate", CERTIFICATE)
        for i, name in enumerate(message.certificates):
            try:
                message.certificates[i] = normalise_name(name, CERTIFICATE)
            except InvalidName as exc:
                problems.append((f"certificates[{i}]", str(exc)))
        fix(message, "server_tls_policy", "serverTlsPolicy", SERVER_TLS_POLICY)
        fix(message, "rollout_policy", "rolloutPolicy", ROLLOUT_POLICY)
        for i, route in enumerate(message.routes):
            fix(route, "backend_service", f"routes[{i}].backendService", BACKEND_SERVICE)
        fix(message, "default_backend_service", "defaultBackendService", BACKEND_SERVICE)
    elif isinstance(message, backends_pb2.BackendService):
        fix(message, "backend_authentication", "backendAuthentication", BACKEND_AUTHENTICATION_CONFIG)
    elif isinstance(message, backends_pb2.BackendAuthenticationConfig):
        fix(message, "client_certificate", "clientCertificate", CERTIFICATE)
        fix(message, "trust_config", "trustConfig", TRUST_CONFIG)
    return problems


def shadow_name(active_name: str) -> str:
    """`trustConfigs/ID` → `shadowTrustConfigs/ID` (the candidate's stored name)."""
    collection, _, resource_id = active_name.partition("/")
    return f"{SHADOW_COLLECTIONS[collection]}/{resource_id}"


def active_name(candidate_name: str) -> str:
    """`shadowTrustConfigs/ID` → `trustConfigs/ID`."""
    collection, _, resource_id = candidate_name.partition("/")
    return f"{ACTIVE_COLLECTIONS[collection]}/{resource_id}"
