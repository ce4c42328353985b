"""CRL source benchmark (SPEC §13): a 500,000-entry CRL (CA Service's published maximum) fetched by a real
control plane from a real publisher on loopback, validated, written, pushed to a real proxy node and
compiled there. Prints the time of each stage and the node's memory before and after.

    .venv/bin/python bench/crl_sources.py [--serials 500000] [--workers 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from mtlsgate.v1 import api_pb2, api_pb2_grpc, resources_pb2

from control_plane.crl_sources.publisher import CrlPublisher
from control_plane.pki import Issued, init_demo_pki, now

MTLSGATE = [sys.executable, "-m", "control_plane.cli.main"]
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def crl(issuer: Issued, number: int, serials: int) -> bytes:
    start = now() - dt.timedelta(minutes=1)
    # 20-byte serials as CAs issue them (RFC 5280's maximum): the largest entries a real CRL has. The list
    # goes to the builder's constructor: add_revoked_certificate copies the list each time (quadratic).
    revoked = [x509.RevokedCertificateBuilder().serial_number((0x4D << 152) | (i * 2654435761 + 1))
               .revocation_date(start).build() for i in range(serials)]
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.cert.subject, last_update=start, next_update=start + dt.timedelta(days=7),
        extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number))],
        revoked_certificates=revoked)
    return builder.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def rss_kib(pid: int) -> int:
    """RSS of a process and all its descendants (the node's supervisor and its workers)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1])
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        total += sum(rss_kib(int(c)) for c in children)
    return total


def wait(condition, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if condition():
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(0.1)  # each poll reads a TrustConfig holding a 20 MB CRL: do not load the server under test
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serials", type=int, default=500_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mtlsgate-crl-bench-"))
    pki = init_demo_pki(work / "pki")
    inter = Issued(x509.load_pem_x509_certificate(pki.path("intermediate_cert").read_bytes()),
                   serialization.load_pem_private_key(pki.path("intermediate_key").read_bytes(), None))  # type: ignore[arg-type]
    t = time.perf_counter()
    big = crl(inter, 2, args.serials)
    print(f"generated a {args.serials:,}-entry CRL: {len(big) / 1e6:.1f} MB DER in {time.perf_counter() - t:.1f}s")
    crl_file = work / "crl.der"
    crl_file.write_bytes(crl(inter, 1, 0))
    publisher = CrlPublisher(crl_file).start()

    address, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    logs = [open(work / name, "wb") for name in ("control-plane.log", "proxy.log")]  # noqa: SIM115
    cp = subprocess.Popen([*MTLSGATE, "control-plane", "--insecure", "--listen", address, "--db",
                           str(work / "store.db")], stdout=logs[0], stderr=subprocess.STDOUT, cwd=ROOT)
    node = subprocess.Popen([*MTLSGATE, "proxy", "--server", address, "--node-id", "bench",
                             "--admin", admin, "--workers", str(args.workers), "--listen-address", "127.0.0.1",
                             "--cache-dir", str(work / "cache")],
                            stdout=logs[1], stderr=subprocess.STDOUT, cwd=ROOT)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    tcs = api_pb2_grpc.TrustConfigServiceStub(channel)
    try:
        wait(lambda: grpc.channel_ready_future(channel).result(timeout=1) is None, 30, "the control plane")
        tc = resources_pb2.TrustConfig(name="trustConfigs/big", trust_stores=[resources_pb2.TrustStore(
            trust_anchors=[resources_pb2.TrustAnchor(pem_certificate=pki.path("ca_cert").read_text())],
            intermediate_cas=[resources_pb2.IntermediateCA(pem_certificate=pki.path("intermediate_cert").read_text())],
            crl_sources=[resources_pb2.CrlSource(uri=publisher.url, refresh_interval={"seconds": 2})])])
        tcs.UpdateTrustConfig(api_pb2.UpdateTrustConfigRequest(trust_config=tc, allow_missing=True), timeout=30)
        policy = resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/big")
        policy.mtls_policy.client_validation_mode = resources_pb2.MTLSPolicy.REJECT_INVALID
        policy.mtls_policy.client_validation_trust_config = tc.name
        api_pb2_grpc.ServerTlsPolicyServiceStub(channel).UpdateServerTlsPolicy(
            api_pb2.UpdateServerTlsPolicyRequest(server_tls_policy=policy, allow_missing=True), timeout=30)
        api_pb2_grpc.CertificateServiceStub(channel).UpdateCertificate(api_pb2.UpdateCertificateRequest(
            certificate=resources_pb2.Certificate(name="certificates/edge",
                                                  pem_certificate=pki.path("server_cert").read_text(),
                                                  pem_private_key=pki.path("server_key").read_text()),
            allow_missing=True), timeout=30)
        api_pb2_grpc.ListenerServiceStub(channel).UpdateListener(api_pb2.UpdateListenerRequest(
            listener=resources_pb2.Listener(name="listeners/big", port=free_port(), certificate="certificates/edge",
                                            server_tls_policy=policy.name, backend="127.0.0.1:9"),
            allow_missing=True), timeout=30)

        def number() -> str:
            got = tcs.GetTrustConfig(api_pb2.GetResourceRequest(name=tc.name), timeout=30)
            return got.crl_source_status[0].crl_number if got.crl_source_status else ""

        def node_bundle() -> dict:
            with urllib.request.urlopen(f"http://{admin}/config_dump", timeout=10) as r:
                dump = json.loads(r.read())
            return {"versions": dump.get("versions", {}), "bundles": dump.get("bundles", [])}

        wait(lambda: number() == "1", 60, "the small CRL fetched")
        first = wait(lambda: node_bundle()["versions"] and node_bundle()["bundles"], 60, "the node configured")
        time.sleep(1.0)  # let the node settle before measuring its memory (a measurement, not a synchronisation)
        before = node_bundle()["versions"]
        rss_before, cp_before = rss_kib(node.pid), rss_kib(cp.pid)
        revision_before = len(publisher.requests)

        crl_file.write_bytes(big)
        published = time.monotonic()
        fetched = wait(lambda: number() == "2", 300, "the big CRL fetched and written")
        wait(lambda: node_bundle()["versions"] != before, 300, "the node applied it")
        t_applied = time.monotonic() - published
        time.sleep(1.0)
        rss_after, cp_after = rss_kib(node.pid), rss_kib(cp.pid)
        audit = api_pb2_grpc.AuditServiceStub(channel).ListAuditEntries(
            api_pb2.ListAuditEntriesRequest(resource_name=tc.name, page_size=1000), timeout=30).entries
        revisions = len(audit)
        wait(lambda: len(publisher.requests) > revision_before + 5, 60, "five more fetches of the same CRL")
        unchanged = len(api_pb2_grpc.AuditServiceStub(channel).ListAuditEntries(
            api_pb2.ListAuditEntriesRequest(resource_name=tc.name, page_size=1000), timeout=30).entries) == revisions
        print(f"node configured {first:.1f}s after the first apply")
        print(f"publish → control plane fetched, validated, wrote revision: {fetched:.2f}s")
        print(f"publish → node applied the new TrustBundle (compiled by the supervisor and {args.workers} "
              f"worker(s)): {t_applied:.2f}s")
        print(f"node RSS (supervisor + workers): {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after "
              f"(+{(rss_after - rss_before) / 1024:.0f} MiB)")
        print(f"control plane RSS: {cp_before / 1024:.0f} MiB before, {cp_after / 1024:.0f} MiB after")
        print(f"re-fetches of the unchanged CRL wrote no revision: {unchanged} "
              f"({sum(1 for r in publisher.requests if r[3] == 304)} answered 304)")
    finally:
        for proc in (node, cp):
            proc.terminate()
        for proc in (node, cp):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        publisher.stop()
        print(f"logs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
