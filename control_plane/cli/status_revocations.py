"""`mtlsgate status --revocations` (SPEC §12, B6): the last changes that revoked serials and, per node,
when it ACKed a TrustBundle carrying them and when it reported its live connections revalidated."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _time(ts: Any, present: bool) -> str:
    return ts.ToJsonString() if present else ""


def revocations_to_json(response: Any) -> dict[str, Any]:
    return {
        "replica": response.replica,
        "revocations": [{
            "sequence": r.sequence, "revision": r.revision, "published": r.publish_time.ToJsonString(),
            "trustConfigs": list(r.trust_configs), "serials": list(r.serials), "serialCount": r.serial_count,
            "untrackedNodes": r.untracked_nodes,
            "nodes": [{
                "node": n.node_id, "acked": _time(n.ack_time, n.HasField("ack_time")),
                "ackedVersion": n.acked_version, "ackSeconds": round(n.ack_seconds, 6) if n.HasField("ack_time") else None,
                "enforced": _time(n.enforced_time, n.HasField("enforced_time")),
                "enforcementSeconds": round(n.enforcement_seconds, 6) if n.HasField("enforced_time") else None,
                "closed": n.closed, "checked": n.checked, "closedFingerprints": list(n.closed_fingerprints),
            } for n in r.nodes],
        } for r in response.revocations],
    }


def render_table(response: Any) -> str:
    headers = ["#", "REVISION", "PUBLISHED", "TRUSTCONFIG", "SERIALS", "NODE", "ACK", "ENFORCED", "CLOSED"]
    rows: list[list[str]] = []
    for r in response.revocations:
        shown = ",".join(s[:16] for s in r.serials[:3])
        serials = f"{shown}{'…' if r.serial_count > 3 else ''} ({r.serial_count})"
        first = [str(r.sequence), str(r.revision), r.publish_time.ToJsonString(), ",".join(r.trust_configs), serials]
        blank = [""] * len(first)
        if not r.nodes:
            rows.append([*first, "(no node served it)", "", "", ""])
        for i, n in enumerate(r.nodes):
            ack = f"{n.ack_seconds * 1000:.0f}ms" if n.HasField("ack_time") else "waiting"
            enforced = f"{n.enforcement_seconds * 1000:.0f}ms" if n.HasField("enforced_time") else (
                "no report" if n.HasField("ack_time") else "-")
            rows.append([*(first if i == 0 else blank), n.node_id, ack, enforced,
                         f"{n.closed}/{n.checked}" if n.HasField("enforced_time") else "-"])
        if r.untracked_nodes:
            rows.append([*blank, f"(+{r.untracked_nodes} nodes not tracked)", "", "", ""])
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    lines.append(f"({len(response.revocations)} revocation(s) seen by replica {response.replica}; ACK and "
                 "ENFORCED are after publication; CLOSED = live connections closed / re-judged)")
    return "\n".join(lines)


def run(args: argparse.Namespace, channel: Any) -> int:
    from mtlsgate.v1 import reports_pb2, reports_pb2_grpc

    response = reports_pb2_grpc.RevocationServiceStub(channel).ListRevocations(
        reports_pb2.ListRevocationsRequest(limit=args.limit), timeout=10)
    if args.output == "json":
        print(json.dumps(revocations_to_json(response), indent=2))
    else:
        print(render_table(response))
    return 0
