"""`mtlsgate apply --shadow -f FILE` and `mtlsgate shadow status|promote|discard NAME` (SPEC §12): try a
candidate TrustConfig or ServerTlsPolicy on live traffic without enforcing it, see which clients it would
newly reject or accept, then promote or discard it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

import grpc
from google.protobuf import empty_pb2, json_format
from mtlsgate.v1 import reports_pb2, shadow_pb2, shadow_pb2_grpc

from control_plane.cli.client import add_client_arguments, open_channel, rpc_error
from control_plane.cli.common import UsageError
from control_plane.manifests import ManifestResource

TIMEOUT = 30.0
_DIRECTION = reports_pb2.ShadowDisagreement.Direction
_WORDS = {_DIRECTION.WOULD_NEWLY_REJECT: "would newly reject", _DIRECTION.WOULD_NEWLY_ACCEPT: "would newly accept"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shadow", help="shadow candidates: status, promote, discard (apply --shadow stores one)",
        description="A shadow candidate (mtlsgate apply --shadow -f FILE) is judged on every new handshake next "
        "to the active TrustConfig / ServerTlsPolicy of the same name; only the active one is enforced. status "
        "shows the clients the candidate would newly reject or accept, from the nodes' reports; promote makes "
        "it the active resource (an ordinary audited write); discard drops it and changes nothing else.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("status", "what the nodes' reports say about a candidate"),
                         ("promote", "make the candidate the active resource"),
                         ("discard", "drop the candidate; the active resource stays as it is"),
                         ("list", "every stored candidate")):
        sub = actions.add_parser(action, help=text, description=text)
        if action != "list":
            sub.add_argument("name", help="trustConfigs/ID or serverTlsPolicies/ID (a bare ID if unambiguous)")
        if action in ("status", "list"):
            sub.add_argument("-o", "--output", choices=["table", "json"], default="table")
        add_client_arguments(sub)
        sub.set_defaults(func=run)


def check_shadow_kinds(args: argparse.Namespace, items: list[ManifestResource]) -> None:
    wrong = [i for i in items if i.kind.kind not in ("TrustConfig", "ServerTlsPolicy")]
    if wrong:
        raise UsageError(f"{wrong[0].source}: --shadow takes TrustConfig and ServerTlsPolicy documents, not "
                         f"{wrong[0].kind.kind}")
    if args.rollout:
        raise UsageError("--shadow and --rollout do not go together (promote the candidate with a roll-out "
                         "later instead)")


def apply_shadow(args: argparse.Namespace, items: list[ManifestResource]) -> int:
    """`apply --shadow`: every document must be a TrustConfig or ServerTlsPolicy; all are checked on the
    server (validate_only) before the first is stored, so an invalid one stores nothing."""
    check_shadow_kinds(args, items)

    def request(item: ManifestResource, validate_only: bool) -> shadow_pb2.ApplyShadowRequest:
        field = "trust_config" if item.kind.kind == "TrustConfig" else "server_tls_policy"
        return shadow_pb2.ApplyShadowRequest(validate_only=validate_only, **{field: item.resource})

    try:
        with open_channel(args) as channel:
            stub = shadow_pb2_grpc.ShadowServiceStub(channel)
            for item in items:
                stub.ApplyShadow(request(item, True), timeout=TIMEOUT)
            for item in items:
                result = stub.ApplyShadow(request(item, bool(args.dry_run)), timeout=TIMEOUT)
                outcome = "validated (dry run)" if args.dry_run else ("stored" if result.changed else "unchanged")
                print(f"shadow candidate of {result.name} {outcome} (candidate {result.candidate_etag}, "
                      f"active {result.active_etag})", flush=True)
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        with open_channel(args) as channel:
            stub = shadow_pb2_grpc.ShadowServiceStub(channel)
            if args.action == "list":
                listed = stub.ListShadows(empty_pb2.Empty(), timeout=TIMEOUT)
                if args.output == "json":
                    print(json.dumps([json_format.MessageToDict(c) for c in listed.candidates], indent=2))
                else:
                    rows = [[c.name, c.candidate_etag, c.active_etag, _when(c.create_time)] for c in listed.candidates]
                    print(_table(["NAME", "CANDIDATE", "ACTIVE", "STORED"], rows))
                return 0
            request = shadow_pb2.ShadowRequest(name=args.name)
            if args.action == "status":
                status = stub.GetShadowStatus(request, timeout=TIMEOUT)
                if args.output == "json":
                    print(json.dumps(status_json(status), indent=2))
                else:
                    print(render(status))
                return 0
            if args.action == "promote":
                result = stub.PromoteShadow(request, timeout=TIMEOUT)
                print(f"{result.name}: candidate {result.candidate_etag} promoted (now active, etag "
                      f"{result.active_etag}); the shadow candidate is gone")
                return 0
            stub.DiscardShadow(request, timeout=TIMEOUT)
            print(f"{args.name}: shadow candidate discarded (the active resource is unchanged)")
            return 0
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None


def status_json(status: shadow_pb2.ShadowStatus) -> dict[str, Any]:
    return {
        "name": status.candidate.name,
        "candidateEtag": status.candidate.candidate_etag,
        "activeEtag": status.candidate.active_etag,
        "storedAt": _when(status.candidate.create_time),
        "reportsAvailable": status.reports_available,
        "judged": status.judged,
        "wouldNewlyReject": status.would_newly_reject,
        "wouldNewlyAccept": status.would_newly_accept,
        "nodes": list(status.nodes),
        "findings": [{"direction": _DIRECTION.Name(f.direction), "fingerprintSha256": f.fingerprint_sha256,
                      "activeError": f.active_error, "candidateError": f.candidate_error, "count": f.count,
                      "nodes": list(f.nodes), "listeners": list(f.listeners), "lastSeen": _when(f.last_seen)}
                     for f in status.findings],
    }


def render(status: shadow_pb2.ShadowStatus) -> str:
    c = status.candidate
    lines = [f"{c.name}: shadow candidate {c.candidate_etag} (active {c.active_etag}), stored {_when(c.create_time)}"]
    if not status.reports_available:
        lines.append("  this control plane keeps no node reports: nothing judged yet")
        return "\n".join(lines)
    if not status.judged:
        lines.append("  no node has judged a handshake under this candidate yet: no evidence either way (0 "
                     "disagreements here does not mean the candidate is safe)")
    lines.append(f"  judged {status.judged} handshake(s) on {len(status.nodes)} node(s)"
                 f"{': ' + ', '.join(status.nodes) if status.nodes else ''}; "
                 f"would newly reject {status.would_newly_reject}, would newly accept {status.would_newly_accept}")
    if status.findings:
        rows = [[_WORDS.get(f.direction, "?"), f.fingerprint_sha256 or "(no certificate)", f.active_error or "-",
                 f.candidate_error or "-", str(f.count), ",".join(f.nodes)] for f in status.findings]
        lines.append(_table(["DIRECTION", "FINGERPRINT (SHA-256)", "ACTIVE ERROR", "CANDIDATE ERROR", "COUNT",
                             "NODES"], rows))
    return "\n".join(lines)


def _when(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return dt.datetime.fromtimestamp(ts.seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip()
                     for row in [headers, *rows])
