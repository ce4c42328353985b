"""`mtlsgate status`: the fleet's xDS sync state per node and type (like `istioctl proxy-status`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mtlsgate import resource_types as rt

from control_plane.cli.client import add_client_arguments, open_channel, rpc_error


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status", help="show every proxy node's xDS sync state",
        description="One entry per node: id, cluster, connected, overall state (SYNCED / STALE / NOT_SENT / "
        "ERROR) and per type its state, acked version and current NACK, plus convergence time (store write → "
        "ACK). STALE = a newer version is built or sent, not yet acknowledged; ERROR = the node rejected the "
        "last version sent. Exit 1 while any connected node is ERROR or STALE (scripts can gate on it).",
    )
    add_client_arguments(p)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    p.add_argument("--cluster", default="", help="only nodes of this cluster")
    p.add_argument("--backends", nargs="?", const=True, default=None, metavar="BACKEND_SERVICE",
                   help="instead: each node's BackendService endpoints (health, failures, ejections) from its "
                   "latest report, optionally of one service; exit 1 while a checked endpoint is unhealthy")
    p.add_argument("-w", "--watch", action="store_true",
                   help="keep printing the status whenever it changes (JSON: one object per line)")
    p.add_argument("--wait-synced", metavar="TIMEOUT", type=_duration,
                   help="wait until every connected node has acked the current configuration (e.g. 30s, 2m); "
                   "exit 1 naming the nodes that did not in time")
    p.add_argument("--revocations", action="store_true",
                   help="show the last changes that revoked serials: per node the ACK and the time its live "
                   "connections were revalidated, after publication (SPEC §12, B6)")
    p.add_argument("--limit", type=int, default=10, help="with --revocations: how many, newest first")
    p.set_defaults(func=run)


def _duration(text: str) -> float:
    from control_plane.convergence import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30, 30s or 2m") from None


def replica_names(response: Any) -> dict[str, str]:
    """Replica id → name, from a ListNodesResponse (SPEC §14)."""
    return {r.id: r.name for r in response.replicas}


def node_to_json(node: Any, names: dict[str, str] | None = None) -> dict[str, Any]:
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
        "registered": node.registered,
        "identity": node.identity,
        "streams": node.streams,
        "metadataMismatch": node.metadata_mismatch,
        "replica": (names or {}).get(node.replica, node.replica),
        "moving": node.moving,
        "state": state(node.state),
        "convergenceSeconds": round(node.convergence_seconds, 6),
        "types": {
            t.type_url: {
                "state": state(t.state),
                "version": t.acked_version,
                "desiredVersion": t.desired_version,
                "sentVersion": t.sent_version,
                "sentNonce": t.sent_nonce,
                "error": t.error,  # the current NACK only; older ones are in nacks
                "nacks": [{"version": n.version, "error": n.error, "time": n.time.ToJsonString()}
                          for n in t.nack_history],
                "convergenceSeconds": round(t.convergence_seconds, 6),
            }
            for t in node.types
        },
    }


def replicas_to_json(response: Any) -> list[dict[str, Any]]:
    return [{"id": r.id, "name": r.name, "alive": r.alive, "stopped": r.stopped, "nodes": r.nodes,
             "heartbeatAgeSeconds": round(r.heartbeat_age_seconds, 1), "answered": r.id == response.replica}
            for r in response.replicas]


def _replica_line(response: Any) -> str:
    parts = []
    for r in response.replicas:
        if r.id == response.replica:
            what = "answered"
        elif r.alive:
            what = "alive"
        else:
            what = "stopped" if r.stopped else f"silent {r.heartbeat_age_seconds:.0f}s"
        parts.append(f"{r.name} ({what}, {r.nodes} node(s))")
    return "replicas: " + ", ".join(parts)


def render_table(response: Any) -> str:
    names = replica_names(response)
    nodes = [node_to_json(n, names) for n in response.nodes]
    several = len(response.replicas) > 1
    headers = ["NODE", "CLUSTER", "CONNECTED", *(["REPLICA"] if several else []), "STATE",
               *[rt.short_type(t).upper() for t in rt.ALL_TYPES], "CONVERGENCE", "ERROR"]
    rows = []
    for n in nodes:
        cells = []
        errors = []
        for t in rt.ALL_TYPES:
            entry = n["types"].get(t, {"state": "NOT_SENT", "version": "", "error": ""})
            cells.append(f"{entry['state']} {entry['version'][:8]}".strip())
            if entry["error"] and entry["state"] == "ERROR" and entry["error"] not in errors:
                errors.append(entry["error"])
        connected = "yes" if n["connected"] else "moving" if n["moving"] else "no"
        rows.append([n["id"], n["cluster"], connected, *([n["replica"] or "-"] if several else []), n["state"], *cells,
                     f"{n['convergenceSeconds'] * 1000:.0f}ms" if n["convergenceSeconds"] else "-",
                     "; ".join(errors)])
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    lines.append(f"(snapshot revision {response.revision}; {len(rows)} node(s))")
    if several:
        lines.append(_replica_line(response))
    lines += [f"note: node {n['id']}: its replica {n['replica']} stopped answering; waiting for it to reconnect "
              "to another" for n in nodes if n["moving"]]
    lines += [f"note: node {n['id']}: {n['metadataMismatch']}; its Node resource decides"
              for n in nodes if n["metadataMismatch"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import grpc
    from mtlsgate.v1 import api_pb2, api_pb2_grpc

    request = api_pb2.ListNodesRequest(cluster=args.cluster)
    try:
        with open_channel(args) as channel:
            if args.revocations:
                from control_plane.cli import status_revocations

                return status_revocations.run(args, channel)
            fleet = api_pb2_grpc.FleetServiceStub(channel)
            if args.backends is not None:
                from control_plane.cli import backend_health_cmd

                return backend_health_cmd.run(channel, args)
            if args.wait_synced:
                return _wait_synced(fleet, request, args)
            if not args.watch:
                report = fleet.ListNodes(request, timeout=10)
                problems = crl_source_problems(channel)
                _print(report, args.output, problems=problems)
                return max(_exit_code(report), 1 if problems else 0)
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


def _exit_code(report: Any) -> int:
    from control_plane.convergence import unhealthy

    bad = unhealthy(report)
    if bad:
        print(f"mtlsgate status: not synced: {', '.join(f'{node} {state}' for node, state in bad)}",
              file=sys.stderr)
        return 1
    return 0


def _wait_synced(fleet: Any, request: Any, args: argparse.Namespace) -> int:
    """Follow WatchNodes until every connected node is SYNCED on the current snapshots, or time is up."""
    import grpc
    from mtlsgate.v1 import api_pb2

    from control_plane.convergence import Progress, all_synced, node_progress, settled

    deadline = time.monotonic() + args.wait_synced
    last = None
    try:
        for report in fleet.WatchNodes(request, timeout=args.wait_synced):
            last = report
            if all_synced(report):
                _print(report, args.output)
                return 0
            if time.monotonic() > deadline:
                break
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    if last is None:
        last = fleet.ListNodes(request, timeout=10)
    _print(last, args.output)
    waiting = []
    for node in last.nodes:
        progress = node_progress(node)
        if node.connected and (progress.progress is not Progress.CONVERGED or node.state in (api_pb2.ERROR,
                                                                                           api_pb2.STALE)):
            state = api_pb2.SyncState.Name(node.state)
            waiting.append(f"{node.id} {state}{': ' + progress.detail if progress.detail else ''}")
    if not settled(last):
        waiting.append(f"the control plane (snapshots at revision {last.revision}, store at {last.store_revision})")
    print(f"mtlsgate status: not synced after {args.wait_synced:g}s: {', '.join(waiting) or 'unknown'}",
          file=sys.stderr)
    return 1


def _print(response: Any, output: str, watch: bool = False, problems: list[dict[str, str]] | None = None) -> None:
    """One report; while watching, JSON is one object per line and tables are separated by a blank line."""
    if output == "json":
        names = replica_names(response)
        body = {"revision": response.revision, "nodes": [node_to_json(n, names) for n in response.nodes],
                "replicas": replicas_to_json(response)}
        if problems is not None:
            body["crlSourceProblems"] = problems
        print(json.dumps(body, indent=None if watch else 2), flush=True)
    else:
        lines = [f"PROBLEM {p['trustConfig']} CRL source {p['uri']}: {p['problem']}" for p in problems or []]
        print("\n".join([render_table(response), *lines]) + ("\n" if watch else ""), flush=True)
