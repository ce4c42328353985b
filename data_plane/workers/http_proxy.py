"""One client connection: TLS termination (memory BIO), HTTP/1.1 parsing with httptools, and forwarding to
the listener's backend with the validation verdict rendered into headers (SPEC §4, §5).

The protocol object is event-loop glue; decisions come from the listener runtime (validation engine,
header set). Backend connections are kept alive in a small per-worker pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httptools

from data_plane.validation import headers as headers_mod
from data_plane.workers.forwarding import REASONS as _REASONS
from data_plane.workers.forwarding import request_head, response_head
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

_XFCC_SANITIZE = int(XFCC.SANITIZE)


class ProtocolViolation(Exception):
    """A client broke one of our bounds; answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- backend side


class BackendConnection(asyncio.Protocol):
    """A kept-alive HTTP/1.1 connection to a backend. While an exchange is active, response bytes go
    straight through httptools into the exchange's callbacks, which write to the client: no queue, no
    coroutine switch per chunk."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # a backend talking out of turn cannot be trusted with the next request
            return
        exchange.received(data)

    def eof_received(self) -> bool | None:
        self._lost()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def _lost(self) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.backend_closed()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class BackendPool:
    """Idle kept-alive backend connections of one worker, per backend address."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], collections.deque[BackendConnection]] = collections.defaultdict(
            collections.deque)

    def take_idle(self, address: tuple[str, int]) -> BackendConnection | None:
        """A kept-alive connection to `address` if one is idle (the backend may still have closed it)."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def acquire(self, address: tuple[str, int], *, fresh: bool = False) -> tuple[BackendConnection, bool]:
        """A connection and whether it was reused (a reused one may have been closed by the backend)."""
        conn = None if fresh else self.take_idle(address)
        if conn is not None:
            return conn, True
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(BACKEND_CONNECT_TIMEOUT):
            _, conn = await loop.create_connection(BackendConnection, address[0], address[1])
        return conn, False

    def release(self, address: tuple[str, int], conn: BackendConnection) -> None:
        idle = self._idle[address]
        conn.exchange = None
        if conn.closed or len(idle) >= MAX_IDLE_BACKEND_CONNECTIONS:
            conn.close()
        else:
            idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


ExchangeResult = tuple[int, bool, bool] | BaseException


class Exchange:
    """One request's response from a backend, relayed to the client as it is parsed (httptools
    callbacks). `on_done` is called once with (status, backend reusable, client keep-alive), or with
    BackendFailed when the backend closed or sent garbage before a response began, or TimeoutError."""

    def __init__(self, client: ClientConnection, request: _Request, backend: BackendConnection,
                 on_done: Callable[[ExchangeResult], None]) -> None:
        self.client = client
        self.request = request
        self.backend = backend
        self.parser = httptools.HttpResponseParser(self)
        self.on_done = on_done
        self.finished = False
        self.deadline = time.monotonic() + BACKEND_RESPONSE_TIMEOUT  # checked by the worker's sweeper
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.started = False  # the response head went to the client
        self.interim = False
        self.chunked_out = False
        self.client_keep_alive = request.keep_alive and not client.worker.draining
        self.out: list[bytes] = []
        backend.exchange = self

    # ---- bytes from the backend

    def received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.started:
                self._fail(f"malformed backend response: {exc}")
            else:
                self._finish(backend_reusable=False, client_keep_alive=False)
            return
        self._flush()
        if self.request.method == b"HEAD" and self.started and not self.finished:
            self._finish(backend_reusable=False, client_keep_alive=self.client_keep_alive)

    def backend_closed(self) -> None:
        if self.finished:
            return
        if not self.started:
            self._fail("backend closed the connection without a response")
            return
        # a close-delimited body ends here
        if self.chunked_out:
            self.out.append(b"0\r\n\r\n")
        self._flush()
        self._finish(backend_reusable=False, client_keep_alive=self.client_keep_alive and self.chunked_out)

    # ---- httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:
            # Interim responses are not relayed, except the 100 Continue a client asked for (it holds
            # its body back until then); the final response follows on the same connection.
            self.interim = True
            if self.status == 100 and self.request.expect_continue:
                self.request.expect_continue = False
                self.out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._head()

    def on_body(self, body: bytes) -> None:
        if self.interim:
            return
        if self.chunked_out:
            self.out.append(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            self.headers = []
            self.reason = b""
            return
        if self.chunked_out:
            self.out.append(b"0\r\n\r\n")
        self._flush()
        self._finish(backend_reusable=self.parser.should_keep_alive(), client_keep_alive=self.client_keep_alive)

    # ---- to the client

    def _head(self) -> None:
        head = response_head(self.status, self.reason, self.headers, request_method=self.request.method,
                             request_http_version=self.request.http_version, keep_alive=self.client_keep_alive)
        self.chunked_out, self.client_keep_alive = head.chunked, head.keep_alive
        self.out.append(head.data)
        self.started = True

    def _flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        try:
            self.client.send(data)
        except TlsFailed:
            self._finish(backend_reusable=False, client_keep_alive=False)
            return
        if self.client.write_paused and self.backend.transport is not None:
            # The client reads slower than the backend writes: stop reading the backend until it drains.
            self.backend.transport.pause_reading()
            self.client.on_write_resumed = self._resume_backend

    def _resume_backend(self) -> None:
        if self.backend.transport is not None and not self.backend.closed:
            self.backend.transport.resume_reading()

    def _done(self, result: ExchangeResult) -> None:
        if not self.finished:
            self.finished = True
            self.on_done(result)

    def _finish(self, *, backend_reusable: bool, client_keep_alive: bool) -> None:
        self._done((self.status, backend_reusable, client_keep_alive))

    def timed_out(self) -> None:
        self._done(TimeoutError())

    def _fail(self, message: str) -> None:
        self._done(BackendFailed(message))


def _settle(future: asyncio.Future[tuple[int, bool, bool]], result: ExchangeResult) -> None:
    if not future.done():
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class BackendFailed(Exception):
    """The backend closed or misbehaved before a response began (nothing was sent to the client)."""


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
    body: asyncio.Queue[bytes | None] | None = None  # only for requests that have a body
    body_complete: bool = False
    expect_continue: bool = False
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
        self.peer_bytes = b""
        self.verdict: Any = None
        self._parser: httptools.HttpRequestParser | None = None
        self._pending: collections.deque[_Request] = collections.deque()
        self._current: _Request | None = None
        self._cur_headers: list[tuple[bytes, bytes]] = []
        self._cur_url = b""
        self._header_bytes = 0
        self._handler: asyncio.Task[None] | None = None
        self._exchange: Exchange | None = None
        # Deadlines are checked by the worker's sweeper (check_deadlines) instead of a loop timer per
        # request: arming and cancelling timers cost ~7 us per proxied request.
        self.deadline = 0.0
        self._on_deadline: Callable[[], None] = self.close
        self._closing = False
        self.write_paused = False
        self.on_write_resumed: Callable[[], None] | None = None
        self._cert_header_lines: bytes | None = None
        self._cert_header_verdict: Any = None
        self._paused_reading = False
        self.in_flight = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.listener = self._lookup()
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.peer_bytes = self.peer[0].encode()
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
        if self._exchange is not None and not self._exchange.finished:
            self._exchange.backend.close()  # mid-response: that backend connection cannot be reused
        self._resume_writers()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_writers()

    def _resume_writers(self) -> None:
        callback, self.on_write_resumed = self.on_write_resumed, None
        if callback is not None:
            callback()

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
            # httptools wraps exceptions raised in our callbacks; a bound we enforce keeps its status
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ProtocolViolation):
                self._send_error_and_close(cause.status, str(cause))
            else:
                self._send_error_and_close(400, f"malformed request: {exc}")
            return
        if (self._current is not None and self._current.buffered > MAX_BUFFERED_BODY) or \
                len(self._pending) >= MAX_PIPELINED_REQUESTS:
            self._pause_reading()
        if not self.in_flight and not self._pending and self._current is None:
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
        expect_continue = False
        for name, value in self._cur_headers:
            lname = name.lower()
            if lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lname == b"content-length":
                content_length = value.strip()
            elif lname == b"expect":
                expect_continue = value.strip().lower() == b"100-continue"
        request = _Request(
            method=parser.get_method(), url=self._cur_url, http_version=parser.get_http_version(),
            headers=self._cur_headers, keep_alive=parser.should_keep_alive(), chunked=chunked,
            content_length=content_length, expect_continue=expect_continue,
        )
        if chunked or content_length not in (None, b"0"):
            request.body = asyncio.Queue()
        self._current = request
        self._pending.append(request)
        self._dispatch()

    def on_body(self, body: bytes) -> None:
        if self._current is not None and self._current.body is not None:
            self._current.buffered += len(body)
            self._current.body.put_nowait(body)

    def on_message_complete(self) -> None:
        if self._current is not None:
            if self._current.body is not None:
                self._current.body.put_nowait(None)
            self._current.body_complete = True
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

    def _dispatch(self) -> None:
        """Start the oldest pending request unless one is in flight. A bodiless request with a kept-alive
        backend connection at hand runs entirely from callbacks (the common case, kept cheap); anything
        that has to wait (connecting, a request body, rejectAt HTTP) runs in a task."""
        listener = self.listener
        if self.in_flight or not self._pending or self._closing or listener is None:
            return
        request = self._pending[0]
        self.in_flight = True
        self._cancel_timer()
        if request.body is None and not self._rejected_at_http():
            conn = self.worker.backends.take_idle(listener.backend)
            if conn is not None:
                self._start_exchange(request, listener, conn)
                return
        self._handler = asyncio.get_running_loop().create_task(self._serve_one(request))

    def _rejected_at_http(self) -> bool:
        assert self.listener is not None
        return self.listener.reject_at_http and self.verdict is not None and not self.verdict.accepted

    def _start_exchange(self, request: _Request, listener: ListenerRuntime, conn: BackendConnection) -> None:
        assert conn.transport is not None
        head = self._upstream_head(request, listener, self.verdict)

        def done(result: ExchangeResult) -> None:
            self._exchange = None
            if isinstance(result, BackendFailed):
                # The idle keep-alive connection had been closed by the backend: retry once, freshly.
                conn.close()
                self._handler = asyncio.get_running_loop().create_task(self._serve_one(request, fresh=True))
                return
            if isinstance(result, BaseException):  # timed out
                conn.close()
                keep_alive = False if exchange.started else self._backend_failed(
                    request, 504, f"backend {listener.backend[0]}:{listener.backend[1]} did not answer in time")
                self._finish_request(keep_alive)
                return
            status, backend_reusable, client_keep_alive = result
            self._backend_done(listener, conn, backend_reusable, status)
            self._finish_request(client_keep_alive)

        exchange = Exchange(self, request, conn, done)
        self._exchange = exchange
        conn.transport.write(head)

    def _backend_done(self, listener: ListenerRuntime, conn: BackendConnection, reusable: bool, status: int) -> None:
        if reusable:
            self.worker.backends.release(listener.backend, conn)
        else:
            conn.exchange = None
            conn.close()
        self.worker.counters.inc("mtlsgate_requests_total", listener.name, str(status))

    async def _serve_one(self, request: _Request, fresh: bool = False) -> None:
        try:
            keep_alive = await self._handle(request, fresh)
        except asyncio.CancelledError:
            return
        except TlsFailed:
            self.close()
            return
        finally:
            self._handler = None
        self._finish_request(keep_alive)

    def _finish_request(self, keep_alive: bool) -> None:
        self.in_flight = False
        if self._pending:
            self._pending.popleft()
        self._resume_reading()
        if not keep_alive or self.worker.draining:
            self.close()
        elif self._pending:
            self._dispatch()
        elif not self._closing:
            self._arm_timer(IDLE_TIMEOUT, self.close)

    async def _handle(self, request: _Request, fresh: bool) -> bool:
        listener = self.listener
        assert listener is not None
        verdict = self.verdict
        if self._rejected_at_http():
            status = listener.http_status(verdict)
            await self._drain_body(request)
            self._respond_simple(status, f"{status} {_REASONS.get(status, '')}: client certificate rejected: "
                                         f"{verdict.error}\n", request.keep_alive)
            return request.keep_alive
        return await self._forward(request, listener, verdict, fresh)

    async def _drain_body(self, request: _Request) -> None:
        if request.body is None:
            return
        while True:
            chunk = await request.body.get()
            if chunk is None:
                return
            request.buffered -= len(chunk)
            self._resume_reading()

    def _upstream_head(self, request: _Request, listener: ListenerRuntime, verdict: Any) -> bytes:
        certificate_headers = b""
        if listener.mtls and verdict is not None:
            if self._cert_header_lines is None or self._cert_header_verdict is not verdict:
                # rendered once per connection (and again if revalidation replaced the verdict)
                self._cert_header_lines = b"".join(
                    f"{name}: {value}\r\n".encode("latin-1") for name, value in listener.header_set.render(verdict))
                self._cert_header_verdict = verdict
            certificate_headers = self._cert_header_lines
        xfcc = None
        if listener.xfcc_mode != _XFCC_SANITIZE:
            xfcc = functools.partial(self._xfcc_value, listener, verdict)
        return request_head(request.method, request.url, request.headers, peer=self.peer_bytes,
                            spoofable=listener.spoofable_names, certificate_headers=certificate_headers, xfcc=xfcc,
                            chunked=request.chunked, content_length=request.content_length)

    def _xfcc_value(self, listener: ListenerRuntime, verdict: Any, incoming: list[bytes]) -> bytes:
        if verdict is None:
            return b""
        joined = b",".join(incoming).decode("latin-1") if incoming else None
        value = headers_mod.render_xfcc(verdict, listener.xfcc_mode, joined)
        return value.encode("latin-1") if value else b""

    async def _forward(self, request: _Request, listener: ListenerRuntime, verdict: Any, fresh: bool) -> bool:
        head = self._upstream_head(request, listener, verdict)
        has_body = request.body is not None
        backend = f"{listener.backend[0]}:{listener.backend[1]}"
        for attempt in (0, 1):
            try:
                conn, reused = await self.worker.backends.acquire(listener.backend, fresh=fresh or attempt > 0)
            except TimeoutError:
                return self._backend_failed(request, 504, f"connecting to backend {backend} timed out")
            except OSError as exc:
                return self._backend_failed(request, 502, f"cannot connect to backend {backend}: {exc.strerror or exc}")
            assert conn.transport is not None
            result: asyncio.Future[tuple[int, bool, bool]] = asyncio.get_running_loop().create_future()
            exchange = Exchange(self, request, conn, functools.partial(_settle, result))
            self._exchange = exchange
            conn.transport.write(head)
            try:
                if has_body:
                    await self._send_body(request, conn)
                status, backend_reusable, client_keep_alive = await result
            except asyncio.CancelledError:
                conn.close()  # the client went away mid-exchange: this backend connection is in an unknown state
                raise
            except TimeoutError:
                conn.close()
                if exchange.started:
                    return False  # the head already went out; all we can do is close
                return self._backend_failed(request, 504, f"backend {backend} did not answer in time")
            except BackendFailed as exc:
                conn.close()
                if reused and attempt == 0 and not has_body:
                    continue  # the backend closed an idle keep-alive connection: retry once on a fresh one
                return self._backend_failed(request, 502, f"backend {backend}: {exc}")
            finally:
                self._exchange = None
            self._backend_done(listener, conn, backend_reusable, status)
            return client_keep_alive
        return False

    def _backend_failed(self, request: _Request, status: int, message: str) -> bool:
        assert self.listener is not None
        log_event("backend_error", listener=self.listener.name, worker=self.worker.worker_id, status=status,
                  message=message)
        self._respond_simple(status, f"{status} {_REASONS.get(status, '')}: {message}\n", request.keep_alive)
        return request.keep_alive

    async def _send_body(self, request: _Request, conn: BackendConnection) -> None:
        assert conn.transport is not None and request.body is not None
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

    # ---- writing to the client

    def send(self, data: bytes) -> None:
        """Encrypt and send response bytes; raises TlsFailed when the client is gone."""
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
            self.send(head.encode() + payload)

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
        self.deadline = time.monotonic() + delay
        self._on_deadline = callback

    def _cancel_timer(self) -> None:
        self.deadline = 0.0

    def check_deadlines(self, now: float) -> None:
        """Called by the worker's sweeper: handshake/idle deadline, then the backend response deadline."""
        if self.deadline and now >= self.deadline:
            self.deadline = 0.0
            self._on_deadline()
        exchange = self._exchange
        if exchange is not None and exchange.deadline and now >= exchange.deadline:
            exchange.deadline = 0.0
            request = exchange.request
            if request.body is not None and not request.body_complete:
                self.close()  # the client stalled mid-body: nothing sensible can be sent any more
            else:
                exchange.timed_out()


