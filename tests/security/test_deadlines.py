"""Checklist — idle and slow clients cannot hold a worker (SPEC §11 "Deadlines and admission"). The
deadlines are shrunk with the documented MTLSGATE_PROXY_BOUNDS knob (same code, smaller numbers).

Failed before issue 10: a client trickling head bytes kept its connection for ever (each byte reset the
idle timer); the response deadline was 60 s; no per-IP limit; at the cap new connections were refused
while idle ones kept their slots."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

from control_plane.pki import DemoPki
from tests.security.conftest import (
    ATTACKER,
    VALID_CLIENT,
    BackendConnection,
    Proxy,
    RawBackend,
    closed_by_peer,
    connect,
    ok,
    read_response,
    served,
)
from tests.support import wait_until

HEAD, BODY, RESPONSE, KEEPALIVE, HANDSHAKE = 1.0, 1.0, 1.5, 1.5, 1.0
PER_IP, CAP = 8, 40
BOUNDS = (f"handshake_timeout={HANDSHAKE},head_timeout={HEAD},body_idle_timeout={BODY},"
          f"response_idle_timeout={RESPONSE},keepalive_idle_timeout={KEEPALIVE},max_connections_per_ip={PER_IP},"
          f"max_connections={CAP},sweep_interval=0.05")


@pytest.fixture(scope="module")
def proxy(demo_pki: DemoPki, backend: RawBackend) -> Iterator[Proxy]:
    p = Proxy(demo_pki, backend, bounds=BOUNDS)
    yield p
    p.close()


def test_slowloris_head_is_cut_at_the_head_deadline_not_reset_by_each_byte(proxy: Proxy, demo_pki: DemoPki) -> None:
    with connect(proxy.ports["strict"], demo_pki, source=ATTACKER) as s:
        started = time.monotonic()
        sent = 0
        data = b"GET / HTTP/1.1\r\nHost: app\r\nX-Slow: " + b"a" * 100
        s.settimeout(0.25)
        answer = b""
        while time.monotonic() - started < HEAD + 4:
            try:
                s.sendall(data[sent:sent + 1])
                sent += 1
                answer += s.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), (answer, elapsed)
    assert HEAD * 0.8 <= elapsed < HEAD + 3 and sent >= 3


def test_no_handshake_is_closed_at_the_handshake_deadline(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.ports["strict"]), source_address=(ATTACKER, 0)) as s:
        started = time.monotonic()
        s.sendall(b"\x16\x03\x01")
        assert closed_by_peer(s, HANDSHAKE + 4)
        assert time.monotonic() - started < HANDSHAKE + 3


def test_idle_keepalive_is_closed(proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    backend.reset()
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"GET /once HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(s)[0] == 200
        started = time.monotonic()
        assert closed_by_peer(s, KEEPALIVE + 4)
        assert KEEPALIVE * 0.8 <= time.monotonic() - started < KEEPALIVE + 3


def test_stalled_body_gets_408(proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    backend.reset()
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"POST /stall HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nab")
        started = time.monotonic()
        status = read_response(s)[0]
        assert status == 408 and time.monotonic() - started < BODY + 3


def test_backend_that_never_answers_gets_504_at_the_response_idle_deadline(
        proxy: Proxy, backend: RawBackend, demo_pki: DemoPki) -> None:
    def silent(request: dict, connection: BackendConnection) -> bytes | None:
        if request["target"] == "/silent":
            connection.peer_closed(RESPONSE + 5)
            return None
        return ok(request, connection)

    backend.reset(silent)
    with connect(proxy.ports["strict"], demo_pki) as s:
        s.sendall(b"GET /silent HTTP/1.1\r\nHost: app\r\n\r\n")
        started = time.monotonic()
        assert read_response(s)[0] == 504
        assert RESPONSE * 0.8 <= time.monotonic() - started < RESPONSE + 3


def test_per_client_ip_limit_refuses_that_address_only(proxy: Proxy, demo_pki: DemoPki) -> None:
    before = proxy.metric("mtlsgate_connections_refused_total", "per_ip_limit")
    idle = [socket.create_connection(("127.0.0.1", proxy.ports["strict"]), source_address=(ATTACKER, 0))
            for _ in range(6 * PER_IP)]
    try:
        refused = _closed_within(idle, HANDSHAKE / 3)  # well before any handshake deadline
        assert len(refused) >= 6 * PER_IP - 2 * PER_IP  # 2 workers, PER_IP each
        assert served(proxy.ports["strict"], demo_pki, source=VALID_CLIENT) == 200
        wait_until(lambda: proxy.metric("mtlsgate_connections_refused_total", "per_ip_limit") >= before + len(refused),
                   message="refusals counted")
    finally:
        for s in idle:
            s.close()


def _closed_within(socks: list[socket.socket], seconds: float) -> list[socket.socket]:
    closed: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([s for s in socks if s not in closed], [], [], left)
        for s in ready:
            try:
                if s.recv(1) == b"":
                    closed.append(s)
            except OSError:
                closed.append(s)
    return closed


def test_at_the_cap_idle_connections_are_evicted_oldest_first_for_new_clients(proxy: Proxy, demo_pki: DemoPki) -> None:
    before = proxy.metric("mtlsgate_connections_evicted_total", "handshake_pending")
    # many addresses, each under the per-IP limit, together far over both workers' caps
    idle = [socket.create_connection(("127.0.0.1", proxy.ports["strict"]), source_address=(f"127.0.0.{100 + i}", 0))
            for i in range(3 * CAP) for _ in range(2)]
    try:
        for _ in range(5):
            assert served(proxy.ports["strict"], demo_pki, source=VALID_CLIENT) == 200
        assert closed_by_peer(idle[0], 2.0)  # the oldest went first
        wait_until(lambda: proxy.metric("mtlsgate_connections_evicted_total", "handshake_pending") > before,
                   message="evictions counted")
    finally:
        for s in idle:
            s.close()
