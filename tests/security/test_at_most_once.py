"""Checklist — a request reaches the backend once (SPEC §11 "At most once"). Each test is an attack:
a raw TLS client with the test PKI's valid certificate, a logging backend counting what it executed.

Failed before issue 10: client disconnect (bodiless and with body), malformed pipelined follow-up and
`Upgrade: h2c` each made the proxy send the request again on a fresh backend connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from control_plane.pki import DemoPki
from tests.security.conftest import (
    BackendConnection,
    Proxy,
    RawBackend,
    connect,
    ok,
    read_response,
    wait_for_target,
)
from tests.support import wait_until


@pytest.fixture(scope="module")
def proxy(demo_pki: DemoPki, backend: RawBackend) -> Iterator[Proxy]:
    p = Proxy(demo_pki, backend, bounds="response_idle_timeout=5")
    yield p
    p.close()


def _holding(release: threading.Event) -> Any:
    def behaviour(request: dict[str, Any], connection: BackendConnection) -> bytes | None:
        if request["target"].startswith("/held"):
            deadline = time.monotonic() + 10
            while not release.is_set() and time.monotonic() < deadline:
                if connection.peer_closed(0.05):
                    connection.closed = True  # seen by the test; the proxy gave up on this request
                    return None
        return ok(request, connection)
    return behaviour


def _settled(backend: RawBackend, proxy: Proxy, demo_pki: DemoPki) -> None:
    """Let any re-send the proxy might make happen first: the held backend connection is closed by the
    proxy, then a marker request goes through the same worker pool."""
    wait_until(lambda: all(c.closed for c in backend.connections if any(
        r["target"].startswith("/held") for r in c.requests)), message="held backend connection closed")
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"GET /marker HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(s)[0] == 200
    wait_for_target(backend, "/marker")


@pytest.mark.parametrize("request_bytes", [
    b"DELETE /held/x HTTP/1.1\r\nHost: app\r\n\r\n",
    b"PUT /held/y HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello",
], ids=["bodiless-DELETE", "PUT-with-body"])
def test_client_disconnect_before_the_response_never_resends(proxy: Proxy, backend: RawBackend,
                                                             demo_pki: DemoPki, request_bytes: bytes) -> None:
    release = threading.Event()
    backend.reset(_holding(release))
    target = request_bytes.split(b" ")[1].decode()
    with connect(proxy.ports["strict"], demo_pki) as s:
        # a first request leaves an idle kept-alive backend connection in this worker: the fast path
        s.sendall(b"GET /warm HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(s)[0] == 200
        s.sendall(request_bytes)
        wait_for_target(backend, target)
    # the client is gone before any answer
    try:
        wait_until(lambda: any(c.closed for c in backend.connections), timeout=5,
                   message="proxy closes the backend connection of a cancelled request")
    finally:
        release.set()
    _settled(backend, proxy, demo_pki)
    assert backend.targets().count(target) == 1


def test_malformed_pipelined_follow_up_never_resends_the_first(proxy: Proxy, backend: RawBackend,
                                                              demo_pki: DemoPki) -> None:
    backend.reset()
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"GET /first HTTP/1.1\r\nHost: app\r\n\r\n"
                  b"GET /second HTTP/1.1\r\nHost: app\r\nContent-Length: nope\r\n\r\n")
        buf = bytearray()
        first = read_response(s, buf)
        second = read_response(s, buf)
    assert first[0] == 200 and first[2] == b"ok GET /first"
    assert second[0] == 400
    _settled(backend, proxy, demo_pki)
    assert backend.targets().count("/first") == 1
    assert b"/second" not in backend.raw


def test_upgrade_h2c_is_served_once_as_http11(proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    backend.reset()
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"GET /h2c HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nGET /after HTTP/1.1\r\nHost: app\r\n\r\n")
        buf = bytearray()
        assert read_response(s, buf)[:3:2] == (200, b"ok GET /h2c")
        assert read_response(s, buf)[:3:2] == (200, b"ok GET /after")
    _settled(backend, proxy, demo_pki)
    assert backend.targets().count("/h2c") == 1
    assert b"upgrade" not in backend.raw.lower() and b"http2-settings" not in backend.raw.lower()


def test_upgrade_with_a_body_is_refused_and_nothing_is_forwarded(proxy: Proxy, backend: RawBackend,
                                                                  demo_pki: DemoPki) -> None:
    backend.reset()
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"POST /smuggle HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                  b"Content-Length: 33\r\n\r\nGET /inner HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(s)[0] == 400
    _settled(backend, proxy, demo_pki)
    assert b"/smuggle" not in backend.raw and b"/inner" not in backend.raw


def _close_on_second_request(request: dict[str, Any], connection: BackendConnection) -> bytes | None:
    """The backend closes a kept-alive connection just as the next request arrives (no response byte)."""
    if len(connection.requests) >= 2:
        return None
    return ok(request, connection)


def test_idle_keepalive_closed_by_backend_retries_an_idempotent_request_once(
        proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    backend.reset(_close_on_second_request)
    with connect(proxy.ports["strict"], demo_pki) as s:
        buf = bytearray()
        s.sendall(b"GET /warm HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(s, buf)[0] == 200
        s.sendall(b"GET /again HTTP/1.1\r\nHost: app\r\n\r\n")
        status, _, body = read_response(s, buf)
    assert (status, body) == (200, b"ok GET /again")
    assert backend.targets().count("/again") == 2  # once on the reused connection (dropped), once retried


@pytest.mark.parametrize("body", [b"", b"42"], ids=["bodiless", "with-body"])
def test_idle_keepalive_closed_by_backend_never_retries_a_post(proxy: Proxy, backend: RawBackend,
                                                               demo_pki: DemoPki, body: bytes) -> None:
    backend.reset(_close_on_second_request)
    with connect(proxy.ports["strict"], demo_pki) as s:
        buf = bytearray()
        s.sendall(b"GET /warm HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(s, buf)[0] == 200
        s.sendall(b"POST /pay HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        status, _, _ = read_response(s, buf)
    assert status == 502
    _settled_simple(backend, proxy, demo_pki)
    assert backend.targets().count("/pay") == 1


def _settled_simple(backend: RawBackend, proxy: Proxy, demo_pki: DemoPki) -> None:
    backend.behaviour = ok
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"GET /marker HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(s)[0] == 200
