"""Checklist — weak TLS is refused (SPEC §11 "TLS profile"): on an RSA listener, static-RSA key exchange
and CBC suites are refused under MODERN (the default) and RESTRICTED, CBC with ECDHE is accepted under
COMPATIBLE, `minTlsVersion: TLS_1_3` refuses TLS 1.2; the effective suites are in the worker status
(`/config_dump`), with the bounds in force.

Failed before issue 10: `AES128-SHA` (static RSA, CBC, SHA-1) was accepted on RSA listeners. A TLS 1.2
renegotiation is refused at once (our alert is flushed after a read that gave no request bytes)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from mtlsgate.v1 import resources_pb2, xds_pb2

from control_plane.pki import DemoPki, issue
from tests.security.conftest import Proxy, RawBackend
from tests.support import free_port
from tests.workers.conftest import PoolHarness, listener, node_config

SslPolicy = resources_pb2.SslPolicy
PROFILES = {"default": None, "modern": (SslPolicy.TLS_1_2, SslPolicy.MODERN),
            "restricted": (SslPolicy.TLS_1_2, SslPolicy.RESTRICTED),
            "compatible": (SslPolicy.TLS_1_2, SslPolicy.COMPATIBLE), "tls13": (SslPolicy.TLS_1_3, SslPolicy.MODERN)}


@pytest.fixture(scope="module")
def rsa_listeners(demo_pki: DemoPki) -> Iterator[tuple[dict[str, int], PoolHarness]]:
    ca = issue("rsa test CA", ca=True, key="rsa-2048")
    server = issue("rsa server", issuer=ca, key="rsa-2048", eku=(ExtendedKeyUsageOID.SERVER_AUTH,), dns=("localhost",))
    ports = {name: free_port() for name in PROFILES}
    listeners = []
    for name, profile in PROFILES.items():
        lst = listener(name, ports[name], "127.0.0.1:9", None)
        lst.certificate = "certificates/rsa"
        if profile is not None:
            lst.ssl_policy.min_tls_version, lst.ssl_policy.profile = profile
        listeners.append(lst)
    config = node_config(demo_pki, listeners)
    config = type(config)(versions=config.versions, listeners=config.listeners, bundles=config.bundles,
                          certificates={"certificates/rsa": xds_pb2.ServerCertificate(
                              name="certificates/rsa", pem_certificate_chain=server.cert_pem + ca.cert_pem,
                              pem_private_key=server.key_pem)})
    harness = PoolHarness(workers=1)
    harness.apply(config)
    yield ports, harness
    harness.close()


def _handshake(port: int, ciphers: str | None = None, *, tls12_only: bool = False, tls13_only: bool = False) -> str:
    """The negotiated suite; raises ssl.SSLError when the server refuses."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if ciphers:
        ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if tls13_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.cipher()[0]


def _client_suites(spec: str) -> list[str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers(spec + ":@SECLEVEL=0")
    return [c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"]


STATIC_RSA = _client_suites("kRSA")
ECDHE_CBC = [s for s in _client_suites("ECDHE+aRSA") if "GCM" not in s and "CHACHA" not in s and "CCM" not in s]


@pytest.mark.parametrize("profile", ["default", "modern", "restricted"])
def test_static_rsa_and_cbc_suites_are_refused(rsa_listeners: tuple[dict[str, int], PoolHarness], profile: str) -> None:
    port = rsa_listeners[0][profile]
    assert "AES128-SHA" in STATIC_RSA and ECDHE_CBC
    for suite in [*STATIC_RSA, *ECDHE_CBC]:
        with pytest.raises(ssl.SSLError):
            _handshake(port, suite, tls12_only=True)
    assert _handshake(port, "ECDHE-RSA-AES128-GCM-SHA256", tls12_only=True) == "ECDHE-RSA-AES128-GCM-SHA256"


def test_restricted_refuses_chacha_and_modern_accepts_it(rsa_listeners: tuple[dict[str, int], PoolHarness]) -> None:
    ports = rsa_listeners[0]
    with pytest.raises(ssl.SSLError):
        _handshake(ports["restricted"], "ECDHE-RSA-CHACHA20-POLY1305", tls12_only=True)
    assert _handshake(ports["modern"], "ECDHE-RSA-CHACHA20-POLY1305", tls12_only=True) == "ECDHE-RSA-CHACHA20-POLY1305"


def test_compatible_accepts_cbc_with_ecdhe_but_never_static_rsa(rsa_listeners: tuple[dict[str, int], PoolHarness]) -> None:
    port = rsa_listeners[0]["compatible"]
    assert _handshake(port, "ECDHE-RSA-AES128-SHA", tls12_only=True) == "ECDHE-RSA-AES128-SHA"
    for suite in STATIC_RSA:
        with pytest.raises(ssl.SSLError):
            _handshake(port, suite, tls12_only=True)


def test_min_tls_13_refuses_tls_12(rsa_listeners: tuple[dict[str, int], PoolHarness]) -> None:
    port = rsa_listeners[0]["tls13"]
    with pytest.raises(ssl.SSLError):
        _handshake(port, tls12_only=True)
    assert _handshake(port, tls13_only=True).startswith("TLS_")


def test_effective_suites_are_reported(rsa_listeners: tuple[dict[str, int], PoolHarness]) -> None:
    harness = rsa_listeners[1]
    [status] = harness.in_loop(harness.pool.worker_status)
    policies = {name: lst["ssl_policy"] for name, lst in status["listeners"].items()}
    assert policies["listeners/default"]["profile"] == "MODERN"
    assert policies["listeners/default"]["min_tls_version"] == "TLS_1_2"
    assert "ECDHE-RSA-AES128-SHA" in policies["listeners/compatible"]["ciphers"]
    assert not any("-SHA" in c and "ECDHE" not in c for c in policies["listeners/compatible"]["ciphers"] if
                   not c.startswith("TLS_"))
    assert all(c.startswith("TLS_") for c in policies["listeners/tls13"]["ciphers"])
    # the §11 bounds in force are shown beside them (the /config_dump `workers` section)
    assert status["bounds"]["head_timeout"] == 10.0 and status["bounds"]["max_connections_per_ip"] == 256


@pytest.fixture(scope="module")
def proxy(demo_pki: DemoPki, backend: RawBackend) -> Iterator[Proxy]:
    p = Proxy(demo_pki, backend, bounds="")
    yield p
    p.close()


def test_tls12_renegotiation_is_refused_at_once(proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    """A TLS 1.2 client asking to renegotiate mid-connection (a CPU and state-confusion lever) gets the
    refusal straight away — our own alert record is flushed even though the read that carried the
    ClientHello gave no request bytes — and the connection is of no more use to it."""
    import select
    import socket
    import time

    from OpenSSL import SSL

    def until_done(step) -> None:  # pyOpenSSL on a socket with a timeout: non-blocking
        deadline = time.monotonic() + 5
        while True:
            try:
                return step()
            except SSL.WantReadError:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([raw], [], [], left)[0], "the server did not answer"

    backend.reset()
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_chain_file(str(demo_pki.path("client_cert")))
    ctx.use_privatekey_file(str(demo_pki.path("client_key")))
    with socket.create_connection(("127.0.0.1", proxy.ports["strict"]), timeout=10) as raw:
        conn = SSL.Connection(ctx, raw)
        conn.set_connect_state()
        until_done(conn.do_handshake)
        assert conn.get_protocol_version_name() == "TLSv1.2"
        conn.sendall(b"GET /before HTTP/1.1\r\nHost: app\r\n\r\n")
        assert until_done(lambda: conn.recv(65536)).startswith(b"HTTP/1.1 200 ")
        assert conn.renegotiate()
        with pytest.raises(SSL.Error) as refused:
            until_done(conn.do_handshake)
        assert not isinstance(refused.value, SSL.WantReadError)
        assert "renegotiation" in str(refused.value).lower(), refused.value
    assert "/before" in backend.targets()
