"""Checklist — what goes out is exactly RFC 9112 (SPEC §11 "Framing", "What goes out"): the logging
backend sees one framing header per request (ours), no trailer fields, origin-form with the right Host;
every malformed request is answered 400/501/505 and the backend sees zero bytes of it.

Failed before issue 17 (the backend side): a second response in one backend write was relayed as the
answer to the client's next request; a backend response head of any size was accepted. Failed before
issue 10: two Content-Lengths on every request with a body; trailers merged into the head; the head of
a bad-chunk-size request forwarded; absolute-form, two Hosts, no Host, `Connection: host`, HTTP/0.9
and HTTP/2.0 request lines forwarded; `gzip, chunked` forwarded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from control_plane.pki import DemoPki
from tests.security.conftest import (
    BackendConnection,
    Proxy,
    RawBackend,
    connect,
    header_values,
    read_response,
    wait_for_target,
)
from tests.support import wait_until


@pytest.fixture(scope="module")
def proxy(demo_pki: DemoPki, backend: RawBackend) -> Iterator[Proxy]:
    p = Proxy(demo_pki, backend, bounds="")
    yield p
    p.close()


def _exchange(proxy: Proxy, demo_pki: DemoPki, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(data)
        return read_response(s)


def _only(backend: RawBackend, target: str) -> dict:
    wait_for_target(backend, target)
    [request] = [r for r in backend.requests if r["target"] == target]
    return request


def test_a_body_goes_out_with_exactly_one_content_length(proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    backend.reset()
    assert _exchange(proxy, demo_pki, b"POST /cl HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")[0] == 200
    request = _only(backend, "/cl")
    head = backend.raw.split(b"\r\n\r\n")[0].lower()
    assert head.count(b"content-length:") == 1 and b"transfer-encoding" not in head
    assert bytes(request["body"]) == b"hello"


def test_chunked_trailers_are_dropped_never_merged(proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    backend.reset()
    status, _, _ = _exchange(proxy, demo_pki, b"POST /tr HTTP/1.1\r\nHost: good\r\nTransfer-Encoding: chunked\r\n\r\n"
                                              b"5\r\nhello\r\n0\r\nHost: evil\r\nX-Injected: 1\r\n\r\n")
    assert status == 200
    request = _only(backend, "/tr")
    assert header_values(request, "host") == ["good"]
    assert b"evil" not in backend.raw and b"x-injected" not in backend.raw.lower()
    assert backend.raw.lower().count(b"transfer-encoding: chunked") == 1 and b"content-length" not in backend.raw.lower()
    assert bytes(request["body"]) == b"hello"


def test_absolute_form_goes_out_in_origin_form_with_host_from_its_authority(
        proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    backend.reset()
    assert _exchange(proxy, demo_pki, b"GET http://api.example:8080/p?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")[0] == 200
    request = _only(backend, "/p?q=1")
    assert header_values(request, "host") == ["api.example:8080"]
    assert backend.raw.startswith(b"GET /p?q=1 HTTP/1.1\r\n")


def test_connection_can_never_remove_host_or_our_headers(proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    backend.reset()
    data = b"GET /conn HTTP/1.1\r\nHost: app\r\nConnection: host, x-client-cert-present, x-forwarded-for, x-hop\r\nX-Hop: 1\r\n\r\n"
    assert _exchange(proxy, demo_pki, data)[0] == 200
    request = _only(backend, "/conn")
    assert header_values(request, "host") == ["app"]
    assert header_values(request, "x-client-cert-present") == ["true"]
    assert len(header_values(request, "x-forwarded-for")) == 1
    assert not header_values(request, "x-hop") and not header_values(request, "connection")


MALFORMED = {
    "two Hosts": (b"GET /m HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "no Host on 1.1": (b"GET /m HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    "Host list": (b"GET /m HTTP/1.1\r\nHost: good, evil\r\n\r\n", 400),
    "HTTP/0.9": (b"GET /m\r\n\r\n", 505),
    "HTTP/2.0 request line": (b"GET /m HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "CL and TE": (b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "two CLs": (b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
    "unknown coding": (b"POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "gzip, chunked": (b"POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "chunked, identity": (b"POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    "obs-fold": (b"GET /m HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  2\r\n\r\n", 400),
    "bare LF": (b"GET /m HTTP/1.1\nHost: a\n\n", 400),
    "NUL": (b"GET /m HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n", 400),
    "space before colon": (b"GET /m HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "bad chunk size": (b"POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    "CONNECT": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_refused_and_the_backend_sees_nothing(
        case: str, proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    data, expected = MALFORMED[case]
    backend.reset()
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(data)
        try:
            status = read_response(s)[0]
        except ConnectionError:
            status = 0
    assert status == expected if case != "chunked, identity" else status in (400, 501)
    # a marker on another connection proves the proxy has moved on; nothing of the attack got through
    assert _exchange(proxy, demo_pki, b"GET /marker HTTP/1.1\r\nHost: app\r\n\r\n")[0] == 200
    wait_for_target(backend, "/marker")
    assert backend.targets() == ["/marker"]
    assert b"/m " not in backend.raw and b"/m\r" not in backend.raw


# ---- what a backend sends back (it may be compromised: it never gets more of the client than one answer)


def _answering(answer: bytes) -> Callable[[dict[str, Any], BackendConnection], bytes]:
    def behaviour(request: dict[str, Any], connection: BackendConnection) -> bytes:
        return answer
    return behaviour


def test_a_second_response_in_one_write_never_reaches_the_client(proxy: Proxy, backend: RawBackend,
                                                                 demo_pki: DemoPki) -> None:
    """A backend that answers one request with two responses must not get the second one taken as the
    answer to the client's next request (a response-queue desync): it is dropped, and that backend
    connection is never reused."""
    backend.reset(_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
                             b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: 1\r\n\r\nsmuggled"))
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"GET /one HTTP/1.1\r\nHost: app\r\n\r\n")
        buf = bytearray()
        status, _, body = read_response(s, buf)
        assert (status, body) == (200, b"first")
        backend.reset()  # an honest backend from here on
        s.sendall(b"GET /two HTTP/1.1\r\nHost: app\r\n\r\n")
        status, headers, body = read_response(s, buf)
        assert (status, body) == (200, b"ok GET /two") and "x-smuggled" not in headers
        assert not buf


def test_backend_hop_by_hop_headers_never_reach_the_client(proxy: Proxy, backend: RawBackend,
                                                           demo_pki: DemoPki) -> None:
    """Whatever a backend's head holds, the client gets end-to-end fields only, and exactly our framing:
    a chunked body re-framed once, headers a Connection field names dropped, look-alike names kept."""
    backend.reset(_answering(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
                             b"X-Connection: kept\r\nConnection: x-secret\r\nX-Secret: 1\r\nTrailer: x\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"GET /hop HTTP/1.1\r\nHost: app\r\n\r\n")
        s.settimeout(5)
        data = bytearray()
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk, f"closed early: {bytes(data)!r}"
            data += chunk
    head = bytes(data).split(b"\r\n\r\n")[0].lower()
    assert head.count(b"transfer-encoding: chunked") == 1 and b"x-connection: kept" in head
    for name in (b"connection:", b"keep-alive:", b"x-secret:", b"trailer:"):
        assert b"\r\n" + name not in head, name
    assert data.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


def test_an_endless_backend_response_head_is_cut_off_with_502(proxy: Proxy, backend: RawBackend,
                                                               demo_pki: DemoPki) -> None:
    """A backend head that never ends is bounded like a client's (64 KiB): the client gets a 502 at once,
    not when the response idle timeout ends, and the proxy closes that backend connection."""
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 100) for i in range(800))  # ~90 KiB, no empty line
    backend.reset(_answering(b"HTTP/1.1 200 OK\r\n" + pad))
    with connect(proxy.ports["strict"], demo_pki, timeout=5) as s:
        s.sendall(b"GET /endless HTTP/1.1\r\nHost: app\r\n\r\n")
        status, _, body = read_response(s)
    assert status == 502 and b"larger than 65536 bytes" in body
    [connection] = [c for c in backend.connections if any(r["target"] == "/endless" for r in c.requests)]
    wait_until(lambda: connection.closed, timeout=5, message="the proxy to close that backend connection")


def test_a_backend_response_head_over_the_bound_in_one_write_is_a_502(proxy: Proxy, backend: RawBackend,
                                                                      demo_pki: DemoPki) -> None:
    """The bound holds for a whole oversized head arriving at once, too (not only one that never ends)."""
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 100) for i in range(800))
    backend.reset(_answering(b"HTTP/1.1 200 OK\r\n" + pad + b"Content-Length: 2\r\n\r\nok"))
    with connect(proxy.ports["strict"], demo_pki, timeout=5) as s:
        s.sendall(b"GET /big-head HTTP/1.1\r\nHost: app\r\n\r\n")
        status, _, body = read_response(s)
    assert status == 502 and b"larger than 65536 bytes" in body


def test_one_backend_connection_carries_responses_of_every_framing_in_turn(proxy: Proxy, backend: RawBackend,
                                                                           demo_pki: DemoPki) -> None:
    """The backend connection's one parser reads its responses one after another: chunked (with a trailer
    field), Content-Length, an interim 103 before the final answer, a 204 and a 304 — each client request
    gets exactly its own answer, and all of them travel on one kept-alive backend connection."""
    answers = {
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
        "/length": b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlength",
        "/interim": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ninterim",
        "/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/cached": b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n",
    }
    backend.reset(lambda request, connection: answers[request["target"]])
    order = ["/chunked", "/length", "/interim", "/empty", "/cached", "/length", "/chunked", "/interim"]
    with connect(proxy.ports["strict"], demo_pki) as s:
        buf = bytearray()
        for target in order:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: app\r\n\r\n".encode())
            status, headers, body = read_response(s, buf)
            expected = {"/chunked": (200, b"abc"), "/length": (200, b"length"), "/interim": (200, b"interim"),
                        "/empty": (204, b""), "/cached": (304, b"")}[target]
            assert (status, body) == expected, target
            assert "link" not in headers and "x-trailer" not in headers
        assert not buf
    carried = [c for c in backend.connections if c.requests]
    assert len(carried) == 1 and [r["target"] for r in carried[0].requests] == order
