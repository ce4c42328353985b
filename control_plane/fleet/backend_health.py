"""Backend endpoint health across the fleet (issue 16), pure: each node's latest report's BackendService
entries (fields 80-99), optionally for one service. The BackendHealthService servicer calls it with what
the store returned; `mtlsgate status --backends` prints it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mtlsgate.v1 import reports_pb2

from control_plane.fleet.aggregate import StoredReport


@dataclass
class NodeBackends:
    node_id: str
    received_at: float
    services: list[reports_pb2.BackendServiceHealth] = field(default_factory=list)


def latest_backend_health(stored: Iterable[StoredReport], *, backend_service: str = "") -> list[NodeBackends]:
    """Per node, what its newest report says of its backend services (nodes whose newest report names none
    — or not `backend_service` — are left out), by node id."""
    latest: dict[str, StoredReport] = {}
    for s in stored:
        kept = latest.get(s.node_id)
        if kept is None or s.received_at >= kept.received_at:
            latest[s.node_id] = s
    out = []
    for node_id in sorted(latest):
        s = latest[node_id]
        services = [b for b in s.report.backend_services if not backend_service or b.backend_service == backend_service]
        if services:
            out.append(NodeBackends(node_id, s.received_at, services))
    return out
