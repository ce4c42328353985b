"""`mtlsgate status --backends`: each node's view of its BackendService endpoints (issue 16), from the
nodes' latest reports — active health-check state, the last check's error, and the failures and
ejections of the last report interval."""

from __future__ import annotations

import argparse
import json
from typing import Any

from control_plane.cli.client import rpc_error


def node_to_json(node: Any) -> dict[str, Any]:
    return {
        "node": node.node_id,
        "reportTime": node.report_time.ToJsonString(),
        "ageSeconds": round(node.age_seconds, 1),
        "backendServices": [{
            "name": service.backend_service,
            "endpoints": [{
                "address": e.address, "checked": e.checked, "healthy": e.healthy, "lastError": e.last_error,
                "failures": e.failures, "ejections": e.ejections,
                "lastCheck": e.last_check.ToJsonString() if e.HasField("last_check") else "",
            } for e in service.endpoints],
        } for service in node.backend_services],
    }


def render_table(response: Any) -> str:
    headers = ["NODE", "BACKEND SERVICE", "ENDPOINT", "HEALTH", "FAILURES", "EJECTIONS", "REPORT AGE", "LAST ERROR"]
    rows = []
    for node in response.nodes:
        for service in node.backend_services:
            for e in service.endpoints:
                health = ("healthy" if e.healthy else "UNHEALTHY") if e.checked else "not checked"
                rows.append([node.node_id, service.backend_service, e.address, health, str(e.failures),
                             str(e.ejections), f"{node.age_seconds:.0f}s", e.last_error])
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    unhealthy = sum(1 for r in rows if r[3] == "UNHEALTHY")
    lines.append(f"({len(rows)} endpoint(s) on {len(response.nodes)} node(s), {unhealthy} unhealthy; failures and "
                 "ejections: the last report interval)")
    return "\n".join(lines)


def run(channel: Any, args: argparse.Namespace) -> int:
    """Print the table (or -o json); exit 1 while any checked endpoint is unhealthy somewhere."""
    import grpc
    from mtlsgate.v1 import reports_pb2, reports_pb2_grpc

    service = "" if args.backends is True else args.backends
    if service:  # ID, backendServices/ID or a full name: nodes report backendServices/ID
        parts = service.split("/")
        service = "/".join(parts[-2:]) if len(parts) >= 2 else f"backendServices/{service}"
    try:
        response = reports_pb2_grpc.BackendHealthServiceStub(channel).ListBackendHealth(
            reports_pb2.ListBackendHealthRequest(backend_service=service), timeout=30)
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None
    if args.output == "json":
        print(json.dumps({"nodes": [node_to_json(n) for n in response.nodes]}, indent=2))
    else:
        print(render_table(response))
    unhealthy = any(e.checked and not e.healthy for n in response.nodes for s in n.backend_services for e in s.endpoints)
    return 1 if unhealthy else 0
