"""The backend part of a NodeReport (fields 80-99, issue 16) — pure: the BackendServices the node runs, its
active health checks' state and the interval's counter deltas in, `BackendServiceHealth` entries out,
bounded like the control plane bounds them (control_plane/fleet/aggregate.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from mtlsgate.v1 import reports_pb2

FAILURES = "mtlsgate_backend_endpoint_failures_total"
EJECTIONS = "mtlsgate_backend_ejections_total"
MAX_ENDPOINTS_PER_SERVICE = 100  # the BackendService bound (write validation)
MAX_ENDPOINT_ENTRIES = 1_000  # per report
MAX_STRING = 1_024


def backend_health(services: Mapping[str, Any], checks: Iterable[Mapping[str, Any]],
                   counts: Mapping[tuple[str, tuple[str, ...]], int]) -> list[reports_pb2.BackendServiceHealth]:
    """`services`: BackendService messages by name (the node's configuration); `checks`: the health checker's
    rows (`backend_service`, `endpoint`, `healthy`, `last_error`, `last_check`); `counts`: the interval's
    counter deltas keyed (metric, labels). Services in name order, endpoints as configured; entries past the
    bounds are left out (the control plane would refuse the report)."""
    by_key = {(c["backend_service"], c["endpoint"]): c for c in checks}
    out = []
    entries = 0
    for name in sorted(services):
        if entries >= MAX_ENDPOINT_ENTRIES:
            break
        health = reports_pb2.BackendServiceHealth(backend_service=name[:MAX_STRING])
        for endpoint in list(services[name].endpoints)[:min(MAX_ENDPOINTS_PER_SERVICE, MAX_ENDPOINT_ENTRIES - entries)]:
            address = endpoint.address
            check = by_key.get((name, address))
            entry = health.endpoints.add(
                address=address[:MAX_STRING], checked=check is not None,
                healthy=bool(check["healthy"]) if check is not None else True,
                last_error=(check.get("last_error") or "")[:MAX_STRING] if check is not None else "",
                failures=counts.get((FAILURES, (name, address)), 0),
                ejections=counts.get((EJECTIONS, (name, address)), 0))
            if check is not None and check.get("last_check"):
                stamp = Timestamp()
                stamp.FromNanoseconds(int(check["last_check"] * 1e9))
                entry.last_check.CopyFrom(stamp)
            entries += 1
        out.append(health)
    return out
