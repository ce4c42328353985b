"""CRL sources end to end: a control-plane process fetching from a real publisher on loopback, a proxy
node process enforcing what it fetched, TLS clients with the demo PKI's certificates. No TrustConfig is
written by a person after the first apply."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mtlsgate.v1 import api_pb2, reports_pb2, reports_pb2_grpc, resources_pb2

from control_plane.crl_sources.publisher import CrlPublisher
from control_plane.pki import DemoPki, Issued, issue, now
from tests.crl_sources.crls import signed_crl
from tests.support import free_port, wait_until
from tests.workers.conftest import RecordingBackend, client_context, http_roundtrip, https_get
from tests.xds.conftest import api, control_plane, start_node  # noqa: F401 - fixtures

MTLS = resources_pb2.MTLSPolicy


def _intermediate(pki: DemoPki) -> Issued:
    cert = x509.load_pem_x509_certificate(pki.path("intermediate_cert").read_bytes())
    key = serialization.load_pem_private_key(pki.path("intermediate_key").read_bytes(), password=None)
    return Issued(cert, key)  # type: ignore[arg-type]


def _serial(pki: DemoPki, who: str) -> int:
    return x509.load_pem_x509_certificates(pki.path(f"{who}_cert").read_bytes())[0].serial_number


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    b = RecordingBackend()
    yield b
    b.server.shutdown()


def _configure(api, pki: DemoPki, publisher_url: str, backend: str, port: int, *,  # noqa: F811
               mode: str = "REJECT_INVALID", **policy_fields: object) -> None:
    tc = resources_pb2.TrustConfig(name="trustConfigs/fetched", trust_stores=[resources_pb2.TrustStore(
        trust_anchors=[resources_pb2.TrustAnchor(pem_certificate=pki.path("ca_cert").read_text())],
        intermediate_cas=[resources_pb2.IntermediateCA(pem_certificate=pki.path("intermediate_cert").read_text())],
        crl_sources=[resources_pb2.CrlSource(uri=publisher_url, refresh_interval={"seconds": 1})])])
    api.put(tc)
    policy = resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/fetched")
    policy.mtls_policy.client_validation_mode = MTLS.ClientValidationMode.Value(mode)
    policy.mtls_policy.client_validation_trust_config = tc.name
    for key, value in policy_fields.items():
        setattr(policy.mtls_policy, key, value)
    api.put(policy)
    api.put(resources_pb2.Certificate(name="certificates/edge", pem_certificate=pki.path("server_cert").read_text(),
                                      pem_private_key=pki.path("server_key").read_text()))
    api.put(resources_pb2.Listener(name="listeners/fetched", port=port, certificate="certificates/edge",
                                   server_tls_policy=policy.name, backend=backend))


def _outcome(port: int, ctx: ssl.SSLContext) -> str:
    try:
        status, _, _ = https_get(port, ctx)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return f"refused ({type(exc).__name__})"
    return str(status)


def _status(api) -> resources_pb2.CrlSourceStatus:  # noqa: F811
    tc = api.trust_configs.GetTrustConfig(api_pb2.GetResourceRequest(name="trustConfigs/fetched"), timeout=10)
    return tc.crl_source_status[0]


@pytest.mark.slow
def test_revocation_at_the_ca_reaches_the_node_and_bad_crls_change_nothing(
        api, start_node, demo_pki: DemoPki, backend: RecordingBackend, tmp_path: Path) -> None:  # noqa: F811
    inter = _intermediate(demo_pki)
    crl_file = tmp_path / "crl.der"
    crl_file.write_bytes(signed_crl(inter, 1))
    publisher = CrlPublisher(crl_file).start()
    try:
        port = free_port()
        _configure(api, demo_pki, publisher.url, backend.address, port, revalidate_on_update=True)
        node = start_node("crl-node", "edge", {})
        client = client_context(demo_pki, "client")
        wait_until(lambda: _outcome(port, client) == "200", timeout=20, message="the valid client accepted")
        assert _status(api).crl_number == "1"
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        open_conn = client.wrap_socket(raw, server_hostname="localhost")
        assert http_roundtrip(open_conn)[0] == 200  # a kept-alive connection, verified before the revocation

        # Revoke at the CA: the publisher's file changes, nobody touches the TrustConfig.
        crl_file.write_bytes(signed_crl(inter, 2, [_serial(demo_pki, "client")]))
        revoked_at = time.monotonic()
        wait_until(lambda: _outcome(port, client).startswith("refused"), timeout=15,
                   message="the revoked client refused")
        print(f"revocation enforced {time.monotonic() - revoked_at:.2f}s after the CA published it")
        # revalidateOnUpdate: the connection opened before the revocation is closed too.
        open_conn.settimeout(10)
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            assert open_conn.recv(1) == b""
        open_conn.close()
        # B6: the fetched CRL is a revocation the control plane timed on the node, its live connection closed.
        serial = format(_serial(demo_pki, "client"), "x")

        def timed() -> reports_pb2.RevocationRecord | None:
            reply = reports_pb2_grpc.RevocationServiceStub(api.channel).ListRevocations(
                reports_pb2.ListRevocationsRequest(), timeout=10)
            return next((r for r in reply.revocations if serial in r.serials and r.nodes
                         and r.nodes[0].HasField("enforced_time")), None)

        record = wait_until(timed, timeout=15, message="the fetched CRL's revocation timed on the node")
        # every live connection of the revoked client closed: the one opened above, and a probe of the
        # polling loop too when one was still open at that moment (so 1 or 2, and never fewer than checked)
        enforced = record.nodes[0]
        assert [n.node_id for n in record.nodes] == [node.node_id] and 1 <= enforced.closed == enforced.checked, \
            enforced
        # The fetch's own status write follows the CRL's; the first is pushed at once (leading edge), so
        # take the versions once the fetch is recorded and the node has ACKed what the control plane serves.
        wait_until(lambda: _status(api).crl_number == "2"
                   and api.nodes()[node.node_id].state == api_pb2.SyncState.SYNCED, timeout=15,
                   message="the node SYNCED on the fetched CRL")
        bundle_version = node.dump()["versions"]

        # A CRL signed by another key, then a replayed older one: refused, the node gets nothing new.
        crl_file.write_bytes(signed_crl(inter, 3, signer=issue("impostor", ca=True)))
        wait_until(lambda: _status(api).last_error_reason == "wrong_signature", timeout=15,
                   message="the wrong-key CRL refused by name")
        crl_file.write_bytes(signed_crl(inter, 1))
        wait_until(lambda: _status(api).last_error_reason == "crl_number_rollback", timeout=15,
                   message="the replayed CRL refused by name")
        assert node.dump()["versions"] == bundle_version
        assert _outcome(port, client).startswith("refused")  # the last good CRL is still enforced
        assert _status(api).crl_number == "2"
    finally:
        publisher.stop()


@pytest.mark.slow
def test_require_fresh_crl_when_the_ca_stops_publishing(
        api, start_node, demo_pki: DemoPki, backend: RecordingBackend, tmp_path: Path) -> None:  # noqa: F811
    inter = _intermediate(demo_pki)
    crl_file = tmp_path / "crl.der"
    start = now() - dt.timedelta(seconds=1)
    # The CA's last CRL: valid for a few seconds more, then it stops publishing (the file never changes).
    crl_file.write_bytes(signed_crl(inter, 1, this_update=start, next_update=start + dt.timedelta(seconds=15)))
    publisher = CrlPublisher(crl_file).start()
    try:
        port = free_port()
        _configure(api, demo_pki, publisher.url, backend.address, port, mode="ALLOW_INVALID_OR_MISSING_CLIENT_CERT",
                   require_fresh_crl=True)
        start_node("fresh-node", "edge", {})
        client = client_context(demo_pki, "client")

        def verdict() -> dict[str, str]:
            _, _, body = https_get(port, client)
            return json.loads(body)["headers"]

        wait_until(lambda: verdict().get("x-client-cert-chain-verified") == "true", timeout=14,
                   message="the valid client verified while the CRL is fresh")
        stale = wait_until(lambda: (v := verdict()).get("x-client-cert-error") == "client_cert_crl_stale" and v,
                           timeout=30, message="the client refused once the CRL passed nextUpdate")
        assert stale["x-client-cert-chain-verified"] == "false"
        status = _status(api)
        assert "expired" in status.problem and "stopped publishing" in status.problem
        assert status.last_error_reason == ""  # the source answers; what it serves is old
    finally:
        publisher.stop()
