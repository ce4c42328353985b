"""Revocation latency end to end (SPEC §12, B6): two real proxy nodes with revalidateOnUpdate, a real client
holding kept-alive connections on both; a CRL update on the TrustConfig revokes its serial → both
connections are closed, `mtlsgate status --revocations` shows both nodes with ACK and enforcement times,
and `mtlsgate_revocation_enforcement_seconds` counts them. A report stream that is not one of the nodes
cannot add an enforcement."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import time
import urllib.request

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from mtlsgate.v1 import reports_pb2, reports_pb2_grpc, resources_pb2

from tests.support import MTLSGATE, free_port, wait_until
from tests.workers.conftest import client_context, http_roundtrip
from tests.xds.fleet_config import certificate, rotated_crl_pem, strict_policy, trust_config

ADDRESSES = ("127.0.0.81", "127.0.0.82")


def _cert(pki, who: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.path(f"{who}_cert").read_bytes())


def _revocations(address: str) -> dict:
    out = subprocess.run([*MTLSGATE, "status", "--revocations", "--server", address, "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _histogram_count(metrics: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("mtlsgate_revocation_enforcement_seconds_count"):
                return float(line.split()[-1])
    return 0.0


def _closed(conn: ssl.SSLSocket) -> bool:
    conn.settimeout(0.05)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except (ssl.SSLError, ConnectionError):
        return True


def test_a_revoked_clients_live_connections_are_closed_on_both_nodes_and_timed(
        control_plane, api, start_node, demo_pki, echo_backend) -> None:
    api.put(trust_config(demo_pki))
    api.put(certificate(demo_pki))
    policy = strict_policy()
    policy.mtls_policy.revalidate_on_update = True
    api.put(policy)
    port = free_port()
    api.put(resources_pb2.Listener(name="listeners/edge", port=port, certificate="certificates/edge",
                                   server_tls_policy=policy.name, backend=echo_backend))
    nodes = [start_node(f"r{i}", "edge", {}, listen_address=address) for i, address in enumerate(ADDRESSES)]
    for node in nodes:
        wait_until(node.ready, timeout=20, message=f"{node.node_id} ready")

    client = client_context(demo_pki, "client")
    conns = []
    for address in ADDRESSES:
        conn = client.wrap_socket(socket.create_connection((address, port), timeout=10), server_hostname="localhost")
        assert http_roundtrip(conn)[0] == 200  # kept alive, verified before the revocation
        conns.append(conn)
    try:
        assert _revocations(control_plane.address)["revocations"] == []
        # Revoke the client's serial with a CRL update on the TrustConfig (the revoked one stays revoked).
        revoked = trust_config(demo_pki)
        revoked.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(
            demo_pki, [_cert(demo_pki, "revoked").serial_number, _cert(demo_pki, "client").serial_number])
        written = time.monotonic()
        api.put(revoked)
        wait_until(lambda: all(_closed(c) for c in conns), timeout=15, message="both live connections closed")
        print(f"both connections closed {time.monotonic() - written:.3f}s after the write returned")

        def both_enforced() -> dict | None:
            listed = _revocations(control_plane.address)["revocations"]
            if listed and all(n["enforced"] for n in listed[0]["nodes"]) and len(listed[0]["nodes"]) == 2:
                return listed[0]
            return None

        entry = wait_until(both_enforced, timeout=20, message="both nodes' enforcement in status --revocations")
    finally:
        for conn in conns:
            conn.close()
    fingerprint = hashlib.sha256(_cert(demo_pki, "client").public_bytes(Encoding.DER)).hexdigest()
    assert [name.rpartition("/")[2] for name in entry["trustConfigs"]] == ["demo"]
    assert entry["serials"] == [format(_cert(demo_pki, "client").serial_number, "x")]
    assert [n["node"] for n in entry["nodes"]] == ["r0", "r1"]
    for n in entry["nodes"]:
        assert n["acked"] and 0 <= n["enforcementSeconds"] <= n["ackSeconds"] < 10
        assert n["closed"] == 1 and n["checked"] == 1 and n["closedFingerprints"] == [fingerprint]
    assert _histogram_count(control_plane.metrics) == 2
    table = subprocess.run([*MTLSGATE, "status", "--revocations", "--server", control_plane.address],
                           capture_output=True, text=True, timeout=60)
    print(table.stdout)
    assert table.returncode == 0 and "r0" in table.stdout and "r1" in table.stdout and "1/1" in table.stdout

    # A stream that is not one of the nodes reports a revalidation of the very version they ACKed: ignored.
    version = entry["nodes"][0]["ackedVersion"]
    with grpc.insecure_channel(control_plane.address) as channel:
        forged = reports_pb2.NodeReport(node_id="ghost", sequence=1)
        forged.revalidations.add(type_url="type.googleapis.com/mtlsgate.v1.TrustBundle", version=version, closed=9)
        acks = list(reports_pb2_grpc.NodeReportServiceStub(channel).Report(iter([forged]), timeout=10))
        assert acks and acks[0].error == ""
    again = _revocations(control_plane.address)["revocations"][0]
    assert [n["node"] for n in again["nodes"]] == ["r0", "r1"] and all(n["closed"] == 1 for n in again["nodes"])
    assert _histogram_count(control_plane.metrics) == 2
