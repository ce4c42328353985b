"""SPEC §15 in the workers, with real worker processes, real TLS and real backends on loopback: host and
path routes on one port, a route that requires a verified client certificate on a permissive listener,
several certificates chosen by SNI, and what an attacker tries against each of those boundaries."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from mtlsgate.v1 import backends_pb2, xds_pb2

from control_plane.pki import DemoPki, Issued, issue
from data_plane.node.config import NodeConfig
from tests.support import free_port
from tests.workers.conftest import (
    PoolHarness,
    RecordingBackend,
    client_context,
    listener,
    node_config,
    policy,
)

REQUIRED = backends_pb2.Route.REQUIRED


def _intermediate(pki: DemoPki) -> Issued:
    cert = x509.load_pem_x509_certificate(pki.path("intermediate_cert").read_bytes())
    key = serialization.load_pem_private_key(pki.path("intermediate_key").read_bytes(), password=None)
    return Issued(cert, key)  # type: ignore[arg-type]


def _server_cert(pki: DemoPki, name: str, *dns: str) -> xds_pb2.ServerCertificate:
    inter = _intermediate(pki)
    leaf = issue(f"server {dns[0]}", issuer=inter, eku=(ExtendedKeyUsageOID.SERVER_AUTH,), dns=dns)
    return xds_pb2.ServerCertificate(name=name, pem_certificate_chain=leaf.cert_pem + inter.cert_pem,
                                     pem_private_key=leaf.key_pem)


class Estate:
    """Two backends behind one permissive listener with a route table and two SNI certificates."""

    def __init__(self, pki: DemoPki, harness: PoolHarness) -> None:
        self.pki = pki
        self.harness = harness
        self.a = RecordingBackend()
        self.b = RecordingBackend()
        self.port = free_port()
        self.cert_a = _server_cert(pki, "certificates/a", "a.example.com")
        self.cert_b = _server_cert(pki, "certificates/b", "b.example.com", "*.b.example.com")
        self.apply()

    def config(self) -> NodeConfig:
        lst = listener("routed", self.port, "", policy("ALLOW_INVALID_OR_MISSING_CLIENT_CERT"))
        lst.ClearField("certificate")
        lst.certificates[:] = ["certificates/a", "certificates/b"]
        lst.routes.add(hosts=["a.example.com"], path_prefix="/admin/", backend=self.a.address,
                       client_certificate=REQUIRED,
                       custom_request_headers=["X-Admin-Cert-Hash:{client_cert_sha256_fingerprint}"])
        lst.routes.add(hosts=["a.example.com"], path_prefix="/", backend=self.a.address)
        lst.routes.add(hosts=["b.example.com", "*.b.example.com"], backend=self.b.address)
        base = node_config(self.pki, [lst])
        certificates = dict(base.certificates) | {"certificates/a": self.cert_a, "certificates/b": self.cert_b}
        return NodeConfig(versions={"listeners": self.cert_b.pem_private_key[-40:]}, listeners=base.listeners,
                          bundles=base.bundles, certificates=certificates)

    def apply(self) -> None:
        self.harness.apply(self.config())

    def close(self) -> None:
        self.a.server.shutdown()
        self.b.server.shutdown()


@pytest.fixture(scope="module")
def estate(harness: PoolHarness, demo_pki: DemoPki) -> Iterator[Estate]:
    e = Estate(demo_pki, harness)
    yield e
    e.close()


def _context(pki: DemoPki, who: str | None) -> ssl.SSLContext:
    ctx = client_context(pki, who)
    ctx.check_hostname = False  # SNI and Host differ on purpose in some tests; the certificate is checked below
    return ctx


def _connect(estate: Estate, sni: str, who: str | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", estate.port), timeout=5)
    return _context(estate.pki, who).wrap_socket(raw, server_hostname=sni)


def _raw(sock: ssl.SSLSocket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def get(estate: Estate, host: str, path: str = "/", *, sni: str | None = None, who: str | None = None,
        target: str | None = None) -> tuple[int, bytes, str]:
    """(status, body, which backend answered: "a", "b" or "")."""
    seen_a, seen_b = len(estate.a.seen), len(estate.b.seen)
    with _connect(estate, sni or host.split(":")[0].lower(), who) as sock:
        status, _, body = _raw(sock, f"GET {target or path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    which = "a" if len(estate.a.seen) > seen_a else "b" if len(estate.b.seen) > seen_b else ""
    return status, body, which


def _peer_dns(sock: ssl.SSLSocket) -> list[str]:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


# ---------------------------------------------------------------- routing


def test_two_host_names_on_one_port_reach_their_own_backend(estate: Estate) -> None:
    status, body, which = get(estate, "a.example.com", "/hello")
    assert (status, which) == (200, "a")
    assert json.loads(body)["path"] == "/hello"
    assert get(estate, "b.example.com", "/hello")[::2] == (200, "b")
    assert get(estate, "api.b.example.com", "/")[::2] == (200, "b")


def test_no_route_is_404_and_reaches_no_backend(estate: Estate) -> None:
    status, body, which = get(estate, "c.example.com")
    assert (status, which) == (404, "")
    assert b"no route" in body


def test_admin_requires_a_verified_client_certificate(estate: Estate) -> None:
    status, body, which = get(estate, "a.example.com", "/admin/users")
    assert (status, which) == (403, "")
    assert b"client_cert_not_provided" in body or b"requires a verified client certificate" in body
    status, body, which = get(estate, "a.example.com", "/admin/users", who="revoked")
    assert (status, which) == (403, "")
    assert b"revoked" in body.lower()
    status, body, which = get(estate, "a.example.com", "/admin/users", who="client")
    assert (status, which) == (200, "a")
    assert estate.a.seen[-1]["x-admin-cert-hash"]  # the route's own header set
    assert "x-client-cert-present" not in estate.a.seen[-1]
    # the rest of a.example.com does not ask for one, and gets the listener's header set
    status, _, which = get(estate, "a.example.com", "/public", who="revoked")
    assert (status, which) == (200, "a")
    assert estate.a.seen[-1]["x-client-cert-chain-verified"] == "false"


def test_route_header_names_are_stripped_from_client_requests_everywhere(estate: Estate) -> None:
    with _connect(estate, "b.example.com") as sock:
        status, _, _ = _raw(sock, b"GET / HTTP/1.1\r\nHost: b.example.com\r\nX-Admin-Cert-Hash: forged\r\n"
                                  b"X_Admin_Cert_Hash: forged\r\n\r\n")
    assert status == 200
    assert "x-admin-cert-hash" not in estate.b.seen[-1]


# ---------------------------------------------------------------- attacker: hosts


@pytest.mark.parametrize("host", ["a.example.com.evil", "a.example.com.evil:443", "evil.a.example.com",
                                  "xa.example.com", "example.com"])
def test_host_header_tricks_match_no_route(estate: Estate, host: str) -> None:
    assert get(estate, host, "/admin/", sni="x.invalid")[::2] == (404, "")


@pytest.mark.parametrize("host", ["A.EXAMPLE.COM", "a.example.com.", "a.Example.com:8443"])
def test_host_case_port_and_dot_cannot_dodge_the_required_route(estate: Estate, host: str) -> None:
    assert get(estate, host, "/admin/", sni="a.example.com")[::2] == (403, "")


def test_sni_other_than_host_cannot_dodge_the_required_route(estate: Estate) -> None:
    # handshake for b (no client certificate needed there), then ask a's admin route on that connection
    with _connect(estate, "b.example.com") as sock:
        assert "b.example.com" in _peer_dns(sock)
        status, _, _ = _raw(sock, b"GET /admin/ HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
    assert status == 403


def test_absolute_form_target_is_routed_by_its_authority(estate: Estate) -> None:
    # RFC 9112 §3.2.2: the target's authority wins over Host, for routing too
    status, _, which = get(estate, "b.example.com", sni="b.example.com", target="https://a.example.com/admin/x")
    assert (status, which) == (403, "")
    status, _, which = get(estate, "a.example.com", target="https://b.example.com/admin/x")
    assert (status, which) == (200, "b")


# ---------------------------------------------------------------- attacker: paths


@pytest.mark.parametrize("path", ["/public/../admin/", "/%2e%2e/admin/", "/x/%2E%2E/admin/users", "//admin/",
                                  "/./admin/", "/%61dmin/"])
def test_path_tricks_cannot_dodge_the_required_route(estate: Estate, path: str) -> None:
    assert get(estate, "a.example.com", path)[::2] == (403, "")


@pytest.mark.parametrize("path", ["/admin%2fusers", "/x/..%2Fadmin/", "/admin%5cusers", "/a\\..\\admin/", "/%zz"])
def test_paths_that_cannot_be_routed_safely_are_400(estate: Estate, path: str) -> None:
    assert get(estate, "a.example.com", path)[::2] == (400, "")


def test_the_backend_sees_the_normalised_path_it_was_routed_by(estate: Estate) -> None:
    status, body, which = get(estate, "a.example.com", "/admin/./x/../users?q=%2e%2e", who="client")
    assert (status, which) == (200, "a")
    assert json.loads(body)["path"] == "/admin/users?q=%2e%2e"


# ---------------------------------------------------------------- SNI


@pytest.mark.parametrize(("sni", "expected"), [("a.example.com", "a.example.com"), ("b.example.com", "b.example.com"),
                                               ("x.b.example.com", "*.b.example.com"),
                                               ("A.EXAMPLE.COM", "a.example.com"),
                                               ("nothing.invalid", "a.example.com")])
def test_sni_chooses_the_certificate_by_san(estate: Estate, sni: str, expected: str) -> None:
    with _connect(estate, sni) as sock:
        assert expected in _peer_dns(sock)


def test_without_sni_the_first_certificate_is_served(estate: Estate) -> None:
    raw = socket.create_connection(("127.0.0.1", estate.port), timeout=5)
    with _context(estate.pki, None).wrap_socket(raw) as sock:
        assert _peer_dns(sock) == ["a.example.com"]


def test_rotating_one_certificate_leaves_the_other_connections_untouched(estate: Estate, tmp_path: Path) -> None:
    kept_a = _connect(estate, "a.example.com")
    kept_b = _connect(estate, "b.example.com")
    old_b = kept_b.getpeercert(binary_form=True)
    old_a = kept_a.getpeercert(binary_form=True)
    try:
        assert _raw(kept_a, b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")[0] == 200
        estate.cert_b = _server_cert(estate.pki, "certificates/b", "b.example.com", "*.b.example.com")
        estate.apply()
        # both open connections keep working (no reconnect, same TLS session)
        assert _raw(kept_a, b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")[0] == 200
        assert _raw(kept_b, b"GET / HTTP/1.1\r\nHost: b.example.com\r\n\r\n")[0] == 200
        with _connect(estate, "b.example.com") as fresh_b:
            assert fresh_b.getpeercert(binary_form=True) != old_b
        with _connect(estate, "a.example.com") as fresh_a:
            assert fresh_a.getpeercert(binary_form=True) == old_a
    finally:
        kept_a.close()
        kept_b.close()
