"""The xDS type URLs mtlsgate distributes (SPEC §6) and which of them are subscribed by name. Shared by both
planes (the control plane serves them, nodes check them), so it lives beside the generated protos."""

from __future__ import annotations

_PREFIX = "type.googleapis.com/"

LISTENER = _PREFIX + "mtlsgate.v1.Listener"
TRUST_BUNDLE = _PREFIX + "mtlsgate.v1.TrustBundle"
SERVER_CERTIFICATE = _PREFIX + "mtlsgate.v1.ServerCertificate"
# SPEC §15: a BackendService with its BackendAuthenticationConfig resolved into it, by name (backendServices/ID),
# so an endpoint change pushes only that resource.
BACKEND_SERVICE = _PREFIX + "mtlsgate.v1.BackendService"

ALL_TYPES = (LISTENER, TRUST_BUNDLE, SERVER_CERTIFICATE, BACKEND_SERVICE)
# Listener is a wildcard subscription (full state every time); the others are requested by name, like SDS.
WILDCARD_TYPES = frozenset({LISTENER})


def short_type(type_url: str) -> str:
    """`type.googleapis.com/mtlsgate.v1.Listener` → `Listener` (metric labels, tables)."""
    return type_url.rsplit(".", 1)[-1]
