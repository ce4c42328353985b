"""Checklist — identity headers cannot be forged (SPEC §5 anti-spoofing, `_` read as `-`).

Failed before issue 10: `X_Client_Cert_SPIFFE: spiffe://…/admin` from a client with no certificate was
forwarded next to our `X-Client-Cert-SPIFFE`, which a WSGI backend folds into the same variable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from control_plane.pki import DemoPki
from tests.security.conftest import Proxy, RawBackend, connect, header_values, read_response, wait_for_target

FORGED = (b"X_Client_Cert_SPIFFE: spiffe://demo.mtlsgate/admin\r\nX-CLIENT-CERT-SPIFFE: spiffe://x/admin\r\n"
          b"x_client_cert_present: true\r\nX_Client-Cert_Chain_Verified: true\r\nX_Forwarded_For: 10.9.9.9\r\n"
          b"X_Forwarded_Proto: http\r\nX_Forwarded_Client_Cert: Hash=evil\r\nContent_Length: 99\r\n"
          b"My_App_Header: 1\r\n")


@pytest.fixture(scope="module")
def proxy(demo_pki: DemoPki, backend: RawBackend) -> Iterator[Proxy]:
    p = Proxy(demo_pki, backend, bounds="")
    yield p
    p.close()


def _forward(proxy: Proxy, backend: RawBackend, demo_pki: DemoPki, listener: str, who: str | None,
             target: str) -> dict:
    backend.reset()
    with connect(proxy.ports[listener], demo_pki, who) as s:
        s.sendall(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: app\r\n" + FORGED + b"\r\n")
        assert read_response(s)[0] == 200
    wait_for_target(backend, target)
    return backend.requests[0]


def test_no_certificate_cannot_claim_an_identity_with_underscores(proxy: Proxy, backend: RawBackend,
                                                                  demo_pki: DemoPki) -> None:
    request = _forward(proxy, backend, demo_pki, "allow", None, "/nocert")
    names = [k for k, _ in request["headers"]]
    assert not [n for n in names if "_" in n], names  # underscore names dropped by default
    assert header_values(request, "x-client-cert-spiffe") == [""]
    assert header_values(request, "x-client-cert-present") == ["false"]
    assert header_values(request, "x-forwarded-proto") == ["https"]
    assert b"admin" not in backend.raw and b"10.9.9.9" not in backend.raw and b"evil" not in backend.raw


def test_allow_underscores_passes_other_names_but_never_ours_or_lookalikes(proxy: Proxy, backend: RawBackend,
                                                                           demo_pki: DemoPki) -> None:
    request = _forward(proxy, backend, demo_pki, "underscores", "client", "/allowed")
    names = [k for k, _ in request["headers"]]
    assert [n for n in names if "_" in n] == ["My_App_Header"]
    assert header_values(request, "x-client-cert-spiffe") == ["spiffe://demo.mtlsgate/client/valid"]
    assert b"admin" not in backend.raw and b"10.9.9.9" not in backend.raw and b"evil" not in backend.raw
