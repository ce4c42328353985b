"""Revocation latency benchmark (SPEC §10 B6): a real control plane, 2 real proxy nodes whose strict listener
has `revalidateOnUpdate`, and for each of `--revocations` rounds a fresh client certificate holding
`--connections` kept-alive mTLS connections on each node; a CRL update on the TrustConfig (an API write)
revokes its serial.

Per revocation, three views of the same path:
- the control plane's own record (`mtlsgate status --revocations`, RevocationService): publication (the
  store write) → each node's ACK of a TrustBundle carrying it → each node's RevalidationDone (its workers
  re-judged and closed the live connections), and the `mtlsgate_revocation_enforcement_seconds` histogram;
- the client's view: the API write returning → every one of the client's live connections reads EOF;
- after each round, a new handshake of the revoked client to each node is checked to be refused.
p50/p99 over revocations of the slowest node, and per node (with 30 revocations p99 is the largest). Run: `.venv/bin/python bench/revocation.py`.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from mtlsgate.v1 import api_pb2, api_pb2_grpc, reports_pb2, reports_pb2_grpc, resources_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.convergence import free_port, pct, wait_for
from control_plane.pki import Issued, crl_pem, init_demo_pki, issue, make_crl

ROOT = Path(__file__).resolve().parents[1]
MTLSGATE = [sys.executable, "-m", "control_plane.cli.main"]
NODE_ADDRESSES = ("127.0.0.2", "127.0.0.3")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.args = args
        self.workdir = workdir
        self.pki = init_demo_pki(workdir / "pki")
        self.inter = Issued(x509.load_pem_x509_certificate(self.pki.path("intermediate_cert").read_bytes()),
                            serialization.load_pem_private_key(self.pki.path("intermediate_key").read_bytes(), None))
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.port = free_port(NODE_ADDRESSES[0])
        self.procs: list[subprocess.Popen[bytes]] = []
        self.channel = grpc.insecure_channel(self.address)
        self.revoked: list[int] = []

    def start(self, args: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.workdir / log, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([*MTLSGATE, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def start_all(self, backend: str) -> None:
        self.start(["control-plane", "--listen", self.address, "--db", str(self.workdir / "store.db"), "--insecure",
                    "--metrics", self.metrics], "control-plane.log")
        host, _, port = self.address.rpartition(":")
        wait_for(lambda: _port_open(host, int(port)), 30, "the control plane")
        self.trust_config = resources_pb2.TrustConfig(name="trustConfigs/demo")
        store = self.trust_config.trust_stores.add()
        store.trust_anchors.add(pem_certificate=self.pki.path("ca_cert").read_text())
        store.intermediate_cas.add(pem_certificate=self.pki.path("intermediate_cert").read_text())
        store.crls.add(pem_crl=crl_pem(make_crl(self.inter, [])))
        self._put_trust_config(self.trust_config)
        policy = resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/strict")
        policy.mtls_policy.client_validation_mode = resources_pb2.MTLSPolicy.REJECT_INVALID
        policy.mtls_policy.client_validation_trust_config = "trustConfigs/demo"
        policy.mtls_policy.revalidate_on_update = True
        api_pb2_grpc.ServerTlsPolicyServiceStub(self.channel).UpdateServerTlsPolicy(
            api_pb2.UpdateServerTlsPolicyRequest(server_tls_policy=policy, allow_missing=True), timeout=10)
        cert = resources_pb2.Certificate(name="certificates/edge",
                                         pem_certificate=self.pki.path("server_cert").read_text(),
                                         pem_private_key=self.pki.path("server_key").read_text())
        api_pb2_grpc.CertificateServiceStub(self.channel).UpdateCertificate(
            api_pb2.UpdateCertificateRequest(certificate=cert, allow_missing=True), timeout=10)
        listener = resources_pb2.Listener(name="listeners/strict", port=self.port, certificate="certificates/edge",
                                          server_tls_policy="serverTlsPolicies/strict", backend=backend)
        api_pb2_grpc.ListenerServiceStub(self.channel).UpdateListener(
            api_pb2.UpdateListenerRequest(listener=listener, allow_missing=True), timeout=10)
        for i, addr in enumerate(NODE_ADDRESSES):
            self.start(["proxy", "--server", self.address, "--node-id", f"real-{i}", "--cluster", "real",
                        "--workers", str(self.args.workers), "--admin", f"127.0.0.1:{free_port()}",
                        "--listen-address", addr, "--cache-dir", str(self.workdir / f"cache-{i}")], f"proxy-{i}.log")
        for addr in NODE_ADDRESSES:
            wait_for(lambda addr=addr: _port_open(addr, self.port), 60, f"the listener on {addr}", interval=0.1)

    def _put_trust_config(self, tc: resources_pb2.TrustConfig) -> None:
        api_pb2_grpc.TrustConfigServiceStub(self.channel).UpdateTrustConfig(
            api_pb2.UpdateTrustConfigRequest(trust_config=tc, allow_missing=True), timeout=10)

    def client(self, n: int) -> tuple[ssl.SSLContext, int]:
        leaf = issue(f"b6-client-{n}", issuer=self.inter)
        cert, key = self.workdir / f"client-{n}.pem", self.workdir / f"client-{n}-key.pem"
        cert.write_text(leaf.cert_pem + self.inter.cert_pem)
        key.write_text(leaf.key_pem)
        ctx = ssl.create_default_context(cafile=str(self.pki.path("ca_cert")))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx, leaf.cert.serial_number

    def revoke(self, serial: int) -> float:
        """The API write revoking `serial` (the earlier ones stay revoked); returns when it returned."""
        self.revoked.append(serial)
        tc = resources_pb2.TrustConfig()
        tc.CopyFrom(self.trust_config)
        tc.trust_stores[0].crls[0].pem_crl = crl_pem(make_crl(self.inter, self.revoked))
        self._put_trust_config(tc)
        return time.time()

    def record(self, serial: int) -> reports_pb2.RevocationRecord | None:
        response = reports_pb2_grpc.RevocationServiceStub(self.channel).ListRevocations(
            reports_pb2.ListRevocationsRequest(limit=5), timeout=10)
        for record in response.revocations:
            if format(serial, "x") in record.serials:
                return record
        return None

    def histogram(self) -> tuple[float, float]:
        count = total = 0.0
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("mtlsgate_revocation_enforcement_seconds_count"):
                    count = float(line.split()[-1])
                elif line.startswith("mtlsgate_revocation_enforcement_seconds_sum"):
                    total = float(line.split()[-1])
        return count, total

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _request(conn: ssl.SSLSocket) -> int:
    conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return int(head.split(b" ", 2)[1])


def _watch_eof(conns: list[ssl.SSLSocket], timeout: float) -> dict[int, float]:
    """Block until every connection reads EOF (or an error): index → the wall-clock time it did."""
    sel = selectors.DefaultSelector()
    for i, conn in enumerate(conns):
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, i)
    closed: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(closed) < len(conns) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            try:
                data = key.fileobj.recv(1)  # type: ignore[union-attr]
            except ssl.SSLWantReadError:
                continue
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                closed[key.data] = time.time()
                sel.unregister(key.fileobj)
    sel.close()
    return closed


def _refused(ctx: ssl.SSLContext, address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return _request(tls) >= 400
    except (ssl.SSLError, OSError):
        return True


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    from data_plane import echo_backend as echo

    backend = echo.EchoServer(("127.0.0.1", free_port()), echo.EchoHandler)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    bench = Bench(args, workdir)
    rows = []
    try:
        bench.start_all(f"127.0.0.1:{backend.server_address[1]}")
        load_before = os.getloadavg()
        for n in range(args.revocations):
            ctx, serial = bench.client(n)
            conns = []
            for addr in NODE_ADDRESSES:
                for _ in range(args.connections):
                    conn = ctx.wrap_socket(socket.create_connection((addr, bench.port), timeout=10),
                                           server_hostname="localhost")
                    if _request(conn) != 200:
                        raise SystemExit(f"the client was not let through on {addr} before the revocation")
                    conns.append(conn)
            written = bench.revoke(serial)
            closed = _watch_eof(conns, 30)
            if len(closed) != len(conns):
                raise SystemExit(f"revocation {n}: {len(conns) - len(closed)} live connection(s) never closed")
            record = wait_for(lambda serial=serial: (r := bench.record(serial)) and len(r.nodes) == 2
                              and all(x.HasField("enforced_time") for x in r.nodes) and r, 30,
                              f"revocation {n} enforced on both nodes in status --revocations", interval=0.02)
            visible = time.time()  # both nodes' RevalidationDone had reached the control plane by now
            for addr in NODE_ADDRESSES:
                if not _refused(ctx, addr, bench.port):
                    raise SystemExit(f"revocation {n}: {addr} still lets the revoked client in")
            for conn in conns:
                conn.close()
            published = record.publish_time.ToNanoseconds() / 1e9
            rows.append({
                "ack": {x.node_id: x.ack_seconds for x in record.nodes},
                "enforced": {x.node_id: x.enforcement_seconds for x in record.nodes},
                "closed": {x.node_id: x.closed for x in record.nodes},
                "client_from_write": max(closed.values()) - written,
                "client_from_publication": max(closed.values()) - published,
                "visible": visible - published,
            })
            time.sleep(args.pause)
        load_after = os.getloadavg()
        count, total = bench.histogram()
        return {"rows": rows, "load": (load_before, load_after), "histogram": (count, total)}
    finally:
        bench.stop()
        backend.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revocations", type=int, default=30, help="revocations measured")
    parser.add_argument("--connections", type=int, default=2, help="kept-alive connections per node per client")
    parser.add_argument("--workers", type=int, default=2, help="workers per proxy node")
    parser.add_argument("--pause", type=float, default=1.0,
                        help="seconds between revocations (the node's reports: a burst of 5, then 1/s)")
    args = parser.parse_args()
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/revocation.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="mtlsgate-revocation-") as tmp:
        r = run(args, Path(tmp))
    rows = r["rows"]
    slowest_enforced = [max(x["enforced"].values()) for x in rows]
    slowest_ack = [max(x["ack"].values()) for x in rows]
    per_node = [v for x in rows for v in x["enforced"].values()]
    client = [x["client_from_publication"] for x in rows]
    client_write = [x["client_from_write"] for x in rows]
    visible = [x["visible"] for x in rows]
    closed = sum(v for x in rows for v in x["closed"].values())
    count, total = r["histogram"]
    (b1, b5, b15), (a1, a5, a15) = r["load"]

    def ms(values: list[float]) -> str:
        return f"p50 {pct(values, 0.5) * 1000:.0f} ms  p99 {pct(values, 0.99) * 1000:.0f} ms  max {max(values) * 1000:.0f} ms"

    print(f"B6 revocation latency: {len(rows)} revocations (CRL update through the API), 2 real nodes "
          f"({args.workers} workers each, revalidateOnUpdate), {args.connections} kept-alive connections of the "
          f"revoked client per node:")
    print(f"   publication -> both nodes enforced (status --revocations, slowest node): {ms(slowest_enforced)}"
          "   (target p99 < 1 s, goal < 250 ms)")
    print(f"   publication -> both nodes ACKed:                                     {ms(slowest_ack)}")
    print(f"   per node, publication -> enforced:                                  {ms(per_node)}")
    print(f"   client's view, publication -> its last live connection closed:      {ms(client)}")
    print(f"   client's view, API write returned -> its last live connection closed: {ms(client_write)}")
    print(f"   publication -> both enforcements visible in status --revocations (polled every 20 ms): {ms(visible)}")
    print(f"   live connections closed by revalidation: {closed} of {len(rows) * 2 * args.connections}; "
          f"new handshakes of each revoked client refused by both nodes: {len(rows)} of {len(rows)}")
    print(f"   mtlsgate_revocation_enforcement_seconds: count {count:.0f}, mean {total / max(count, 1) * 1000:.0f} ms")
    print(f"   load average before {b1:.2f} {b5:.2f} {b15:.2f}, after {a1:.2f} {a5:.2f} {a15:.2f} "
          f"({os.cpu_count()} cores)")
    print(f"command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
