"""Node reports and the client inventory end to end (SPEC §12): two real proxy nodes report what their
workers counted; real TLS clients (valid, revoked, expired, none) connect; `mtlsgate clients` and
ClientService/ListClients list them with the right nodes, verdicts and counts, and an expired certificate
that is allowlisted is flagged."""

from __future__ import annotations

import json
import subprocess

import grpc
from cryptography import x509
from mtlsgate.v1 import reports_pb2, reports_pb2_grpc, resources_pb2

from tests.support import MTLSGATE, free_port, wait_until
from tests.workers.conftest import client_context, https_get
from tests.xds.fleet_config import certificate, trust_config


def _fingerprint(pki, who: str) -> str:
    pem = pki.path(f"{who}_cert").read_bytes()
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)).hexdigest()


def _inventory(address: str, **filters) -> dict[str, reports_pb2.ClientRecord]:
    with grpc.insecure_channel(address) as channel:
        reply = reports_pb2_grpc.ClientServiceStub(channel).ListClients(
            reports_pb2.ListClientsRequest(**filters), timeout=10)
    return {c.fingerprint_sha256: c for c in reply.clients}


def test_the_inventory_lists_every_client_the_fleet_saw(control_plane, api, start_node, demo_pki, echo_backend):
    api.put(trust_config(demo_pki))
    api.put(certificate(demo_pki))
    permissive = resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/permissive")
    permissive.mtls_policy.client_validation_mode = resources_pb2.MTLSPolicy.ALLOW_INVALID_OR_MISSING_CLIENT_CERT
    permissive.mtls_policy.client_validation_trust_config = "trustConfigs/demo"
    api.put(permissive)
    port = free_port()
    api.put(resources_pb2.Listener(name="listeners/edge", port=port, certificate="certificates/edge",
                                   server_tls_policy="serverTlsPolicies/permissive", backend=echo_backend))
    nodes = [start_node(f"n{i}", "edge", {}, listen_address=f"127.0.0.{71 + i}", extra=["--report-interval", "0.5"])
             for i in range(2)]
    for node in nodes:
        wait_until(node.ready, timeout=20, message=f"{node.node_id} ready")

    # valid and revoked through node 0 (twice each), expired and no certificate through node 1, valid on both.
    plan = [("client", 0), ("client", 0), ("revoked", 0), ("revoked", 0), ("expired", 1), (None, 1), ("client", 1)]
    for who, n in plan:
        status, _, _ = https_get(port, client_context(demo_pki, who), host=f"127.0.0.{71 + n}")
        assert status == 200  # permissive: the backend decides
    valid, revoked, expired = (_fingerprint(demo_pki, w) for w in ("client", "revoked", "expired"))
    rows = wait_until(lambda: (inv := _inventory(control_plane.address)) and {valid, revoked, expired, ""} <= set(inv)
                      and inv[valid].count == 3 and inv, timeout=20, message="all four clients in the inventory")
    assert rows[valid].verified and rows[valid].accepted and sorted(rows[valid].nodes) == ["n0", "n1"]
    assert rows[valid].subject.startswith("CN=") and rows[valid].days_to_expiry > 0
    assert not rows[revoked].verified and "revoked" in rows[revoked].error.lower() and list(rows[revoked].nodes) == ["n0"]
    assert rows[revoked].count == 2
    assert not rows[expired].verified and rows[expired].error and rows[expired].expired
    assert list(rows[expired].nodes) == ["n1"] and not rows[expired].expired_allowlisted
    assert rows[""].count == 1 and not rows[""].verified and list(rows[""].nodes) == ["n1"]
    assert set(_inventory(control_plane.address, rejected=True)) == set()  # permissive: all were accepted
    assert valid not in _inventory(control_plane.address, expiring_within_seconds=86_400)
    assert expired in _inventory(control_plane.address, expiring_within_seconds=86_400)

    # The expired certificate allowlisted: accepted from now on, and flagged.
    allowing = trust_config(demo_pki)
    allowing.allowlisted_certificates.add(pem_certificate=demo_pki.path("expired_cert").read_text().split(
        "-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    api.put(allowing)
    wait_until(lambda: _now_allowlisted(port, demo_pki, control_plane, expired), timeout=20, interval=0.3,
               message="the allowlisted expired client flagged")
    flagged = _inventory(control_plane.address)[expired]
    assert flagged.accepted and flagged.allowlisted

    out = subprocess.run([*MTLSGATE, "clients", "--server", control_plane.address, "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = {c["fingerprintSha256"]: c for c in json.loads(out.stdout)["clients"]}
    assert listed[expired]["expiredAllowlisted"] and listed[valid]["verified"]
    table = subprocess.run([*MTLSGATE, "clients", "--server", control_plane.address], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0 and "EXPIRED-ALLOWLISTED" in table.stdout and "NO-CERTIFICATE" in table.stdout


def _now_allowlisted(port, pki, control_plane, expired) -> bool:
    """Connect with the expired certificate (through node 1) until the inventory shows it allowlisted."""
    https_get(port, client_context(pki, "expired"), host="127.0.0.72")
    row = _inventory(control_plane.address).get(expired)
    return bool(row and row.expired_allowlisted)
