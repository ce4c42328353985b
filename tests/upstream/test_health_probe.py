"""The health-check probe against real sockets, as an attacker would serve it: a status line that never
ends, a megabyte of header, a peer that accepts and says nothing, a refused port — each bounded by the
check's timeout or its 1 KiB read, never more."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from data_plane.upstream.health import HealthPolicy
from data_plane.workers.health_checks import probe
from tests.support import free_port


class RawServer:
    """Accepts connections and hands each to `behaviour(conn)` in a thread."""

    def __init__(self, behaviour: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.behaviour = behaviour
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self.behaviour(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    made: list[RawServer] = []

    def make(behaviour: Callable[[socket.socket], None]) -> RawServer:
        server = RawServer(behaviour)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


POLICY = HealthPolicy("/healthz", interval=1.0, timeout=0.3)


def _probe(address: str) -> tuple[tuple[bool, str], float]:
    start = time.monotonic()
    result = asyncio.run(probe(address, POLICY))
    return result, time.monotonic() - start


def test_a_healthy_backend_passes(serve: Callable[..., RawServer]) -> None:
    def ok(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    (passed, why), _ = _probe(serve(ok).address)
    assert passed and why == ""


def test_a_status_line_that_never_ends_is_cut_at_the_timeout(serve: Callable[..., RawServer]) -> None:
    def dribble(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200")
        while True:
            time.sleep(0.05)
            conn.sendall(b" ")  # bytes keep coming, the line never ends

    (passed, why), took = _probe(serve(dribble).address)
    assert not passed and took < POLICY.timeout + 0.5, (why, took)


def test_a_huge_status_line_is_refused_after_1_kib(serve: Callable[..., RawServer]) -> None:
    def huge(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 " + b"A" * (1024 * 1024) + b"\r\n")

    (passed, why), took = _probe(serve(huge).address)
    assert not passed and "longer than 1024 bytes" in why and took < POLICY.timeout + 0.5


def test_silence_and_refusal_fail_within_the_timeout(serve: Callable[..., RawServer]) -> None:
    def silent(conn: socket.socket) -> None:
        time.sleep(2)

    (passed, why), took = _probe(serve(silent).address)
    assert not passed and "no status line within 0.3s" in why and took < POLICY.timeout + 0.5
    (passed, why), _ = _probe(f"127.0.0.1:{free_port()}")
    assert not passed and why.startswith("cannot connect")


def test_an_error_status_fails(serve: Callable[..., RawServer]) -> None:
    def error(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")

    assert _probe(serve(error).address)[0] == (False, "status 503")
