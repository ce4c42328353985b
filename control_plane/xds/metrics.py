"""Control-plane xDS metrics (SPEC §7), in prometheus-client's default registry, and their HTTP endpoint."""

from __future__ import annotations

import functools

from mtlsgate import resource_types as rt
from prometheus_client import Counter, Gauge, Histogram, start_http_server

CONNECTED_NODES = Gauge("mtlsgate_xds_connected_nodes", "Proxy nodes with an open xDS stream")
PUSHES = Counter("mtlsgate_xds_pushes_total", "DiscoveryResponses sent", ["type"])
REJECTS = Counter("mtlsgate_xds_rejects_total", "NACKs received (error_detail present)", ["type"])
STALE_NONCES = Counter("mtlsgate_xds_stale_requests_total", "Requests ignored for a stale nonce", ["type"])
CONVERGENCE = Histogram(
    "mtlsgate_xds_convergence_seconds", "Store write → node ACK of the version built from it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
REVOCATION_ENFORCEMENT = Histogram(
    "mtlsgate_revocation_enforcement_seconds",
    "Revoked serial published (API write or fetched CRL) → a node serving it ACKed and reported its live "
    "connections revalidated (SPEC §12, B6); one observation per revocation and node",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
SNAPSHOT_BUILDS = Counter("mtlsgate_xds_snapshot_builds_total", "Snapshot builds (one per debounced change)")
SNAPSHOT_REVISION = Gauge("mtlsgate_xds_snapshot_revision", "Store revision the current snapshots come from")


@functools.cache
def pushes(type_url: str) -> Counter:
    """PUSHES' child for a type (labels() costs a lock and a tuple per call; a push to 10,000 streams
    would pay it 10,000 times)."""
    return PUSHES.labels(rt.short_type(type_url))


def serve_metrics(address: str) -> None:
    """Serve /metrics on HOST:PORT in a daemon thread (`mtlsgate control-plane --metrics`)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("expected HOST:PORT")
    start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
