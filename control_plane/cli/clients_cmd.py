"""`mtlsgate clients`: every client certificate the fleet's nodes saw (SPEC §12 client inventory)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from control_plane.cli.client import add_client_arguments, open_channel, rpc_error


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "clients", help="list the client certificates seen across the fleet",
        description="One row per client certificate and listener (and one for handshakes without a certificate) "
        "seen by any node in the kept reports (the last hour): nodes, first/last seen, handshake count, "
        "the latest verdict and error, days to expiry. EXPIRED-ALLOWLISTED flags a certificate that is "
        "accepted only because it is allowlisted although it has expired.",
    )
    add_client_arguments(p)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    p.add_argument("--listener", default="", help="only this listener (listeners/ID or ID)")
    p.add_argument("--rejected", action="store_true", help="only certificates whose latest verdict was a rejection")
    p.add_argument("--expiring", metavar="DURATION", type=_within,
                   help="only certificates expiring within DURATION (e.g. 30d, 12h; expired ones included)")
    p.set_defaults(func=run)


def _within(text: str) -> float:
    from control_plane.convergence import parse_duration

    value = text.strip().lower()
    try:
        if value.endswith("d"):
            return float(value[:-1]) * 86_400
        return parse_duration(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30d, 12h or 90m") from None


def client_to_json(c: Any) -> dict[str, Any]:
    return {
        "fingerprintSha256": c.fingerprint_sha256, "subject": c.subject, "issuer": c.issuer, "serial": c.serial,
        "notAfter": c.not_after.ToJsonString() if c.HasField("not_after") else "",
        "daysToExpiry": round(c.days_to_expiry, 1) if c.HasField("not_after") else None,
        "verified": c.verified, "accepted": c.accepted, "error": c.error, "allowlisted": c.allowlisted,
        "expired": c.expired, "expiredAllowlisted": c.expired_allowlisted,
        "firstSeen": c.first_seen.ToJsonString(), "lastSeen": c.last_seen.ToJsonString(),
        "count": c.count, "nodes": list(c.nodes), "listeners": list(c.listeners),
    }


def _verdict(c: Any) -> str:
    if not c.fingerprint_sha256:
        return "NO-CERTIFICATE" + ("" if c.accepted else " (rejected)")
    if c.expired_allowlisted:
        return "EXPIRED-ALLOWLISTED"
    # ALLOWED-INVALID: the chain did not verify, the listener's mode (ALLOW_INVALID_OR_MISSING) let it through.
    return ("VERIFIED" if c.verified else "ALLOWED-INVALID" if c.accepted else "REJECTED") + (
        " (allowlisted)" if c.allowlisted else "")


def run(args: argparse.Namespace) -> int:
    import grpc
    from mtlsgate.v1 import reports_pb2, reports_pb2_grpc

    listener = args.listener if not args.listener or "/" in args.listener else f"listeners/{args.listener}"
    request = reports_pb2.ListClientsRequest(listener=listener, rejected=args.rejected,
                                             expiring_within_seconds=args.expiring or 0.0)
    try:
        with open_channel(args) as channel:
            response = reports_pb2_grpc.ClientServiceStub(channel).ListClients(request, timeout=30)
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None
    if args.output == "json":
        print(json.dumps({"clients": [client_to_json(c) for c in response.clients],
                          "since": response.since.ToJsonString()}, indent=2))
        return 0
    rows = [("FINGERPRINT", "SUBJECT", "LISTENER", "VERDICT", "ERROR", "EXPIRES IN", "COUNT", "NODES", "LAST SEEN")]
    now = time.time()
    for c in response.clients:
        days = f"{c.days_to_expiry:.0f}d" if c.HasField("not_after") else "-"
        ago = f"{max(0.0, now - c.last_seen.ToNanoseconds() / 1e9):.0f}s ago"
        rows.append((c.fingerprint_sha256[:16] or "-", c.subject[:48] or "-",
                     ",".join(name.removeprefix("listeners/") for name in c.listeners), _verdict(c), c.error or "-", days,
                     str(c.count), ",".join(c.nodes), ago))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    if not response.clients:
        print("(no client certificates in the kept node reports)")
    return 0
