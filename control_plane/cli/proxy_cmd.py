"""`mtlsgate proxy`: run a proxy node (xDS agent, listeners, admin endpoint)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from pathlib import Path

from control_plane.cli.common import UsageError, add_server_argument
from data_plane.validation.pem import tls_files_problem


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r} is not KEY=VALUE")
    return key, value


def _host_port(text: str) -> str:
    _, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "proxy", help="run a proxy node",
        description="Run a proxy node: connects to the control plane over xDS as --node-id in group --cluster "
        "with --label labels, applies the listeners its labels select, serves /ready, /config_dump and "
        "/metrics on --admin. With --cache-dir it keeps the last good configuration and starts from it "
        "when the control plane is unreachable.",
    )
    add_server_argument(p, help="control plane HOST:PORT, or several replicas HOST:PORT,HOST:PORT… in order "
                        "of preference (a name resolving to several addresses counts as several); the node "
                        "holds one stream and fails over")
    p.add_argument("--node-id", default=socket.gethostname(), help="xDS node id (default: the host name)")
    p.add_argument("--cluster", default="default", help="node group (xDS node.cluster; default %(default)s)")
    p.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE",
                   help="node label matched by listeners' nodeSelector (repeatable)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: the CPU count, %(default)s here)")
    p.add_argument("--admin", type=_host_port, default="127.0.0.1:9901",
                   help="admin HTTP HOST:PORT (default %(default)s)")
    p.add_argument("--cache-dir", type=Path, help="directory for the last good configuration (holds keys: 0700)")
    p.add_argument("--listen-address", default="0.0.0.0",
                   help="address the listeners bind (default %(default)s)")
    p.add_argument("--xds-ca", type=Path, help="CA bundle to verify the control plane (enables TLS)")
    p.add_argument("--xds-cert", type=Path, help="client certificate for xDS mTLS (its SPIFFE ID/CN = --node-id)")
    p.add_argument("--xds-key", type=Path, help="private key of --xds-cert")
    p.add_argument("--max-connections-per-ip", type=int, metavar="N",
                   help="concurrent client connections per client IP per worker (SPEC §11; default 256)")
    p.add_argument("--backoff-max", type=float, default=5.0,
                   help="reconnect backoff cap in seconds (full jitter; default %(default)s)")
    p.add_argument("--report-interval", type=float, default=5.0,
                   help="seconds between node reports to the control plane (SPEC §12; default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_plane.http.bounds import BoundsError, from_environment
    from data_plane.node.agent import Backoff
    from data_plane.node.servers import ServerListError, parse_servers
    from data_plane.node.supervisor import ProxyOptions, configure_logging, run_proxy

    try:
        parse_servers(args.server)
    except ServerListError as exc:
        raise UsageError(str(exc)) from None
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.max_connections_per_ip is not None:
        if args.max_connections_per_ip < 1:
            raise UsageError("--max-connections-per-ip must be at least 1")
        # the workers read their bounds from the environment they are spawned with (data_plane/http/bounds.py)
        knob = os.environ.get("MTLSGATE_PROXY_BOUNDS", "").strip()
        if knob != "off":
            os.environ["MTLSGATE_PROXY_BOUNDS"] = ",".join(
                part for part in (knob, f"max_connections_per_ip={args.max_connections_per_ip}") if part)
    try:
        from_environment(os.environ)  # the workers read it too; a bad value is one line here, not a crash loop
    except BoundsError as exc:
        raise UsageError(str(exc)) from None
    if bool(args.xds_cert) != bool(args.xds_key):
        raise UsageError("--xds-cert and --xds-key go together")
    for path in (args.xds_ca, args.xds_cert, args.xds_key):
        if path is not None and not path.is_file():
            raise UsageError(f"{path}: no such file")

    def text(path: Path | None) -> str | None:
        return path.read_text(errors="replace") if path is not None else None

    problem = tls_files_problem(cert=text(args.xds_cert), key=text(args.xds_key), ca=text(args.xds_ca))
    if problem:
        role, _, words = problem.partition(": ")
        flag = {"certificate": f"--xds-cert {args.xds_cert}", "key": f"--xds-key {args.xds_key}",
                "CA": f"--xds-ca {args.xds_ca}"}[role]
        raise UsageError(f"{flag}: {words}")
    options = ProxyOptions(
        server=args.server, node_id=args.node_id, cluster=args.cluster, labels=dict(args.label),
        workers=args.workers, admin=args.admin, cache_dir=args.cache_dir, listen_address=args.listen_address,
        xds_ca=args.xds_ca, xds_cert=args.xds_cert, xds_key=args.xds_key,
        backoff=Backoff(cap=max(0.1, args.backoff_max)), report_interval=max(0.2, args.report_interval),
    )
    configure_logging()
    try:
        asyncio.run(run_proxy(options))
    except OSError as exc:
        raise UsageError(f"cannot start: {exc}") from exc
    return 0
