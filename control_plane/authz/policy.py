"""What each role may do, and the decision for one call: `allowed(identity, method, …) → Decision`.

Every RPC is classified by `access_for(method)`; anything not classified needs `admin`, so a service added
later is closed until someone decides otherwise. Health and reflection are open; ADS is admitted by the
ADS servicer (Node registration), not by a role."""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from enum import Enum

from control_plane.authz.bindings import Bindings, Role
from control_plane.authz.identity import Identity


class Access(Enum):
    OPEN = "open"  # health, reflection
    XDS = "xds"  # ADS (and, later, the node report stream): admission decides
    READ = "read"  # get, list, status, audit
    CHECK = "check"  # dry-run validation
    WRITE = "write"  # create, update, delete
    ADMIN = "admin"  # anything not classified


_GRANTS: dict[Role, frozenset[Access]] = {
    Role.ADMIN: frozenset({Access.READ, Access.CHECK, Access.WRITE, Access.ADMIN}),
    Role.EDITOR: frozenset({Access.READ, Access.CHECK, Access.WRITE}),
    Role.VIEWER: frozenset({Access.READ, Access.CHECK}),
    Role.NODE: frozenset(),
}
_NEEDED = {Access.READ: Role.VIEWER, Access.CHECK: Role.VIEWER, Access.WRITE: Role.EDITOR,
           Access.ADMIN: Role.ADMIN}

_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                  "/grpc.reflection.v1.ServerReflection/")
_XDS_SERVICES = ("/envoy.service.discovery.v3.", "/mtlsgate.v1.NodeReportService/")
_RESOURCE_SERVICES = ("TrustConfigService", "ServerTlsPolicyService", "CertificateService",
                      "ListenerService", "NodeService", "RolloutPolicyService", "BackendServiceService",
                      "BackendAuthenticationConfigService")


def access_for(method: str) -> Access:
    """`/package.Service/Method` → what kind of access it needs."""
    if method.startswith(_OPEN_SERVICES):
        return Access.OPEN
    if method.startswith(_XDS_SERVICES):
        return Access.XDS
    service, _, name = method.strip("/").rpartition("/")
    package, _, short = service.rpartition(".")
    if package != "mtlsgate.v1":
        return Access.ADMIN
    if short in _RESOURCE_SERVICES:
        if name.startswith(("Get", "List")):
            return Access.READ
        if name.startswith(("Create", "Update", "Delete")):
            return Access.WRITE
        return Access.ADMIN
    if short in ("FleetService", "AuditService", "ClientService", "RevocationService", "BackendHealthService"):
        return Access.READ
    if short == "RolloutService":  # starting and steering a roll-out changes what nodes serve
        return Access.READ if name.startswith(("Get", "List")) else Access.WRITE
    if short == "ShadowService":  # storing, promoting and discarding candidates are writes (SPEC §12)
        return Access.READ if name.startswith(("Get", "List")) else Access.WRITE
    if short == "CheckService":
        return Access.CHECK
    return Access.ADMIN


def role_of(identity: Identity, bindings: Bindings | None, node_identities: Set[str], *,
            insecure: bool = False) -> Role | None:
    """The caller's role. A registered Node's identity is always `node` (it can never hold an API role);
    without `--authz` every other authenticated identity (and, under `--insecure`, everyone) is admin."""
    if identity.name in node_identities:
        return Role.NODE
    if bindings is not None:
        return bindings.role_for(identity.name)
    if identity.authenticated or insecure:
        return Role.ADMIN
    return None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    role: Role | None  # the caller's role (None = unbound)
    needed: Role | None = None  # the least role that would allow the call
    reason: str = ""  # for PERMISSION_DENIED: names the identity and the role needed


def allowed(identity: Identity, method: str, role: Role | None) -> Decision:
    access = access_for(method)
    if access in (Access.OPEN, Access.XDS):
        return Decision(True, role)
    if role is not None and access in _GRANTS[role]:
        return Decision(True, role)
    needed = _NEEDED[access]
    call = method.strip("/")
    if role is None:
        reason = f"{identity.name} has no role (not bound in the --authz file); {call} needs role {needed.value}"
    elif role is Role.NODE:
        reason = (f"{identity.name} is a node identity: nodes may only use xDS, never the management API "
                  f"({call} needs role {needed.value})")
    else:
        reason = f"{identity.name} has role {role.value}; {call} needs role {needed.value}"
    return Decision(False, role, needed, reason)
