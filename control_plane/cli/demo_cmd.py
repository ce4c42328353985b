"""`mtlsgate demo [--dir DIR]`: the whole system as local processes, configured and ready to try.

Creates the demo PKI, starts a control plane (SQLite file in DIR), the echo backend and two proxy nodes of
one group (127.0.0.2 and 127.0.0.3), applies a ready configuration with the CLI, waits until both nodes
are SYNCED and serving, writes `DIR/endpoints.json` (SPEC §3), prints what to try, and stops everything on
Ctrl-C / SIGTERM. `--prepare-only` writes the PKI and manifests without starting anything (compose uses
it). What the stack is configured with lives in `control_plane.demo_config`; this module runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from control_plane.cli.common import CliError, UsageError
from control_plane.demo_config import (
    DemoCredentials,
    DemoLayout,
    DemoNode,
    display_path,
    endpoints_document,
    instructions,
    prepare,
)

CLUSTER = "demo"


# ---------------------------------------------------------------- child processes


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived: stop everything and exit 0."""


def _die_with_parent() -> None:
    # If the demo itself is killed (SIGKILL, a closed terminal), its children must not live on holding ports.
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Child:
    """One component of the stack: a `mtlsgate …` subprocess in its own process group, output in a log."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.command = [sys.executable, "-m", "control_plane.cli.main", *args]
        with open(log_path, "wb") as log:  # one run per log: the tail then explains this run
            self.popen = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # Own process group: Ctrl-C reaches only the demo, which then stops children in order.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"demo: {self.name} did not stop within {timeout:.0f}s; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # and anything it forked (workers)
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(5)


class Stack:
    """The running children, started in dependency order and stopped in reverse."""

    def __init__(self, log_dir: Path, stop_requested: threading.Event) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.stop_requested = stop_requested

    def start(self, name: str, args: Sequence[str]) -> Child:
        child = Child(name, args, self.log_dir / f"{name}.log")
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise if a stop was requested or any component died."""
        if self.stop_requested.is_set():
            raise Interrupted
        for child in self.children:
            if not child.alive():
                raise CliError(
                    f"{child.name} exited with code {child.popen.returncode}; "
                    f"last lines of {child.log_path}:\n{child.log_tail()}"
                )

    def wait_for(self, what: str, probe: Callable[[], str | None], timeout: float) -> None:
        """Poll `probe` (None = ready, else the reason it is not) until ready, a child dies, or timeout."""
        deadline = time.monotonic() + timeout
        problem: str | None = "not checked yet"
        while True:
            self.check()
            problem = probe()
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise CliError(
                    f"timed out after {timeout:.0f}s waiting for {what}: {problem} (logs: {self.log_dir})"
                )
            self.stop_requested.wait(0.2)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()

    def pids(self) -> dict[str, int]:
        return {child.name: child.popen.pid for child in self.children}


# ---------------------------------------------------------------- readiness probes


def admin_channel(control_plane: str, credentials: DemoCredentials) -> object:
    """A channel to the demo's control plane as its admin (TLS, admin certificate and token)."""
    from control_plane.cli.client import open_channel

    d = credentials.directory
    return open_channel(argparse.Namespace(server=control_plane, ca_cert=str(d / "ca.pem"),
                                           cert=str(d / "admin.pem"), key=str(d / "admin-key.pem"),
                                           token=credentials.admin_token, context=None))


def fleet_problem(control_plane: str, node_ids: Sequence[str], credentials: DemoCredentials) -> str | None:
    """None when every node is connected and SYNCED (FleetService.ListNodes), else what is missing."""
    import grpc
    from mtlsgate.v1 import api_pb2, api_pb2_grpc

    with admin_channel(control_plane, credentials) as channel:  # type: ignore[attr-defined]
        try:
            reply = api_pb2_grpc.FleetServiceStub(channel).ListNodes(api_pb2.ListNodesRequest(), timeout=2)
        except grpc.RpcError as exc:
            return f"FleetService.ListNodes: {exc.code().name}: {exc.details()}"
    nodes = {node.id: node for node in reply.nodes}
    for node_id in node_ids:
        node = nodes.get(node_id)
        if node is None:
            return f"node {node_id} has not connected"
        if node.state == api_pb2.ERROR:
            # A NACKed version is not re-sent (SPEC §6): waiting longer cannot help.
            errors = "; ".join(dict.fromkeys(t.error for t in node.types if t.error))  # one NACK, many types
            raise CliError(f"node {node_id} rejected the configuration: {errors or 'no detail'}")
        if not node.connected or node.state != api_pb2.SYNCED:
            return f"node {node_id} is {api_pb2.SyncState.Name(node.state)} (connected={node.connected})"
    return None


def mtls_get(
    url: str, *, ca: Path, cert: Path | None, key: Path | None, timeout: float = 3.0
) -> tuple[int, bytes]:
    """One HTTPS GET presenting a client certificate (or none); raises OSError/ssl.SSLError when refused."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    conn = http.client.HTTPSConnection(
        parts.hostname or "", parts.port or 443, context=context, timeout=timeout
    )
    try:
        conn.request("GET", parts.path or "/")
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def listener_problem(url: str, pki_dir: Path) -> str | None:
    try:
        status, _ = mtls_get(
            url, ca=pki_dir / "ca.pem", cert=pki_dir / "client.pem", key=pki_dir / "client-key.pem"
        )
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return f"{url}: {exc}"
    return None if status == 200 else f"{url}: HTTP {status}"


def register_context(name: str, context: dict[str, str]) -> str:
    """Write the CLI context NAME and make it current (like kind and minikube do); returns what to say."""
    from control_plane.cli.contexts import CliConfig

    config = CliConfig.load()
    config.contexts[name] = context
    config.current = name
    config.save()
    return (f'demo: registered the CLI context "{name}" in {config.path} and made it current: `mtlsgate status` '
            f"reaches this stack as its admin (`mtlsgate config use-context …` to switch; `--no-context` skips this)")


# ---------------------------------------------------------------- the command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole system locally (control plane, echo backend, two proxy nodes), ready to try",
        description="Creates a demo PKI in DIR, starts a control plane (SQLite in DIR), an echo backend and "
        "two proxy nodes of one group on 127.0.0.2 and 127.0.0.3, applies a strict (REJECT_INVALID) and a "
        "permissive (ALLOW_INVALID_OR_MISSING_CLIENT_CERT) listener with a CRL, waits until both nodes are "
        "SYNCED, writes DIR/endpoints.json and prints what to try. Ctrl-C stops everything.",
    )
    parser.add_argument(
        "--dir", default="demo", help="working directory: PKI, store, logs (default %(default)s)"
    )
    parser.add_argument(
        "--control-plane",
        default="127.0.0.1:18000",
        metavar="HOST:PORT",
        help="control plane address (default %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default="127.0.0.1:9000",
        metavar="HOST:PORT",
        help="echo backend address (default %(default)s)",
    )
    parser.add_argument(
        "--backend-b",
        default="127.0.0.1:9001",
        metavar="HOST:PORT",
        help="second echo backend address: with the first, BackendService `echo` behind the permissive "
        "listener's routes (default %(default)s; '' = none, both listeners forward to --backend)",
    )
    parser.add_argument(
        "--strict-port", type=int, default=8443, help="REJECT_INVALID listener port (default %(default)s)"
    )
    parser.add_argument(
        "--permissive-port",
        type=int,
        default=8444,
        help="ALLOW_INVALID_OR_MISSING_CLIENT_CERT listener port (default %(default)s)",
    )
    parser.add_argument(
        "--node-addresses",
        default="127.0.0.2,127.0.0.3",
        metavar="ADDR,ADDR",
        help="listen addresses of the two proxy nodes (default %(default)s)",
    )
    parser.add_argument(
        "--admin-ports",
        default="9901,9902",
        metavar="PORT,PORT",
        help="admin ports of the two proxy nodes, on 127.0.0.1 (default %(default)s)",
    )
    parser.add_argument(
        "--control-plane-metrics",
        default="127.0.0.1:9900",
        metavar="HOST:PORT",
        help="the control plane's Prometheus /metrics (default %(default)s; '' turns it off)",
    )
    parser.add_argument(
        "--crl-publisher",
        default="127.0.0.1:9080",
        metavar="HOST:PORT",
        help="where the demo CA publishes its CRL for the control plane to fetch (default %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes per proxy node (default %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each step (default %(default)s)"
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the PKI and manifests into DIR and exit (the compose stack's pki-init uses this)",
    )
    parser.add_argument(
        "--no-context",
        action="store_true",
        help="do not register the CLI context `demo` (by default it is written to the CLI config and made "
        "current, so that `mtlsgate status` reaches this demo with its admin credentials)",
    )
    parser.add_argument(
        "--register-context",
        metavar="NAME",
        help="register the CLI context NAME (default `demo`; with --prepare-only only when given — the compose "
        "stack's pki-init registers `compose` for the CLI inside its containers)",
    )
    parser.add_argument(
        "--extra-node-ids",
        default="",
        metavar="ID,ID",
        help="with --prepare-only: also issue node certificates and Node resources for these node IDs "
        "(the compose stack's proxy-a, proxy-b)",
    )
    parser.set_defaults(func=run)


def layout_from_args(args: argparse.Namespace) -> DemoLayout:
    addresses = [a.strip() for a in args.node_addresses.split(",") if a.strip()]
    try:
        admin_ports = [int(p) for p in args.admin_ports.split(",")]
    except ValueError as exc:
        raise UsageError(f"--admin-ports {args.admin_ports!r}: expected PORT,PORT") from exc
    if len(addresses) != 2 or len(admin_ports) != 2:
        raise UsageError("--node-addresses and --admin-ports need exactly two entries each (two proxy nodes)")
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise UsageError(f"--node-addresses: {address!r} is not an IP address (e.g. 127.0.0.2)") from None
    for flag, port in (
        ("--strict-port", args.strict_port),
        ("--permissive-port", args.permissive_port),
        *(("--admin-ports", p) for p in admin_ports),
    ):
        if not 0 < port < 65536:
            raise UsageError(f"{flag}: {port} is not a port (1-65535)")
    if args.strict_port == args.permissive_port:
        raise UsageError("--strict-port and --permissive-port must differ")
    nodes = tuple(
        DemoNode(f"demo-{letter}", address, f"127.0.0.1:{port}")
        for letter, address, port in zip("ab", addresses, admin_ports, strict=True)
    )
    return DemoLayout(
        args.control_plane, args.backend, args.backend, args.strict_port, args.permissive_port, nodes,
        args.control_plane_metrics,
        # compose (--prepare-only) runs no publisher: its TrustConfig keeps the written CRL only
        crl_publisher=None if args.prepare_only else args.crl_publisher,
        backend_b=args.backend_b, backend_b_target=args.backend_b,
    )


def _cli_display() -> str:
    script = Path(sys.executable).parent / "mtlsgate"
    return display_path(script) if script.exists() else "mtlsgate"


def run(args: argparse.Namespace) -> int:
    layout = layout_from_args(args)
    directory = Path(args.dir)
    try:
        extra = [i.strip() for i in args.extra_node_ids.split(",") if i.strip()]
        prepare(directory, layout, extra)
    except OSError as exc:
        raise UsageError(f"--dir {args.dir}: {exc.strerror or exc}") from None
    if args.prepare_only:
        if args.register_context and not args.no_context:
            print(register_context(args.register_context, DemoCredentials(directory).context(layout.control_plane)))
        print(f"wrote the demo PKI and manifests to {directory}/ (mtlsgate.yaml, trust-config-rotated.yaml)")
        return 0

    endpoints_path = directory / "endpoints.json"
    endpoints_path.unlink(missing_ok=True)  # its presence means "ready"; never leave a stale one
    log_dir = directory / "logs"
    log_dir.mkdir(exist_ok=True)

    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(log_dir, stop_requested)
    from control_plane.cli.probe_cmd import grpc_serving, http_ok

    try:
        # First started, last stopped: the control plane never sees the demo CA's publisher vanish.
        stack.start("crl-publisher", ["pki", "publish", "--dir", str(directory), "--listen", str(layout.crl_publisher)])
        print(f"demo: starting the control plane on {layout.control_plane} …", flush=True)
        credentials = DemoCredentials(directory)
        stack.start(
            "control-plane",
            # The secure setup (SPEC §8): TLS, client certificates, the admin token, role bindings.
            ["control-plane", "--listen", layout.control_plane, "--db", str(directory / "mtlsgate.db"),
             *credentials.control_plane_args(),
             *(["--metrics", layout.control_plane_metrics] if layout.control_plane_metrics else [])],
        )
        stack.start("echo-backend", ["echo-backend", "--listen", layout.backend,
                                     *(["--name", "a"] if layout.backend_b else [])])
        if layout.backend_b:
            stack.start("echo-backend-b", ["echo-backend", "--listen", layout.backend_b, "--name", "b"])
        probe_tls = {"ca_cert": str(directory / "ca.pem"), "cert": str(directory / "admin.pem"),
                     "key": str(directory / "admin-key.pem")}
        stack.wait_for("the control plane", lambda: grpc_serving(layout.control_plane, **probe_tls), args.timeout)
        stack.wait_for("the echo backend", lambda: http_ok(f"http://{layout.backend}/healthz"), args.timeout)
        if layout.backend_b:
            stack.wait_for("the second echo backend", lambda: http_ok(f"http://{layout.backend_b}/healthz"),
                           args.timeout)
        stack.wait_for("the CRL publisher", lambda: http_ok(str(layout.crl_url)), args.timeout)

        print(
            "demo: applying mtlsgate.yaml (trust config with CRL, 2 policies, certificate, "
            f"{'backend service, ' if layout.backend_b else ''}2 listeners) …",
            flush=True,
        )
        apply = subprocess.run(
            [
                sys.executable,
                "-m",
                "control_plane.cli.main",
                "apply",
                "-f",
                str(directory / "mtlsgate.yaml"),
                "--server",
                layout.control_plane,
                *credentials.client_args(),
            ],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            env={**os.environ, "MTLSGATE_TOKEN": credentials.admin_token},  # not on a command line
        )
        stack.check()  # Ctrl-C reaches `apply` too (same process group): that is a stop, not a failure
        if apply.returncode != 0:
            output = (apply.stderr.strip() or apply.stdout.strip()).splitlines() or ["no output"]
            raise CliError(
                f"mtlsgate apply -f {directory / 'mtlsgate.yaml'} failed (exit {apply.returncode}): "
                f"{output[-1]}"
            )

        for node in layout.nodes:
            print(f"demo: starting proxy node {node.node_id} on {node.listen_address} …", flush=True)
            stack.start(
                node.node_id,
                [
                    "proxy",
                    "--server",
                    layout.control_plane,
                    "--node-id",
                    node.node_id,
                    "--cluster",
                    CLUSTER,
                    "--label",
                    f"node={node.node_id}",
                    "--workers",
                    str(args.workers),
                    "--admin",
                    node.admin,
                    "--cache-dir",
                    str(directory / "cache" / node.node_id),
                    "--listen-address",
                    node.listen_address,
                    *credentials.node_args(node.node_id),
                ],
            )
        node_ids = [n.node_id for n in layout.nodes]
        stack.wait_for(
            "both nodes SYNCED", lambda: fleet_problem(layout.control_plane, node_ids, credentials), args.timeout
        )
        for node in layout.nodes:
            stack.wait_for(
                f"{node.node_id} /ready", partial(http_ok, f"http://{node.admin}/ready"), args.timeout
            )
        for url in layout.listener_urls(layout.strict_port) + layout.listener_urls(layout.permissive_port):
            stack.wait_for(f"{url} to serve", partial(listener_problem, url, directory), args.timeout)

        (directory / "pids.json").write_text(json.dumps(stack.pids(), indent=2) + "\n")
        tmp = endpoints_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(endpoints_document(layout, directory), indent=2) + "\n")
        tmp.replace(endpoints_path)  # atomically: readers never see half a file
        if not args.no_context:
            print(register_context(args.register_context or "demo", credentials.context(layout.control_plane)),
                  flush=True)
        # Without a registered context the printed commands must carry the admin credentials themselves.
        connect = credentials.client_args() if args.no_context else []
        print(instructions(layout, directory, _cli_display(), connect), flush=True)
        print(f"endpoints: {display_path(endpoints_path)}", flush=True)

        while True:
            stack.check()
            stop_requested.wait(0.5)
    except Interrupted:
        print("\ndemo: stopping …", flush=True)
        return 0
    finally:
        stack.stop_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        print("demo: everything stopped", flush=True)
