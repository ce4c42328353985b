"""Convergence benchmark (SPEC §10 B3, B4): a real control plane, 2 real proxy nodes and simulated xDS clients.

B3: N CRL rotations (TrustConfig updates through the API); for each, the time from the API write
returning to every node (2 real + `--sim` simulated) having ACKed the new TrustBundle — for real nodes an
ACK means the workers already enforce it. ACK times are the control plane's receipt times (FleetService
`last_ack_time`), so they include the whole path. p50/p99 over writes, plus per-node p50/p99.
B4: `--scale` simulated clients on one control plane: its RSS before/after, and the time to push one
change to all of them.
`--replicas 2 --postgres` (or `--db postgresql://…`): B3 with control-plane replicas on one PostgreSQL
database (SPEC §14): every write goes to replica 0, real node i and 1/N of the simulated ones stream from
replica i % N, so the figure includes NOTIFY and the other replica's rebuild.

Simulated clients are ADS streams in separate processes (tests/xds/sim_fleet.py: grpc.aio, 50 streams per
TCP connection) that subscribe like a node and ACK every response at once; B4's push time is when the last
of them received the change (their own count, so measuring does not load the control plane). Run:
`.venv/bin/python bench/convergence.py` (add `--quick` for a short run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from mtlsgate.v1 import api_pb2, api_pb2_grpc, resources_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlsgate import resource_types as rt

from control_plane.pki import Issued, crl_pem, init_demo_pki, make_crl
from tests.xds.sim_fleet import SimFleet

ROOT = Path(__file__).resolve().parents[1]
MTLSGATE = [sys.executable, "-m", "control_plane.cli.main"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(condition, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.pki = init_demo_pki(workdir / "pki")
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(args.replicas)]
        self.address = self.addresses[0]  # where every write goes
        self.metrics = [f"127.0.0.1:{free_port()}" for _ in range(args.replicas)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.channel = grpc.insecure_channel(self.address)
        self.fleets = [api_pb2_grpc.FleetServiceStub(grpc.insecure_channel(a)) for a in self.addresses]
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.inter = Issued(x509.load_pem_x509_certificate(self.pki.path("intermediate_cert").read_bytes()),
                            serialization.load_pem_private_key(self.pki.path("intermediate_key").read_bytes(), None))
        self.rotation = 0

    def start(self, args: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.workdir / log, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([*MTLSGATE, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def start_control_plane(self) -> subprocess.Popen[bytes]:
        """Every replica (one unless --replicas); returns the first."""
        env = {"MTLSGATE_XDS_DEBOUNCE_QUIET": str(self.args.debounce_quiet),
               "MTLSGATE_XDS_DEBOUNCE_MAX": str(self.args.debounce_max),
               "MTLSGATE_CONTROL_PLANE_GC": self.args.control_plane_gc}
        db = self.args.db or str(self.workdir / "store.db")
        procs = []
        for i, address in enumerate(self.addresses):
            procs.append(self.start(["control-plane", "--listen", address, "--db", db, "--insecure",
                                     "--metrics", self.metrics[i]], f"control-plane-{i}.log", env))
            host, _, port = address.rpartition(":")

            def up(host: str = host, port: str = port) -> bool:
                try:
                    socket.create_connection((host, int(port)), timeout=0.2).close()
                    return True
                except OSError:
                    return False

            wait_for(up, 30, f"control plane {address}")
        return procs[0]

    def populate(self) -> None:
        ch = self.channel
        tc = resources_pb2.TrustConfig(name="trustConfigs/demo")
        store = tc.trust_stores.add()
        store.trust_anchors.add(pem_certificate=self.pki.path("ca_cert").read_text())
        store.intermediate_cas.add(pem_certificate=self.pki.path("intermediate_cert").read_text())
        store.crls.add(pem_crl=self.pki.path("crl").read_text())
        self.trust_config = tc
        api_pb2_grpc.TrustConfigServiceStub(ch).UpdateTrustConfig(
            api_pb2.UpdateTrustConfigRequest(trust_config=tc, allow_missing=True))
        policy = resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/strict")
        policy.mtls_policy.client_validation_mode = resources_pb2.MTLSPolicy.REJECT_INVALID
        policy.mtls_policy.client_validation_trust_config = "trustConfigs/demo"
        api_pb2_grpc.ServerTlsPolicyServiceStub(ch).UpdateServerTlsPolicy(
            api_pb2.UpdateServerTlsPolicyRequest(server_tls_policy=policy, allow_missing=True))
        cert = resources_pb2.Certificate(name="certificates/edge",
                                         pem_certificate=self.pki.path("server_cert").read_text(),
                                         pem_private_key=self.pki.path("server_key").read_text())
        api_pb2_grpc.CertificateServiceStub(ch).UpdateCertificate(
            api_pb2.UpdateCertificateRequest(certificate=cert, allow_missing=True))
        lst = resources_pb2.Listener(name="listeners/strict", port=free_port("127.0.0.2"),
                                     node_selector={"zone": "a"}, certificate="certificates/edge",
                                     server_tls_policy="serverTlsPolicies/strict", backend="127.0.0.1:9")
        api_pb2_grpc.ListenerServiceStub(ch).UpdateListener(
            api_pb2.UpdateListenerRequest(listener=lst, allow_missing=True))

    def rotate_crl(self) -> float:
        """One CRL rotation through the API; returns the time the write returned."""
        self.rotation += 1
        tc = resources_pb2.TrustConfig()
        tc.CopyFrom(self.trust_config)
        tc.trust_stores[0].crls[0].pem_crl = crl_pem(make_crl(self.inter, [10_000 + self.rotation]))
        api_pb2_grpc.TrustConfigServiceStub(self.channel).UpdateTrustConfig(
            api_pb2.UpdateTrustConfigRequest(trust_config=tc, allow_missing=True))
        return time.time()

    def bundle_acks(self, cluster: str = "") -> dict[str, tuple[str, float]]:
        """node id → (acked TrustBundle version, control plane's ACK receipt time)."""
        out = {}
        nodes = [n for fleet in self.fleets
                 for n in fleet.ListNodes(api_pb2.ListNodesRequest(cluster=cluster), timeout=30).nodes if n.connected]
        for node in nodes:
            for t in node.types:
                if t.type_url == rt.TRUST_BUNDLE:
                    out[node.id] = (t.acked_version, t.last_ack_time.ToNanoseconds() / 1e9)
        return out

    def measure_rotation(self, expected: int, sims: list[SimFleet]) -> tuple[float, dict[str, float]]:
        """One rotation: (write → the last node's ACK, ACK delay per node) from the control plane's fleet."""
        before = self.bundle_acks()
        written = self.push_to_sims(sims)

        def all_acked() -> dict[str, tuple[str, float]] | None:
            now = self.bundle_acks()
            done = [i for i, (v, _) in now.items() if v and v != before.get(i, ("", 0))[0]]
            return now if len(done) >= expected else None

        acks = wait_for(all_acked, 60, "every node to ACK the rotation", interval=0.05)
        per_node = {i: at - written for i, (v, at) in acks.items() if v and v != before.get(i, ("", 0))[0]}
        return max(per_node.values()), per_node

    def push_to_sims(self, sims: list[SimFleet]) -> float:
        """One rotation; returns when the API write returned, once every simulated node received it (their
        own count: cheap, where listing 10,000 nodes would load the control plane while it pushes)."""
        seen = [set(fleet.state()["bundles"]) for fleet in sims]
        written = self.rotate_crl()
        for fleet, old in zip(sims, seen, strict=True):
            fleet.wait(lambda s, old=old, n=fleet.nodes: sum(c for v, c in s["bundles"].items() if v not in old) >= n,
                       60, "every simulated node to receive the rotation")
        return written

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def b3(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    bench = Bench(args, workdir / "b3")
    (workdir / "b3").mkdir(parents=True, exist_ok=True)
    sims = None
    try:
        bench.start_control_plane()
        bench.populate()
        for i, addr in enumerate(("127.0.0.2", "127.0.0.3")):
            server = bench.addresses[i % len(bench.addresses)]
            bench.start(["proxy", "--server", server, "--node-id", f"real-{i}", "--cluster", "real",
                         "--label", "zone=a", "--workers", "1", "--admin", f"127.0.0.1:{free_port()}",
                         "--listen-address", addr, "--cache-dir", str(bench.workdir / f"cache-{i}")],
                        f"proxy-{i}.log")
        n = len(bench.addresses)
        sims = [SimFleet(a, args.sim // n + (i < args.sim % n), f"sim{i}", procs=1).start()
                for i, a in enumerate(bench.addresses)]
        expected = args.sim + 2
        try:
            wait_for(lambda: len([v for v, _ in bench.bundle_acks().values() if v]) >= expected, 120,
                     f"{expected} nodes to ACK the initial configuration", interval=0.1)
        except SystemExit:
            acks = bench.bundle_acks()
            print(len(acks), sorted(i for i, (v, _) in acks.items() if not v)[:10], file=sys.stderr)
            for log in sorted(bench.workdir.glob("*.log")):
                print(log.name, log.read_text()[-1500:], file=sys.stderr)
            raise
        totals: list[float] = []
        per_node: list[float] = []
        real: list[float] = []
        for _ in range(args.writes):
            total, nodes = bench.measure_rotation(expected, sims)
            totals.append(total)
            per_node += nodes.values()
            real += [t for i, t in nodes.items() if i.startswith("real-")]
            time.sleep(max(0.2, args.debounce_quiet * 2))
        return {"writes": len(totals), "nodes": expected, "all_p50": pct(totals, 0.5), "all_p99": pct(totals, 0.99),
                "all_max": max(totals), "node_p50": pct(per_node, 0.5), "node_p99": pct(per_node, 0.99),
                "real_p50": pct(real, 0.5), "real_p99": pct(real, 0.99), "all_mean": statistics.mean(totals)}
    finally:
        for fleet in sims or []:
            fleet.stop()
        bench.stop()


def gc_pauses(metrics: str) -> tuple[float, float]:
    """(collections, seconds paused) so far, from the control plane's mtlsgate_control_plane_gc_pause_seconds."""
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    count = sum(float(v) for v in re.findall(r"^mtlsgate_control_plane_gc_pause_seconds_count\S* (\S+)$", text, re.M))
    total = sum(float(v) for v in re.findall(r"^mtlsgate_control_plane_gc_pause_seconds_sum\S* (\S+)$", text, re.M))
    return count, total


def b4(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    (workdir / "b4").mkdir(parents=True, exist_ok=True)
    bench = Bench(args, workdir / "b4")
    sims = None
    try:
        cp = bench.start_control_plane()
        bench.populate()
        time.sleep(0.5)
        rss_idle = rss_mb(cp.pid)
        started = time.monotonic()
        sims = SimFleet(bench.address, args.scale, "scale", procs=args.sim_procs).start()
        state = sims.wait(lambda s: s["acked"] >= args.scale or s["errors"], 600, f"{args.scale} simulated nodes to ACK")
        if state["errors"]:
            raise SystemExit(f"simulated streams failed: {state['errors']}")
        connect_all = time.monotonic() - started
        rss_connected = rss_mb(cp.pid)
        gc_before = gc_pauses(bench.metrics[0])
        pushes, cpu = [], []
        for _ in range(args.scale_writes):
            cpu_before = cpu_seconds(cp.pid)
            written = bench.push_to_sims([sims])
            pushes.append(time.time() - written)
            cpu.append(cpu_seconds(cp.pid) - cpu_before)
            time.sleep(0.3)
        rss_after = rss_mb(cp.pid)
        gc_after = gc_pauses(bench.metrics[0])
        return {"gc_pauses": gc_after[0] - gc_before[0], "gc_pause_seconds": gc_after[1] - gc_before[1],
                "gc_connect_seconds": gc_before[1], "nodes": args.scale, "rss_idle_mb": rss_idle, "rss_connected_mb": rss_connected,
                "rss_after_pushes_mb": rss_after, "per_node_kb": (rss_after - rss_idle) * 1024 / args.scale,
                "push_all_median": statistics.median(pushes), "push_cpu_median": statistics.median(cpu), "push_all_max": max(pushes), "connect_all": connect_all}
    finally:
        if sims is not None:
            sims.stop()
        bench.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim", type=int, default=200, help="simulated clients next to the 2 real nodes (B3)")
    parser.add_argument("--writes", type=int, default=30, help="CRL rotations measured (B3)")
    parser.add_argument("--scale", type=int, default=1000, help="simulated clients for B4")
    parser.add_argument("--scale-writes", type=int, default=5, help="changes pushed to all of them (B4)")
    parser.add_argument("--sim-procs", type=int, default=4, help="simulator processes for B4")
    parser.add_argument("--debounce-quiet", type=float, default=0.1, help="control plane debounce quiet period")
    parser.add_argument("--debounce-max", type=float, default=1.0, help="control plane debounce max delay")
    parser.add_argument("--quick", action="store_true", help="short run: 10 writes, 2 B4 pushes")
    parser.add_argument("--control-plane-gc", choices=["tuned", "default"], default="tuned",
                        help="the control plane's collector settings (control_plane/gc_tuning.py); "
                             "default = CPython's, for a before/after")
    parser.add_argument("--only", choices=["b3", "b4"], help="run one part")
    parser.add_argument("--replicas", type=int, default=1,
                        help="control-plane replicas for B3 (more than 1 needs PostgreSQL: --db or --postgres)")
    parser.add_argument("--db", help="the control plane's --db (default: a SQLite file in the work dir)")
    parser.add_argument("--postgres", action="store_true",
                        help="start a throwaway PostgreSQL (Debian's package, as the tests do) and use it")
    args = parser.parse_args()
    if args.replicas > 1 and not (args.postgres or (args.db or "").startswith("postgres")):
        parser.error("--replicas > 1 needs PostgreSQL: --postgres or --db postgresql://…")
    if args.replicas > 1 and args.only != "b3":
        parser.error("--replicas applies to B3 only: add --only b3")
    if args.quick:
        args.writes, args.scale_writes = 10, 2
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/convergence.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="mtlsgate-convergence-") as tmp, contextlib.ExitStack() as cleanup:
        workdir = Path(tmp)
        if args.postgres:
            from tests.postgres import start_postgres  # the tests' throwaway server (initdb in a temp dir)

            server = start_postgres()
            cleanup.callback(server.remove)
            args.db = server.dsn(server.create_database())
        if args.only in (None, "b3"):
            r = b3(args, workdir)
            where = ("one control plane" if args.replicas == 1 else
                     f"{args.replicas} replicas on PostgreSQL, writes on replica 0, nodes spread over all")
            store = "PostgreSQL" if (args.db or "").startswith("postgres") else "SQLite"
            print(f"B3 convergence ({where}; {store}), API write returned -> all {r['nodes']} nodes ACKed "
                  f"(2 real + {args.sim} simulated), {r['writes']} CRL rotations, debounce "
                  f"{args.debounce_quiet * 1000:.0f} ms quiet:")
            print(f"   all-ACKed p50 {r['all_p50'] * 1000:.0f} ms  p99 {r['all_p99'] * 1000:.0f} ms  "
                  f"max {r['all_max'] * 1000:.0f} ms;  per node p50 {r['node_p50'] * 1000:.0f} ms  "
                  f"p99 {r['node_p99'] * 1000:.0f} ms   (target p99 < 500 ms, goal < 100 ms)")
            print(f"   the 2 real nodes alone (ACK after their workers applied it): p50 {r['real_p50'] * 1000:.0f} ms"
                  f"  p99 {r['real_p99'] * 1000:.0f} ms")
        if args.only in (None, "b4"):
            r = b4(args, workdir)
            print(f"B4 one control plane, {r['nodes']} simulated nodes: RSS idle {r['rss_idle_mb']:.0f} MB, "
                  f"connected {r['rss_connected_mb']:.0f} MB, after pushes {r['rss_after_pushes_mb']:.0f} MB "
                  f"(~{r['per_node_kb']:.0f} KB/node; target < 300 MB, goal < 100 MB)")
            print(f"   all {r['nodes']} connected (every stream opened at once) and ACKed in {r['connect_all']:.1f} s")
            print(f"   push one change to all (write returned -> the last simulated node received it): median "
                  f"{r['push_all_median'] * 1000:.0f} ms, max {r['push_all_max'] * 1000:.0f} ms   (target < 1 s)")
            print(f"   control plane CPU per push (write to the last node received; what an idle core would take): "
                  f"median {r['push_cpu_median'] * 1000:.0f} ms")
            print(f"   collector ({args.control_plane_gc}): {r['gc_connect_seconds']:.2f} s paused while connecting; "
                  f"{r['gc_pauses']:.0f} collections, {r['gc_pause_seconds']:.2f} s paused during the pushes")
    print(f"command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
