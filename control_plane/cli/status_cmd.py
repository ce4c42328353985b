"""`mtlsgate status`: the fleet's xDS sync state per node and type (like `istioctl proxy-status`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mtlsgate import resource_types as rt

from control_plane.cli.client import add_client_arguments, open_channel, rpc_error


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status", help="show every proxy node's xDS sync state",
        description="One entry per node: id, cluster, connected, overall state (SYNCED / STALE / NOT_SENT / "
        "ERROR) and per type its state, acked version and last error, plus convergence time (store write → "
        "ACK). STALE = sent, not yet acknowledged; ERROR = the node rejected the last version sent.",
    )
    add_client_arguments(p)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    p.add_argument("--cluster", default="", help="only nodes of this cluster")
    p.add_argument("-w", "--watch", action="store_true",
                   help="keep printing the status whenever it changes (JSON: one object per line)")
    p.set_defaults(func=run)


def node_to_json(node: Any) -> dict[str, Any]:
    from mtlsgate.v1 import api_pb2

    def state(s: int) -> str:
        return api_pb2.SyncState.Name(s)

    return {
        "id": node.id,
        "cluster": node.cluster,
        "labels": dict(node.labels),
        "connected": node.connected,
        "connectedSince": node.connected_since.ToJsonString() if node.HasField("connected_since") else "",
        "peer": node.peer,
        "state": state(node.state),
        "convergenceSeconds": round(node.convergence_seconds, 6),
        "types": {
            t.type_url: {
                "state": state(t.state),
                "version": t.acked_version,
                "sentVersion": t.sent_version,
                "sentNonce": t.sent_nonce,
                "error": t.error,
                "convergenceSeconds": round(t.convergence_seconds, 6),
            }
            for t in node.types
        },
    }


def render_table(response: Any) -> str:
    nodes = [node_to_json(n) for n in response.nodes]
    headers = ["NODE", "CLUSTER", "CONNECTED", "STATE", *[rt.short_type(t).upper() for t in rt.ALL_TYPES],
               "CONVERGENCE", "ERROR"]
    rows = []
    for n in nodes:
        cells = []
        errors = []
        for t in rt.ALL_TYPES:
            entry = n["types"].get(t, {"state": "NOT_SENT", "version": "", "error": ""})
            cells.append(f"{entry['state']} {entry['version'][:8]}".strip())
            if entry["error"] and entry["state"] == "ERROR" and entry["error"] not in errors:
                errors.append(entry["error"])
        rows.append([n["id"], n["cluster"], "yes" if n["connected"] else "no", n["state"], *cells,
                     f"{n['convergenceSeconds'] * 1000:.0f}ms" if n["convergenceSeconds"] else "-",
                     "; ".join(errors)])
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    lines.append(f"(snapshot revision {response.revision}; {len(rows)} node(s))")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import grpc
    from mtlsgate.v1 import api_pb2, api_pb2_grpc

    request = api_pb2.ListNodesRequest(cluster=args.cluster)
    try:
        with open_channel(args) as channel:
            fleet = api_pb2_grpc.FleetServiceStub(channel)
            if not args.watch:
                response = fleet.ListNodes(request, timeout=10)
                problems = crl_source_problems(channel)
                _print(response, args.output, problems=problems)
                return 1 if problems else 0
            for response in fleet.WatchNodes(request):  # until interrupted
                _print(response, args.output, watch=True)
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None
    return 0


def crl_source_problems(channel: Any) -> list[dict[str, str]]:
    """CRL sources (SPEC §13) that have failed longer than the CRL they keep fresh is valid."""
    from mtlsgate.v1 import api_pb2, api_pb2_grpc

    stub = api_pb2_grpc.TrustConfigServiceStub(channel)
    problems, token = [], ""
    while True:
        page = stub.ListTrustConfigs(api_pb2.ListResourcesRequest(page_size=500, page_token=token), timeout=10)
        problems += [{"trustConfig": tc.name, "uri": status.uri, "problem": status.problem}
                     for tc in page.trust_configs for status in tc.crl_source_status if status.problem]
        token = page.next_page_token
        if not token:
            return problems


def _print(response: Any, output: str, watch: bool = False, problems: list[dict[str, str]] | None = None) -> None:
    """One report; while watching, JSON is one object per line and tables are separated by a blank line."""
    if output == "json":
        body = {"revision": response.revision, "nodes": [node_to_json(n) for n in response.nodes]}
        if problems is not None:
            body["crlSourceProblems"] = problems
        print(json.dumps(body, indent=None if watch else 2), flush=True)
    else:
        lines = [f"PROBLEM {p['trustConfig']} CRL source {p['uri']}: {p['problem']}" for p in problems or []]
        print("\n".join([render_table(response), *lines]) + ("\n" if watch else ""), flush=True)
