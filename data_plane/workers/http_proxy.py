"""One client connection: TLS termination (memory BIO), HTTP/1.1 parsing with httptools, and forwarding to
the listener's backend with the validation verdict rendered into headers (SPEC §4, §5).

The protocol object is event-loop glue; decisions come from the listener runtime (validation engine,
header set). Backend connections are kept alive in a small per-worker pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httptools

from data_plane.validation import headers as headers_mod
from data_plane.workers.listeners import XFCC, ListenerRuntime
from data_plane.workers.observability import WorkerCounters, log_event
from data_plane.workers.tls import TlsConnection, TlsFailed

# Bounds on what a client controls (SPEC §8). Listener-independent; see docs/tls-design.md.
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_PIPELINED_REQUESTS = 16
MAX_BUFFERED_BODY = 1024 * 1024
BACKEND_CONNECT_TIMEOUT = 5.0
BACKEND_RESPONSE_TIMEOUT = 60.0
MAX_IDLE_BACKEND_CONNECTIONS = 64
MAX_CONNECTIONS_PER_WORKER = 4096

_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization",
})
_REASONS = {200: "OK", 400: "Bad Request", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            495: "SSL Certificate Error", 496: "SSL Certificate Required", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}
_XFCC = b"x-forwarded-client-cert"


class ProtocolViolation(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- backend side


class BackendConnection(asyncio.Protocol):
    """A kept-alive HTTP/1.1 connection to a backend; feeds response bytes to whoever waits for them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.put_nowait(data)

    def eof_received(self) -> bool | None:
        self.closed = True
        self.chunks.put_nowait(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.chunks.put_nowait(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class BackendPool:
    """Idle kept-alive backend connections of one worker, per backend address."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], collections.deque[BackendConnection]] = collections.defaultdict(
            collections.deque)

    async def acquire(self, address: tuple[str, int]) -> tuple[BackendConnection, bool]:
        """A connection and whether it was reused (a reused one may have been closed by the backend)."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.chunks.empty():
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(BackendConnection, address[0], address[1]), BACKEND_CONNECT_TIMEOUT)
        return conn, False

    def release(self, address: tuple[str, int], conn: BackendConnection) -> None:
        idle = self._idle[address]
        if conn.closed or len(idle) >= MAX_IDLE_BACKEND_CONNECTIONS:
            conn.close()
        else:
            idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class _BackendResponse:
    """httptools callbacks for one backend response."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.body: list[bytes] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


# ---------------------------------------------------------------- client side


@dataclass
class _Request:
    method: bytes
    url: bytes
    http_version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    chunked: bool
    content_length: bytes | None
    body: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    buffered: int = 0


class WorkerContext(Protocol):
    """What a connection needs from its worker (worker.py provides it)."""

    counters: WorkerCounters
    backends: BackendPool
    connections: set[ClientConnection]
    worker_id: int
    draining: bool


class ClientConnection(asyncio.Protocol):
    """Server side of one client TCP connection on a listener."""

    def __init__(self, worker: WorkerContext, listener_lookup: Callable[[], ListenerRuntime | None]) -> None:
        self.worker = worker
        self._lookup = listener_lookup
        self.listener: ListenerRuntime | None = None
        self.transport: asyncio.Transport | None = None
        self.tls: TlsConnection | None = None
        self.peer = ("", 0)
        self.verdict: Any = None
        self._parser: httptools.HttpRequestParser | None = None
        self._pending: collections.deque[_Request] = collections.deque()
        self._current: _Request | None = None
        self._cur_headers: list[tuple[bytes, bytes]] = []
        self._cur_url = b""
        self._header_bytes = 0
        self._handler: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._paused_reading = False
        self.in_flight = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.listener = self._lookup()
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        if self.listener is None or self.worker.draining or \
                len(self.worker.connections) >= MAX_CONNECTIONS_PER_WORKER:
            transport.close()
            return
        self.worker.connections.add(self)
        self.tls = self.listener.tls.connection()
        self._arm_timer(HANDSHAKE_TIMEOUT, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        if tls is None or self._closing:
            return
        try:
            tls.receive(data)
            if not tls.handshake_done:
                try:
                    done = tls.do_handshake()
                finally:
                    self._flush()
                if not done:
                    return
                self._handshake_completed()
            plaintext = tls.read()
            self._flush()
            if plaintext:
                self._feed(plaintext)
            if tls.closed_by_peer:
                self._peer_closed()
        except TlsFailed as exc:
            self._handshake_failed(str(exc)) if not tls.handshake_done else self.close()

    def eof_received(self) -> bool | None:
        self._peer_closed()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.worker.connections.discard(self)
        self._cancel_timer()
        if self._handler is not None and not self._handler.done():
            self._handler.cancel()
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # ---- TLS

    def _flush(self) -> None:
        assert self.tls is not None and self.transport is not None
        out = self.tls.outgoing()
        if out and not self.transport.is_closing():
            self.transport.write(out)

    def _handshake_completed(self) -> None:
        assert self.tls is not None and self.listener is not None
        self.verdict = self.tls.verdict
        listener = self.listener
        verdict = self.verdict
        if verdict is None:
            self.worker.counters.inc("mtlsgate_handshakes_total", listener.name, "ok", "")
        elif verdict.accepted:
            self.worker.counters.inc("mtlsgate_handshakes_total", listener.name, "ok", verdict.error or "")
        else:
            # ALLOW mode lets it through with headers; rejectAt HTTP answers 495/496 per request.
            result = "rejected_at_http" if listener.reject_at_http else "ok"
            self.worker.counters.inc("mtlsgate_handshakes_total", listener.name, result, verdict.error or "")
            if listener.reject_at_http:
                self._log_rejection(verdict, "http")
        self._parser = httptools.HttpRequestParser(self)
        self._arm_timer(IDLE_TIMEOUT, self.close)

    def _handshake_failed(self, message: str) -> None:
        assert self.tls is not None and self.listener is not None
        verdict = self.tls.verdict
        if verdict is None and self.listener.tls.client_auth is not None \
                and self.listener.tls.client_auth.reject_at_tls and "peer did not return a certificate" in message:
            verdict = self.listener.validate(())
        if verdict is not None and not verdict.accepted:
            self.worker.counters.inc("mtlsgate_handshakes_total", self.listener.name, "rejected", verdict.error or "")
            self._log_rejection(verdict, "tls")
        else:
            self.worker.counters.inc("mtlsgate_handshakes_total", self.listener.name, "failed", "")
            log_event("tls_handshake_failed", listener=self.listener.name, peer=self.peer[0],
                      worker=self.worker.worker_id, message=message)
        self.close()

    def _handshake_timed_out(self) -> None:
        if self.tls is not None and not self.tls.handshake_done:
            self._handshake_failed(f"handshake not completed within {HANDSHAKE_TIMEOUT:g}s")

    def _log_rejection(self, verdict: Any, at: str) -> None:
        assert self.listener is not None
        log_event("client_rejected", listener=self.listener.name, peer=self.peer[0], worker=self.worker.worker_id,
                  rejected_at=at, error=verdict.error, reason=getattr(verdict, "reason", ""))

    # ---- HTTP parsing (httptools callbacks)

    def _feed(self, data: bytes) -> None:
        assert self._parser is not None
        self._cancel_timer()
        try:
            self._parser.feed_data(data)
        except ProtocolViolation as exc:
            self._send_error_and_close(exc.status, str(exc))
            return
        except httptools.HttpParserUpgrade:
            self._send_error_and_close(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._send_error_and_close(400, f"malformed request: {exc}")
            return
        if (self._current is not None and self._current.buffered > MAX_BUFFERED_BODY) or \
                len(self._pending) >= MAX_PIPELINED_REQUESTS:
            self._pause_reading()
        if self._handler is None and not self._pending and self._current is None:
            self._arm_timer(IDLE_TIMEOUT, self.close)

    def on_message_begin(self) -> None:
        self._cur_headers = []
        self._cur_url = b""
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._cur_url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise ProtocolViolation(431, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES or len(self._cur_headers) >= MAX_HEADERS:
            raise ProtocolViolation(431, "request headers too large")
        self._cur_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        chunked = False
        content_length = None
        for name, value in self._cur_headers:
            lname = name.lower()
            if lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lname == b"content-length":
                content_length = value.strip()
        request = _Request(
            method=parser.get_method(), url=self._cur_url, http_version=parser.get_http_version(),
            headers=self._cur_headers, keep_alive=parser.should_keep_alive(), chunked=chunked,
            content_length=content_length,
        )
        self._current = request
        self._pending.append(request)
        if self._handler is None:
            self._handler = asyncio.get_running_loop().create_task(self._serve())

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.buffered += len(body)
            self._current.body.put_nowait(body)

    def on_message_complete(self) -> None:
        if self._current is not None:
            self._current.body.put_nowait(None)
            self._current = None

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None and not self._closing:
            self._paused_reading = False
            self.transport.resume_reading()

    # ---- request handling

    async def _serve(self) -> None:
        try:
            while self._pending and not self._closing:
                request = self._pending[0]
                self.in_flight = True
                keep_alive = await self._handle(request)
                self.in_flight = False
                self._pending.popleft()
                self._resume_reading()
                if not keep_alive or self.worker.draining:
                    self.close()
                    return
        except asyncio.CancelledError:
            return
        except TlsFailed:
            self.close()
            return
        finally:
            self.in_flight = False
            self._handler = None
        if not self._closing:
            self._arm_timer(IDLE_TIMEOUT, self.close)

    async def _handle(self, request: _Request) -> bool:
        listener = self.listener
        assert listener is not None
        verdict = self.verdict
        if listener.reject_at_http and verdict is not None and not verdict.accepted:
            status = listener.http_status(verdict)
            await self._drain_body(request)
            self._respond_simple(status, f"{status} {_REASONS.get(status, '')}: client certificate rejected: "
                                         f"{verdict.error}\n", request.keep_alive)
            return request.keep_alive
        return await self._forward(request, listener, verdict)

    async def _drain_body(self, request: _Request) -> None:
        if request.content_length is None and not request.chunked:
            return
        while True:
            chunk = await request.body.get()
            if chunk is None:
                return
            request.buffered -= len(chunk)
            self._resume_reading()

    def _upstream_head(self, request: _Request, listener: ListenerRuntime, verdict: Any) -> bytes:
        strip: set[bytes] = set(_HOP_BY_HOP)
        for name, value in request.headers:
            if name.lower() == b"connection":
                strip.update(token.strip().lower() for token in value.split(b","))
        strip.update(listener.spoofable_names)
        incoming_xfcc = []
        forwarded_for = b""
        lines = [request.method + b" " + request.url + b" HTTP/1.1\r\n"]
        for name, value in request.headers:
            lname = name.lower()
            if lname == _XFCC:
                incoming_xfcc.append(value)
                continue
            if lname == b"x-forwarded-for":
                forwarded_for = forwarded_for + b", " + value if forwarded_for else value
                continue
            if lname == b"x-forwarded-proto" or lname in strip:
                continue
            lines.append(name + b": " + value + b"\r\n")
        peer = self.peer[0].encode()
        lines.append(b"X-Forwarded-For: " + (forwarded_for + b", " + peer if forwarded_for else peer) + b"\r\n")
        lines.append(b"X-Forwarded-Proto: https\r\n")
        if listener.mtls and verdict is not None:
            for name, value in listener.header_set.render(verdict):
                lines.append(f"{name}: {value}\r\n".encode())
        xfcc = self._xfcc_value(listener, verdict, incoming_xfcc)
        if xfcc:
            lines.append(b"X-Forwarded-Client-Cert: " + xfcc + b"\r\n")
        if request.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif request.content_length is not None:
            lines.append(b"Content-Length: " + request.content_length + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _xfcc_value(self, listener: ListenerRuntime, verdict: Any, incoming: list[bytes]) -> bytes:
        if listener.xfcc_mode == XFCC.SANITIZE or verdict is None:
            return b""
        joined = b",".join(incoming).decode("latin-1") if incoming else None
        value = headers_mod.render_xfcc(verdict, listener.xfcc_mode, joined)
        return value.encode("latin-1") if value else b""

    async def _forward(self, request: _Request, listener: ListenerRuntime, verdict: Any) -> bool:
        head = self._upstream_head(request, listener, verdict)
        has_body = request.chunked or (request.content_length not in (None, b"0"))
        status = 502
        for attempt in (0, 1):
            try:
                conn, reused = await self.worker.backends.acquire(listener.backend)
            except (TimeoutError, OSError) as exc:
                return self._backend_failed(request, 502 if not isinstance(exc, asyncio.TimeoutError) else 504,
                                            f"cannot connect to backend {listener.backend[0]}:{listener.backend[1]}")
            assert conn.transport is not None
            conn.transport.write(head)
            if has_body:
                await self._send_body(request, conn)
            try:
                result = await asyncio.wait_for(self._relay_response(request, conn), BACKEND_RESPONSE_TIMEOUT)
            except TimeoutError:
                conn.close()
                return self._backend_failed(request, 504, "backend did not answer in time")
            except _BackendClosedEarly:
                conn.close()
                if reused and attempt == 0 and not has_body:
                    continue  # the backend closed an idle keep-alive connection: retry once on a fresh one
                return self._backend_failed(request, 502, "backend closed the connection without a response")
            status, backend_keep_alive, client_keep_alive = result
            if backend_keep_alive:
                self.worker.backends.release(listener.backend, conn)
            else:
                conn.close()
            self.worker.counters.inc("mtlsgate_requests_total", listener.name, str(status))
            return client_keep_alive
        return self._backend_failed(request, status, "backend failed")

    def _backend_failed(self, request: _Request, status: int, message: str) -> bool:
        assert self.listener is not None
        log_event("backend_error", listener=self.listener.name, worker=self.worker.worker_id, status=status,
                  message=message)
        self._respond_simple(status, f"{status} {_REASONS.get(status, '')}: {message}\n", request.keep_alive)
        return request.keep_alive

    async def _send_body(self, request: _Request, conn: BackendConnection) -> None:
        assert conn.transport is not None
        while True:
            chunk = await request.body.get()
            if chunk is None:
                if request.chunked:
                    conn.transport.write(b"0\r\n\r\n")
                return
            request.buffered -= len(chunk)
            if request.chunked:
                conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                conn.transport.write(chunk)
            self._resume_reading()

    async def _relay_response(self, request: _Request, conn: BackendConnection) -> tuple[int, bool, bool]:
        """Stream one backend response to the client; returns (status, backend keep-alive, client keep-alive)."""
        response = _BackendResponse()
        parser = httptools.HttpResponseParser(response)
        is_head = request.method == b"HEAD"
        started = False
        client_keep_alive = request.keep_alive and not self.worker.draining
        chunked_out = False
        while True:
            data = await conn.chunks.get()
            if data is None:
                if not started:
                    raise _BackendClosedEarly()
                with contextlib.suppress(httptools.HttpParserError):
                    parser.feed_data(b"")
                if not response.complete:
                    # close-delimited body ended (or the backend broke mid-body)
                    if chunked_out:
                        self._write(b"0\r\n\r\n")
                    return response.status, False, client_keep_alive and chunked_out
                break
            started = True
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                if not response.headers_done:
                    return self._bad_backend_response(request, f"malformed backend response: {exc}")
                return response.status, False, False
            if response.headers_done and response.status == 0:
                response.status = parser.get_status_code()
                if 100 <= response.status < 200:
                    # interim responses are not relayed; wait for the final one
                    response = _BackendResponse()
                    parser = httptools.HttpResponseParser(response)
                    continue
                chunked_out, client_keep_alive = self._send_response_head(
                    request, response, client_keep_alive, is_head)
                if is_head:
                    return response.status, False, client_keep_alive
            if response.body and response.status:
                body = b"".join(response.body)
                response.body.clear()
                if chunked_out:
                    self._write(b"%x\r\n%b\r\n" % (len(body), body))
                else:
                    self._write(body)
                await self._can_write.wait()
            if response.complete:
                break
        if chunked_out:
            self._write(b"0\r\n\r\n")
        return response.status, parser.should_keep_alive(), client_keep_alive

    def _bad_backend_response(self, request: _Request, message: str) -> tuple[int, bool, bool]:
        self._backend_failed(request, 502, message)
        return 502, False, request.keep_alive

    def _send_response_head(self, request: _Request, response: _BackendResponse, client_keep_alive: bool,
                            is_head: bool) -> tuple[bool, bool]:
        strip = set(_HOP_BY_HOP)
        has_length = False
        for name, value in response.headers:
            lname = name.lower()
            if lname == b"connection":
                strip.update(token.strip().lower() for token in value.split(b","))
            elif lname == b"content-length":
                has_length = True
        no_body = is_head or response.status in (204, 304)
        lines = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}\r\n".encode()]
        lines.extend(name + b": " + value + b"\r\n" for name, value in response.headers
                     if name.lower() not in strip)
        chunked_out = False
        if not has_length and not no_body:
            if request.http_version == "1.1":
                chunked_out = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                client_keep_alive = False
        if not client_keep_alive:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        self._write(b"".join(lines))
        return chunked_out, client_keep_alive

    # ---- writing to the client

    def _write(self, data: bytes) -> None:
        if self._closing or self.tls is None or self.transport is None:
            raise TlsFailed("client connection closed")
        self.tls.write(data)
        self._flush()

    def _respond_simple(self, status: int, body: str, keep_alive: bool) -> None:
        assert self.listener is not None
        payload = body.encode()
        connection = "" if keep_alive else "Connection: close\r\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(payload)}\r\n{connection}\r\n")
        self.worker.counters.inc("mtlsgate_requests_total", self.listener.name, str(status))
        with contextlib.suppress(TlsFailed):
            self._write(head.encode() + payload)

    def _send_error_and_close(self, status: int, message: str) -> None:
        self._respond_simple(status, f"{status} {_REASONS.get(status, '')}: {message}\n", False)
        self.close()

    # ---- lifecycle

    def _peer_closed(self) -> None:
        if not self.in_flight and not self._pending:
            self.close()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._cancel_timer()
        if self.tls is not None and self.tls.handshake_done and self.transport is not None:
            self.tls.shutdown()
            with contextlib.suppress(Exception):
                self._flush()
        if self.transport is not None:
            self.transport.close()

    def idle(self) -> bool:
        return not self.in_flight and not self._pending

    def _arm_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _BackendClosedEarly(Exception):
    pass
