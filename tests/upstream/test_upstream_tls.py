"""Upstream TLS (SPEC §15, issue 16 part 4) below the node: the pure verdict on a backend chain
(data_plane/upstream/tls.py) and the worker's TLS client (data_plane/workers/upstream_tls.py) against real
TLS backends on loopback — as an attacker would set them up: a wrong SAN, a revoked certificate, a
certificate from another root, a client-auth-only certificate, a backend that never answers the hello."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from mtlsgate.v1 import backends_pb2, xds_pb2

from control_plane.pki import issue, make_crl
from data_plane.http.bounds import from_environment
from data_plane.upstream import tls as upstream_tls
from data_plane.upstream.health import HealthPolicy
from data_plane.validation.bundle import compile_bundle, trust_bundle_from_trust_config
from data_plane.workers.backend import BackendPool
from data_plane.workers.health_checks import probe
from data_plane.workers.upstream_tls import BackendTlsRefused, UpstreamTls, upstream_tls_for
from tests.support import free_port
from tests.upstream.tls_backends import TlsBackend, expired, server_cert
from tests.validation.conftest import trust_config

CHECK = HealthPolicy(path="/healthz", interval=5.0, timeout=3.0)


class Pki:
    def __init__(self) -> None:
        self.root = issue("Backend Root", ca=True)
        self.other_root = issue("Someone Else's Root", ca=True)
        self.client_root = issue("Proxy Client Root", ca=True)
        self.proxy = issue("mtlsgate proxy", issuer=self.client_root, dns=("proxy.internal",))
        self.good = server_cert(self.root)
        self.revoked = server_cert(self.root)
        self.crl = make_crl(self.root, [self.revoked.cert.serial_number])


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[TlsBackend]]:
    made: list[TlsBackend] = []
    yield made
    for backend in made:
        backend.stop()


def _tls(pki: Pki, *, client_cert: bool = True, crl: bool = True, sni: str = "", sans: tuple[str, ...] = (),
         roots: int = 0) -> UpstreamTls:
    tc = trust_config(anchors=[pki.root], crls=[pki.crl] if crl else [], name="trustConfigs/backends")
    bundles = {"trustConfigs/backends": compile_bundle(trust_bundle_from_trust_config(tc))}
    service = backends_pb2.BackendService(name="backendServices/app")
    service.tls_settings.sni = sni
    service.tls_settings.subject_alt_names.extend(sans)
    auth = service.resolved_backend_authentication
    auth.trust_config = "trustConfigs/backends"
    auth.well_known_roots = roots or backends_pb2.BackendAuthenticationConfig.NONE
    service.backend_authentication = "backendAuthenticationConfigs/a"
    certificates = {}
    if client_cert:
        auth.client_certificate = "certificates/proxy"
        certificates["certificates/proxy"] = xds_pb2.ServerCertificate(
            name="certificates/proxy", pem_certificate_chain=pki.proxy.cert_pem, pem_private_key=pki.proxy.key_pem)
    tls = upstream_tls_for("backendServices/app", service, certificates, bundles)
    assert tls is not None
    return tls


def _probe(backend: TlsBackend, tls: UpstreamTls) -> tuple[bool, str]:
    return asyncio.run(probe(backend.address, CHECK, tls))


# ---------------------------------------------------------------- the pure verdict


def test_judge_uses_the_engine_with_server_auth_and_checks_names(pki: Pki) -> None:
    bundle = compile_bundle(trust_bundle_from_trust_config(
        trust_config(anchors=[pki.root], crls=[pki.crl])))
    now = dt.datetime.now(dt.UTC)
    ok = upstream_tls.judge([pki.good.der], [bundle], ("backend.internal",), now)
    assert ok.ok, ok
    assert upstream_tls.judge([pki.good.der], [bundle], ("127.0.0.1",), now).ok
    assert upstream_tls.judge([pki.revoked.der], [bundle], ("backend.internal",), now).error == "backend_cert_revoked"
    assert upstream_tls.judge([pki.good.der], [bundle], ("other.internal",), now).error == upstream_tls.SAN_MISMATCH
    assert upstream_tls.judge([pki.good.der], [bundle], ("10.0.0.1",), now).error == upstream_tls.SAN_MISMATCH
    stranger = server_cert(pki.other_root)
    refused = upstream_tls.judge([stranger.der], [bundle], ("backend.internal",), now)
    assert (refused.error, refused.reason) == ("backend_cert_validation_failed", "unknown_issuer")
    # a client certificate (clientAuth EKU only) is no server certificate
    client_only = server_cert(pki.root, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    assert upstream_tls.judge([client_only.der], [bundle], ("backend.internal",), now).error == \
        "backend_cert_chain_invalid_eku"
    assert upstream_tls.judge([expired(pki.root).der], [bundle], ("backend.internal",), now).reason == "expired"
    # a wildcard certificate covers one label; the CN is never a name
    wild = server_cert(pki.root, dns=("*.svc.internal",), ips=())
    assert upstream_tls.judge([wild.der], [bundle], ("api.svc.internal",), now).ok
    assert not upstream_tls.judge([wild.der], [bundle], ("a.b.svc.internal",), now).ok
    assert not upstream_tls.judge([wild.der], [bundle], ("backend",), now).ok
    # a second bundle (public roots) is asked only when the first does not know the issuer: a revocation stands
    other = compile_bundle(trust_bundle_from_trust_config(trust_config(anchors=[pki.root], name="trustConfigs/b")))
    assert upstream_tls.judge([pki.revoked.der], [bundle, other], ("backend.internal",), now).error == \
        "backend_cert_revoked"
    assert upstream_tls.judge([stranger.der], [
        bundle, compile_bundle(trust_bundle_from_trust_config(trust_config(anchors=[pki.other_root])))],
        ("backend.internal",), now).ok


def test_expected_names_and_sni() -> None:
    assert upstream_tls.expected_names("", ("A.example.com",), "10.0.0.1") == ("a.example.com",)
    assert upstream_tls.expected_names("api.example.com", (), "10.0.0.1") == ("api.example.com",)
    assert upstream_tls.expected_names("", (), "10.0.0.1") == ("10.0.0.1",)  # never unchecked
    assert upstream_tls.server_name("", "127.0.0.1") == ""  # no IP in SNI (RFC 6066)
    assert upstream_tls.server_name("", "backend.internal") == "backend.internal"
    assert upstream_tls.server_name("api.example.com", "127.0.0.1") == "api.example.com"


# ---------------------------------------------------------------- the worker's TLS client, real backends


def test_a_backend_that_requires_a_client_certificate_accepts_ours_and_refuses_without(
        pki: Pki, started: list[TlsBackend], tmp_path: Path) -> None:
    backend = TlsBackend(tmp_path, pki.good, client_ca=pki.client_root)
    started.append(backend)
    assert _probe(backend, _tls(pki)) == (True, "")
    assert backend.peers[-1] == pki.proxy.der  # our certificate was presented
    passed, why = _probe(backend, _tls(pki, client_cert=False))
    assert not passed, why
    assert len(backend.peers) == 1 and backend.handshake_errors  # the backend refused the handshake


def test_a_backend_without_client_auth_gets_no_certificate_and_is_still_verified(
        pki: Pki, started: list[TlsBackend], tmp_path: Path) -> None:
    backend = TlsBackend(tmp_path, pki.good)
    started.append(backend)
    assert _probe(backend, _tls(pki)) == (True, "")
    assert backend.peers == [None]  # it did not ask, so nothing was sent


@pytest.mark.parametrize("case", ["revoked", "wrong_san", "other_root", "client_auth_only", "expired"])
def test_a_backend_certificate_the_trust_config_refuses_fails_the_handshake(
        pki: Pki, started: list[TlsBackend], tmp_path: Path, case: str) -> None:
    cert, tls, error = {
        "revoked": (pki.revoked, _tls(pki), "backend_cert_revoked"),
        "wrong_san": (pki.good, _tls(pki, sans=("payments.internal",)), "backend_cert_san_mismatch"),
        "other_root": (server_cert(pki.other_root), _tls(pki), "backend_cert_validation_failed (unknown_issuer"),
        "client_auth_only": (server_cert(pki.root, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)), _tls(pki),
                             "backend_cert_chain_invalid_eku"),
        "expired": (expired(pki.root), _tls(pki), "backend_cert_validation_failed (expired"),
    }[case]
    backend = TlsBackend(tmp_path, cert, client_ca=pki.client_root)
    started.append(backend)
    passed, why = _probe(backend, tls)
    assert not passed
    assert error in why, why
    assert backend.peers == []  # no request reached it
    if case == "revoked":
        # the same certificate without the CRL is accepted: the CRL is what refused it
        assert _probe(backend, _tls(pki, crl=False)) == (True, "")


def test_sni_is_sent_and_checked_when_no_subject_alt_names(pki: Pki, started: list[TlsBackend],
                                                           tmp_path: Path) -> None:
    backend = TlsBackend(tmp_path, pki.good)
    started.append(backend)
    assert _probe(backend, _tls(pki, sni="backend.internal")) == (True, "")
    passed, why = _probe(backend, _tls(pki, sni="elsewhere.internal"))
    assert not passed and "backend_cert_san_mismatch" in why


def test_a_silent_backend_is_bounded_by_the_connect_timeout_without_blocking_the_loop(pki: Pki) -> None:
    """A peer that accepts TCP and never answers the ClientHello: the handshake ends at the connect
    timeout, and the event loop keeps running other work meanwhile."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", free_port()))
    silent.listen(8)
    port = silent.getsockname()[1]
    pool = BackendPool(from_environment({}))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def main() -> float:
        task = asyncio.get_running_loop().create_task(ticker())
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.acquire(("127.0.0.1", port, "s", "d"), connect_timeout=0.5, tls=_tls(pki))
        task.cancel()
        return time.monotonic() - started

    try:
        took = asyncio.run(main())
    finally:
        silent.close()
    assert 0.45 <= took < 1.5, took
    assert ticks >= 20, ticks  # the loop ran other tasks during the handshake


def test_a_refused_backend_raises_an_os_error_naming_the_reason(pki: Pki, started: list[TlsBackend],
                                                                tmp_path: Path) -> None:
    backend = TlsBackend(tmp_path, pki.revoked)
    started.append(backend)
    pool = BackendPool(from_environment({}))

    async def main() -> str:
        with pytest.raises(BackendTlsRefused) as caught:
            await pool.acquire(("127.0.0.1", backend.port, "s", "d"), connect_timeout=3, tls=_tls(pki))
        return str(caught.value)

    message = asyncio.run(main())
    assert isinstance(BackendTlsRefused("x"), OSError)
    assert message.startswith("backend certificate refused: backend_cert_revoked (revoked: leaf serial"), message


def test_tls_settings_alone_use_public_roots(pki: Pki) -> None:
    service = backends_pb2.BackendService(name="backendServices/x")
    service.tls_settings.sni = "example.com"
    tls = upstream_tls_for("backendServices/x", service, {}, {})
    assert tls is not None and [b.name for b in tls.bundles] == ["publicRoots"]
    assert len(tls.bundles[0].anchors) > 50
    assert upstream_tls_for("backendServices/x", backends_pb2.BackendService(), {}, {}) is None
