"""The attacker's tools for the security checklist (SPEC §5, §11): a raw TLS client presenting real
certificates from the test PKI, a raw logging backend that records the exact bytes it received on
every connection, and a real node worker pool in between, with deadlines shrunk through the
documented `MTLSGATE_PROXY_BOUNDS` knob so the checks run in seconds."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
from mtlsgate.v1 import resources_pb2

from control_plane.pki import DemoPki
from tests.support import free_port, wait_until
from tests.workers.conftest import PoolHarness, client_context, listener, node_config, policy

ATTACKER = "127.0.0.50"
VALID_CLIENT = "127.0.0.60"


@dataclass
class BackendConnection:
    """What one backend connection received, byte for byte, and the requests found in it."""

    data: bytearray = field(default_factory=bytearray)
    requests: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False
    sock: socket.socket | None = None

    def peer_closed(self, timeout: float) -> bool:
        """Wait up to `timeout` for the proxy to close this connection (without consuming data)."""
        assert self.sock is not None
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class RawBackend:
    """A logging HTTP/1.1 backend. `behaviour(request, connection) -> bytes | None` answers each complete
    request (None closes the connection without an answer); `read_rate` (bytes/s) makes it read slowly."""

    def __init__(self) -> None:
        self.connections: list[BackendConnection] = []
        self.lock = threading.Lock()
        self.behaviour: Callable[[dict[str, Any], BackendConnection], bytes | None] = ok
        self.read_rate: float | None = None
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                backend._serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self, behaviour: Callable[[dict[str, Any], BackendConnection], bytes | None] | None = None,
              read_rate: float | None = None) -> None:
        with self.lock:
            # kept-alive connections from the proxy's pool stay; only what they received so far is forgotten
            self.connections = [c for c in self.connections if not c.closed]
            for c in self.connections:
                c.data.clear()
                c.requests.clear()
        self.behaviour = behaviour or ok
        self.read_rate = read_rate

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for c in self.connections for r in c.requests]

    @property
    def raw(self) -> bytes:
        with self.lock:
            return b"".join(bytes(c.data) for c in self.connections)

    def targets(self) -> list[str]:
        return [r["target"] for r in self.requests]

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        record = BackendConnection(sock=sock)
        with self.lock:
            self.connections.append(record)
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
        current: dict[str, Any] | None = None
        try:
            while True:
                if self.read_rate:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    time.sleep(1024 / self.read_rate)
                    data = sock.recv(1024)
                else:
                    data = sock.recv(256 * 1024)
                if not data:
                    return
                record.data += data
                parser.receive_data(data)
                while True:
                    event = parser.next_event()
                    if event is h11.NEED_DATA or event is h11.PAUSED:
                        break
                    if isinstance(event, h11.Request):
                        current = {"method": event.method.decode(), "target": event.target.decode(),
                                   "headers": [(k.decode(), v.decode("latin-1")) for k, v in event.headers.raw_items()],
                                   "body": bytearray(), "body_bytes": 0, "sha256": hashlib.sha256()}
                        record.requests.append(current)
                    elif isinstance(event, h11.Data) and current is not None:
                        if len(current["body"]) < 1024 * 1024:
                            current["body"] += event.data
                        current["body_bytes"] += len(event.data)
                        current["sha256"].update(event.data)
                    elif isinstance(event, h11.EndOfMessage) and current is not None:
                        current["complete"] = True
                        answer = self.behaviour(current, record)
                        if answer is None:
                            return
                        if callable(answer):
                            answer(sock)
                        else:
                            sock.sendall(answer)
                        # we answered with raw bytes, so h11 cannot cycle: a new parser takes the rest
                        leftover = parser.trailing_data[0]
                        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
                        if leftover:
                            parser.receive_data(leftover)
                        current = None
        except (h11.RemoteProtocolError, OSError):
            return
        finally:
            record.closed = True
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def ok(request: dict[str, Any], connection: BackendConnection) -> bytes:
    body = f"ok {request['method']} {request['target']}".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


def header_values(request: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in request["headers"] if k.lower() == name.lower()]


# ---------------------------------------------------------------- the proxy


class Proxy:
    """A real WorkerPool (2 worker processes) with one listener per kind, in front of one RawBackend."""

    def __init__(self, pki: DemoPki, backend: RawBackend, bounds: str, workers: int = 2,
                 extra: Callable[[RawBackend], list[resources_pb2.Listener]] | None = None) -> None:
        self.ports = {"strict": free_port(), "allow": free_port(), "underscores": free_port()}
        listeners = [
            listener("strict", self.ports["strict"], backend.address, policy("REJECT_INVALID")),
            listener("allow", self.ports["allow"], backend.address, policy("ALLOW_INVALID_OR_MISSING_CLIENT_CERT")),
            listener("underscores", self.ports["underscores"], backend.address,
                     policy("ALLOW_INVALID_OR_MISSING_CLIENT_CERT"), allow_underscores_in_headers=True),
        ]
        previous = os.environ.get("MTLSGATE_PROXY_BOUNDS")
        os.environ["MTLSGATE_PROXY_BOUNDS"] = bounds  # the spawned workers read it at start
        try:
            self.harness = PoolHarness(workers=workers)
        finally:
            if previous is None:
                os.environ.pop("MTLSGATE_PROXY_BOUNDS", None)
            else:
                os.environ["MTLSGATE_PROXY_BOUNDS"] = previous
        self.harness.apply(node_config(pki, listeners))
        self.pki = pki

    def worker_pids(self) -> list[int]:
        return list(self.harness.pool.pids())

    def metric(self, name: str, *labels: str) -> int:
        totals = self.harness.in_loop(lambda: self.harness.pool.metrics.totals())
        return sum(v for (metric, lbl), v in totals.items() if metric == name and (not labels or lbl == labels))

    def close(self) -> None:
        self.harness.close()


def connect(port: int, pki: DemoPki | None, who: str | None = "client", *, source: str | None = None,
            timeout: float = 10.0, **ctx_options: Any) -> ssl.SSLSocket:
    """A TLS connection to the proxy, presenting `who`'s certificate from the test PKI (None: none)."""
    ctx = client_context(pki, who, **ctx_options)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                   source_address=(source, 0) if source else None)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def read_response(sock: socket.socket, buf: bytearray | None = None) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length or chunked body). `buf` carries bytes already read past a response."""
    buf = buf if buf is not None else bytearray()

    def fill() -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed ({len(buf)} bytes unread)")
        buf.extend(chunk)

    while b"\r\n\r\n" not in buf:
        fill()
    end = buf.index(b"\r\n\r\n")
    status_line, *lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    headers = {}
    for line in lines:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = bytearray()
    if headers.get("transfer-encoding") == "chunked":
        while True:
            while b"\r\n" not in buf:
                fill()
            size_end = buf.index(b"\r\n")
            size = int(bytes(buf[:size_end]), 16)
            while len(buf) < size_end + 2 + size + 2:
                fill()
            body += buf[size_end + 2:size_end + 2 + size]
            del buf[:size_end + 2 + size + 2]
            if size == 0:
                break
    else:
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            fill()
        body += buf[:length]
        del buf[:length]
    return int(status_line.split()[1]), headers, bytes(body)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes the connection (EOF or reset) within `timeout`, reading what comes."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ssl.SSLError, ConnectionResetError):
        return True
    except TimeoutError:
        return False
    return True


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def backend() -> Iterator[RawBackend]:
    b = RawBackend()
    yield b
    b.close()


def served(port: int, pki: DemoPki, *, source: str | None = None, path: str = "/probe") -> int:
    with connect(port, pki, source=source, timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\n\r\n".encode())
        return read_response(s)[0]


def wait_for_target(backend: RawBackend, target: str, timeout: float = 10.0) -> None:
    wait_until(lambda: target in backend.targets(), timeout=timeout, message=f"backend to receive {target}")
