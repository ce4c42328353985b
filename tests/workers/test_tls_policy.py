"""SPEC §4 on the wire: a real WorkerPool (2 worker processes) terminating TLS for real clients."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from control_plane.pki import DemoPki
from data_plane.validation import engine
from data_plane.validation.bundle import compile_bundle, trust_bundle_from_trust_config
from data_plane.validation.policy import compile_policy
from tests.support import free_port, wait_until
from tests.workers.conftest import (
    PoolHarness,
    RecordingBackend,
    client_context,
    echoed_headers,
    https_get,
    listener,
    node_config,
    policy,
    trust_config,
)


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {name: free_port() for name in ("strict", "http", "permissive", "plain")}


@pytest.fixture(scope="module")
def configured(harness: PoolHarness, backend: RecordingBackend, demo_pki: DemoPki, ports: dict[str, int]) -> PoolHarness:
    listeners = [
        listener("strict", ports["strict"], backend.address, policy("REJECT_INVALID")),
        listener("http", ports["http"], backend.address, policy("REJECT_INVALID", reject_at=2)),
        listener("permissive", ports["permissive"], backend.address, policy("ALLOW_INVALID_OR_MISSING_CLIENT_CERT")),
        listener("plain", ports["plain"], backend.address, None),
    ]
    harness.apply(node_config(demo_pki, listeners))
    return harness


def test_valid_client_reaches_backend_with_verified_headers(configured: PoolHarness, demo_pki: DemoPki,
                                                            ports: dict[str, int]) -> None:
    status, _, body = https_get(ports["strict"], client_context(demo_pki, "client"))
    assert status == 200
    seen = echoed_headers(body)
    assert seen["x-client-cert-chain-verified"] == "true"
    assert seen["x-client-cert-present"] == "true"
    assert seen["x-client-cert-error"] == ""
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-for"] == "127.0.0.1"


def _engine_alert(pki: DemoPki, who: str) -> str:
    """The alert the validation engine picks for this client's chain as sent (the proxy must send it)."""
    chain = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pki.path(f"{who}_cert").read_bytes())]
    bundle = compile_bundle(trust_bundle_from_trust_config(trust_config(pki)))
    verdict = engine.validate(chain, bundle, compile_policy(policy()), dt.datetime.now(dt.UTC))
    alert = engine.tls_alert(verdict)
    assert alert is not None
    return alert.name


@pytest.mark.parametrize(("who", "alert"), [
    (None, "CERTIFICATE_REQUIRED"),
    ("untrusted", "engine"),
    ("expired", "CERTIFICATE_EXPIRED"),
    ("revoked", "CERTIFICATE_REVOKED"),
    ("wrong_eku", "UNSUPPORTED_CERTIFICATE"),
])
def test_reject_invalid_fails_handshake_with_matching_alert(configured: PoolHarness, backend: RecordingBackend,
                                                            demo_pki: DemoPki, ports: dict[str, int],
                                                            who: str | None, alert: str) -> None:
    before = len(backend.seen)
    # untrusted: the engine's error for this chain has varied while it evolves; the alert must be one a
    # trust failure maps to (or exactly what the engine picks for the chain now)
    alerts = {alert} if alert != "engine" else {"UNKNOWN_CA", "BAD_CERTIFICATE", _engine_alert(demo_pki, str(who))}
    with pytest.raises(ssl.SSLError) as info:
        https_get(ports["strict"], client_context(demo_pki, who))
    assert any(a in str(info.value) for a in alerts), (alerts, info.value)
    assert len(backend.seen) == before


def test_tls12_client_without_certificate_gets_handshake_failure(configured: PoolHarness, demo_pki: DemoPki,
                                                                 ports: dict[str, int]) -> None:
    with pytest.raises(ssl.SSLError) as info:
        https_get(ports["strict"], client_context(demo_pki, None, tls12=True))
    assert "HANDSHAKE_FAILURE" in str(info.value)


@pytest.mark.parametrize(("who", "status", "error"), [
    (None, 496, "client_cert_not_provided"),
    ("expired", 495, "client_cert_validation_failed"),
    ("revoked", 495, "client_cert_revoked"),
])
def test_reject_at_http_answers_495_496(configured: PoolHarness, backend: RecordingBackend, demo_pki: DemoPki,
                                        ports: dict[str, int], who: str | None, status: int, error: str) -> None:
    before = len(backend.seen)
    got, _, body = https_get(ports["http"], client_context(demo_pki, who))
    assert got == status
    assert error in body.decode()
    assert len(backend.seen) == before


def test_allow_mode_forwards_missing_and_untrusted(configured: PoolHarness, demo_pki: DemoPki,
                                                   ports: dict[str, int]) -> None:
    _, _, body = https_get(ports["permissive"], client_context(demo_pki, None))
    seen = echoed_headers(body)
    assert (seen["x-client-cert-present"], seen["x-client-cert-chain-verified"]) == ("false", "false")
    assert seen["x-client-cert-error"] == "client_cert_not_provided"
    _, _, body = https_get(ports["permissive"], client_context(demo_pki, "untrusted"))
    seen = echoed_headers(body)
    assert (seen["x-client-cert-present"], seen["x-client-cert-chain-verified"]) == ("true", "false")
    assert seen["x-client-cert-error"].startswith("client_cert_validation_")  # the engine names the failure
    assert seen["x-client-cert-leaf"] == ""  # leaf/chain only when verified


def test_spoofed_client_headers_are_replaced(configured: PoolHarness, demo_pki: DemoPki, ports: dict[str, int]) -> None:
    spoof = {"X-Client-Cert-Chain-Verified": "true", "x-client-cert-present": "true",
             "X-Forwarded-Client-Cert": "Hash=evil", "X-Client-Cert-Error": ""}
    _, _, body = https_get(ports["permissive"], client_context(demo_pki, None), headers=spoof)
    seen = echoed_headers(body)
    assert seen["x-client-cert-chain-verified"] == "false"
    assert seen["x-client-cert-present"] == "false"
    assert "x-forwarded-client-cert" not in seen
    _, _, body = https_get(ports["plain"], client_context(demo_pki, None), headers=spoof)
    seen = echoed_headers(body)
    assert "x-client-cert-chain-verified" not in seen and "x-forwarded-client-cert" not in seen


def test_plain_tls_listener_sends_no_certificate_request(configured: PoolHarness, demo_pki: DemoPki,
                                                         ports: dict[str, int]) -> None:
    status, _, body = https_get(ports["plain"], client_context(demo_pki, "client"))
    assert status == 200
    assert "x-client-cert-present" not in echoed_headers(body)


def test_config_dump_shows_each_worker(configured: PoolHarness) -> None:
    status = wait_until(lambda: all(w.get("version") for w in configured.pool.worker_status())
                        and configured.pool.worker_status(), message="workers report their version")
    assert len(status) == 2
    assert {w["version"] for w in status} == {configured.pool.running_version()}
    assert "listeners/strict" in status[0]["listeners"]
    assert "key" not in repr(status).lower().replace("private_key_sha256", "")


def test_rejections_without_a_certificate_are_counted_as_such(configured: PoolHarness, demo_pki: DemoPki,
                                                              ports: dict[str, int]) -> None:
    with pytest.raises(ssl.SSLError):
        https_get(ports["strict"], client_context(demo_pki, None))

    def not_provided() -> float:
        totals = configured.in_loop(lambda: configured.pool.metrics.totals())
        return totals[("mtlsgate_handshakes_total", ("listeners/strict", "rejected", "client_cert_not_provided"))]

    wait_until(lambda: not_provided() >= 1, message="a missing certificate counted as client_cert_not_provided")
