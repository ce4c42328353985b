"""One client connection: TLS termination (memory BIO), HTTP/1.1 parsing with httptools, and forwarding to
the listener's backend with the validation verdict rendered into headers (SPEC §4, §5, §11).

Event-loop glue only: what a head becomes, whether a request may be re-sent and which connection is
evicted are decided in `data_plane/http/`; the bounds are `data_plane/http/bounds.py`'s. Backend
connections are kept alive in a small per-worker pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import httptools

from data_plane.http import request as request_rules
from data_plane.http.bounds import Bounds
from data_plane.http.response import REASONS as _REASONS
from data_plane.http.routes import normalise_path, split_target
from data_plane.validation import headers as headers_mod
from data_plane.workers.backend import (
    BackendConnection,
    BackendFailed,
    BackendPool,
    Exchange,
    ExchangeResult,
    settle,
)
from data_plane.workers.listeners import XFCC, ListenerRuntime, Upstream
from data_plane.workers.observability import REPORT_HANDSHAKES, WorkerCounters, log_event
from data_plane.workers.tls import TlsConnection, TlsFailed

if TYPE_CHECKING:
    from data_plane.workers.client_tally import ClientTally
    from data_plane.workers.shadow_tally import ShadowTally

_XFCC_SANITIZE = int(XFCC.SANITIZE)
_UNSET = object()

def _label(request: _Request) -> str:
    """The backend as messages name it: HOST:PORT, or `backendServices/ID endpoint HOST:PORT`."""
    upstream = request.upstream
    if upstream is None:
        return "-"
    if upstream.service is None:
        return upstream.label
    address = request.address
    return f"{upstream.service.name} endpoint {address[0]}:{address[1]}"


class ProtocolViolation(Exception):
    """A client broke one of our bounds or rules; answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- client side


@dataclass(slots=True)
class _Request:
    head: request_rules.RequestHead
    body: asyncio.Queue[bytes | None] | None = None  # only for requests that have a body
    body_complete: bool = False
    buffered: int = 0
    refusal: request_rules.Refusal | None = None  # answered by us, never forwarded; then the connection closes
    upstream: Upstream | None = None  # where it goes: the listener's default or its route's (set on dispatch)
    address: tuple[Any, ...] = ()  # the backend (pool key) it goes to: the upstream's, or its service's pick
    endpoint: Any = None  # the BackendService endpoint chosen, until its outcome is recorded


_REFUSED_HEAD = request_rules.RequestHead(method=b"", target=b"", http_version="1.1", host=b"", headers=[],
                                          chunked=False, content_length=None, keep_alive=False)

# What a connection is waiting for; one client deadline per phase (the sweeper checks it).
_HANDSHAKE, _IDLE, _HEAD, _BODY, _WAITING = "handshake", "keepalive", "head", "body", "response"


class WorkerContext(Protocol):
    """What a connection needs from its worker (worker.py provides it)."""

    counters: WorkerCounters
    backends: BackendPool
    connections: set[ClientConnection]
    admission: Any
    bounds: Bounds
    worker_id: int
    draining: bool
    clients: ClientTally
    shadow: ShadowTally


class ClientConnection(asyncio.Protocol):
    """Server side of one client TCP connection on a listener."""

    def __init__(self, worker: WorkerContext, listener_lookup: Callable[[], ListenerRuntime | None]) -> None:
        self.worker = worker
        self.bounds = worker.bounds
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
        self._in_head = False
        self._handler: asyncio.Task[None] | None = None
        self._exchange: Exchange | None = None
        # Deadlines are checked by the worker's sweeper (check_deadlines) instead of a loop timer per
        # request: arming and cancelling timers cost ~7 us per proxied request.
        self.deadline = 0.0
        self.phase = _HANDSHAKE
        self._closing = False
        self.write_paused = False
        self.on_write_resumed: Callable[[], None] | None = None
        # our forwarded lines, made once per (verdict, header set): see _upstream_head
        self._ours_verdict: Any = _UNSET
        self._ours_set: Any = None
        self._ours: bytes | None = None
        self._certificate_lines = b""
        self._paused_reading = False
        self.in_flight = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tcp = cast(asyncio.Transport, transport)
        self.listener = self._lookup()
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.peer_bytes = self.peer[0].encode()
        if self.listener is None or self.worker.draining:
            transport.close()
            return
        decision = self.worker.admission.admit(self.peer[0])
        if decision.refuse:
            self.worker.counters.inc("mtlsgate_connections_refused_total", decision.refuse)
            transport.close()
            return
        if decision.evict is not None:
            self.worker.counters.inc("mtlsgate_connections_evicted_total", decision.evict_reason)
            decision.evict.close()
        self.worker.admission.opened(self, self.peer[0])
        self.worker.connections.add(self)
        tcp.set_write_buffer_limits(high=self.bounds.high_water)
        self.tls = self.listener.tls.connection()
        self._set_phase(_HANDSHAKE, self.bounds.handshake_timeout)

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
            if plaintext:
                # Records of our own this read made (rare) go out ahead of our next application data,
                # as TLS 1.3 asks of a KeyUpdate's answer (RFC 8446 §4.6.3): no check per request.
                self._feed(plaintext)
            elif tls.has_outgoing():  # e.g. the refusal of a TLS 1.2 renegotiation: sent at once
                self._flush()
            if tls.closed_by_peer:
                self._peer_closed()
        except TlsFailed as exc:
            self._handshake_failed(str(exc)) if not tls.handshake_done else self.close()

    def eof_received(self) -> bool | None:
        self._peer_closed()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._forget()
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
        self._judged(listener.name, verdict)
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
        self._become_idle()

    def _handshake_failed(self, message: str) -> None:
        assert self.tls is not None and self.listener is not None
        verdict = self.tls.verdict
        if verdict is None and self.listener.tls.client_auth is not None \
                and self.listener.tls.client_auth.reject_at_tls and "peer did not return a certificate" in message:
            verdict = self.listener.validate(())
        if verdict is not None and not verdict.accepted:
            self._judged(self.listener.name, verdict)
            self.worker.counters.inc("mtlsgate_handshakes_total", self.listener.name, "rejected", verdict.error or "")
            self._log_rejection(verdict, "tls")
        else:
            self.worker.counters.inc("mtlsgate_handshakes_total", self.listener.name, "failed", "")
            log_event("tls_handshake_failed", listener=self.listener.name, peer=self.peer[0],
                      worker=self.worker.worker_id, message=message)
        self.close()

    def _judged(self, listener: str, verdict: Any) -> None:
        """Node-report counting for one judged handshake (SPEC §12): two dict updates, nothing parsed."""
        if verdict is None:
            self.worker.counters.inc(REPORT_HANDSHAKES, listener, "", "", "1", "")
        else:
            self.worker.counters.inc(REPORT_HANDSHAKES, listener, "1" if verdict.present else "",
                                     "1" if verdict.chain_verified else "", "1" if verdict.accepted else "",
                                     verdict.error or "")
        self.worker.clients.saw(listener, verdict, time.time())
        runtime = self.listener
        if runtime is not None and runtime.shadows and verdict is not None:
            runtime.judge_shadows((self.tls.chain if self.tls is not None else None) or (), verdict, self.worker.shadow)

    def _log_rejection(self, verdict: Any, at: str) -> None:
        assert self.listener is not None
        log_event("client_rejected", listener=self.listener.name, peer=self.peer[0], worker=self.worker.worker_id,
                  rejected_at=at, error=verdict.error, reason=getattr(verdict, "reason", ""))

    # ---- HTTP parsing (httptools callbacks)

    def _feed(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            return  # a malformed request ended parsing; only the answers to earlier requests are left
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # `Connection: upgrade` on a bodiless request (one with a body was refused in
            # on_headers_complete): served as plain HTTP/1.1 without the Upgrade (RFC 9110 §7.8 lets a
            # server ignore it); the bytes after it are the next request.
            self._parser = httptools.HttpRequestParser(self)
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._dispatch()
            if offset < len(data):
                self._feed(data[offset:])
            return
        except httptools.HttpParserError as exc:
            # httptools wraps exceptions raised in our callbacks; a rule we enforce keeps its status
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ProtocolViolation):
                self._malformed(cause.status, str(cause))
            else:
                self._malformed(400, f"malformed request: {exc}")
        else:
            current = self._current
            if (current is not None and current.buffered > self.bounds.high_water) or \
                    len(self._pending) >= self.bounds.max_pipelined_requests:
                self._pause_reading()
        # Dispatching after the whole read was parsed means a request whose body is already known to
        # be malformed never starts, and nothing of it reaches the backend.
        self._dispatch()

    def _malformed(self, status: int, reason: str) -> None:
        """The request being parsed is refused. Requests before it are still answered, in order; no
        byte of this one reaches a backend (if its body was already streaming, the backend connection is
        closed and never reused), and nothing is re-sent because of it."""
        self._parser = None
        self._pause_reading()
        refusal = request_rules.Refusal(status, reason)
        current, self._current = self._current, None
        if current is not None and current.body is not None and not current.body_complete:
            current.body.put_nowait(None)
        if current is not None and current in self._pending:
            if self.in_flight and self._pending[0] is current:
                exchange = self._exchange
                if exchange is not None:
                    exchange.backend.close()
                if exchange is None or not exchange.started:
                    self._send_error_and_close(status, reason)
                else:
                    self.close()
                return
            current.refusal = refusal
            return
        self._pending.append(_Request(_REFUSED_HEAD, refusal=refusal))

    def on_message_begin(self) -> None:
        self._cur_headers = []
        self._cur_url = b""
        self._header_bytes = 0
        self._in_head = True
        if not self.in_flight:
            self.worker.admission.busy(self)
        if self.phase == _IDLE or self.phase == _WAITING:
            self.phase = _HEAD
            self.deadline = time.monotonic() + self.bounds.head_timeout

    def on_url(self, url: bytes) -> None:
        self._cur_url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.bounds.max_header_bytes:
            raise ProtocolViolation(431, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer fields: dropped, never merged into the head (SPEC §11)
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.bounds.max_header_bytes or len(self._cur_headers) >= self.bounds.max_headers:
            raise ProtocolViolation(431, "request headers too large")
        self._cur_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None and self.listener is not None
        self._in_head = False
        head = request_rules.read_head(
            parser.get_method(), self._cur_url, parser.get_http_version(), self._cur_headers,
            keep_alive=parser.should_keep_alive(), spoofable=self.listener.spoofable_names,
            allow_underscores=self.listener.allow_underscores)
        if isinstance(head, request_rules.Refusal):
            raise ProtocolViolation(head.status, head.reason)
        has_body = head.has_body
        if has_body and parser.should_upgrade():
            # llhttp would take the body for upgraded-protocol bytes and the next request from inside it
            raise ProtocolViolation(400, "a request with a body cannot ask for a protocol upgrade")
        request = _Request(head)
        if has_body:
            request.body = asyncio.Queue()
            self._set_phase(_BODY, self.bounds.body_idle_timeout)
        else:
            self.phase, self.deadline = _WAITING, 0.0  # the response's deadline is the exchange's
        self._current = request
        self._pending.append(request)

    def on_body(self, body: bytes) -> None:
        current = self._current
        if current is not None and current.body is not None:
            current.buffered += len(body)
            current.body.put_nowait(body)
            self.deadline = time.monotonic() + self.bounds.body_idle_timeout

    def on_message_complete(self) -> None:
        current = self._current
        if current is not None:
            if current.body is not None:
                current.body.put_nowait(None)
                self._set_phase(_WAITING, 0.0)
            current.body_complete = True
            self._current = None

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None and not self._closing and self._parser is not None:
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
        if request.refusal is not None:
            self._send_error_and_close(request.refusal.status, request.refusal.reason)
            return
        self.in_flight = True
        if not listener.reject_at_http or not self._rejected_at_http():
            # A listener without routes pays one attribute test for routing (SPEC §15, B2).
            upstream = listener.upstream if listener.routes is None else self._route(request, listener)
            if upstream is None:
                return  # answered by the route table (400/403/404)
            request.upstream = upstream
            if upstream.service is None:
                request.address = upstream.address
            else:
                endpoint = upstream.service.pick(time.monotonic())
                assert endpoint is not None  # a BackendService has at least one endpoint (validation)
                request.endpoint = endpoint
                request.address = endpoint.key
            if request.body is None:
                conn = self.worker.backends.take_idle(request.address)
                if conn is not None:
                    self._start_exchange(request, listener, conn)
                    return
        self._handler = asyncio.get_running_loop().create_task(self._serve_one(request))

    def _route(self, request: _Request, listener: ListenerRuntime) -> Upstream | None:
        """The route table's answer for this request, or None once it has been refused here. The path
        is matched, and forwarded, in its normalised form (data_plane/http/routes.py)."""
        assert listener.routes is not None
        head = request.head
        path, query = split_target(head.target)
        normal = path if path == b"*" else normalise_path(path)
        if normal is None:
            self._refuse(request, 400, "request path cannot be routed (malformed %-escape, encoded / or \\)")
            return None
        route = listener.routes.match(head.host, normal)
        if route is None:
            self._refuse(request, 404, "no route matches this host and path")
            return None
        upstream = listener.upstream if route.index < 0 else listener.upstreams[route.index]
        assert upstream is not None
        verdict = self.verdict
        if upstream.require_client_certificate and (verdict is None or not verdict.valid):
            error = verdict.error if verdict is not None else "client_cert_not_requested"
            self._refuse(request, 403, f"this route requires a verified client certificate: {error}")
            return None
        if normal is not path:
            head.target = normal + query
        return upstream

    def _refuse(self, request: _Request, status: int, message: str) -> None:
        """Answer a request ourselves; one with a body closes the connection (its body is never read)."""
        if request.body is not None:
            self._send_error_and_close(status, message)
            return
        keep_alive = request.head.keep_alive
        self._respond_simple(status, f"{status} {_REASONS.get(status, '')}: {message}\n", keep_alive)
        self._finish_request(keep_alive)

    def _rejected_at_http(self) -> bool:
        assert self.listener is not None
        return self.listener.reject_at_http and self.verdict is not None and not self.verdict.accepted

    def _may_resend(self, request: _Request, exchange: Exchange, attempt: int, reused: bool) -> bool:
        return request_rules.may_resend(request.head.method, attempt=attempt, reused_connection=reused,
                                        response_started=exchange.got_bytes, has_body=request.body is not None,
                                        client_gone=self._closing)

    def _start_exchange(self, request: _Request, listener: ListenerRuntime, conn: BackendConnection) -> None:
        assert conn.transport is not None and request.upstream is not None
        head = self._upstream_head(request, listener, self.verdict)
        exchange = self._exchange = conn.responses
        exchange.begin(self, request, self._exchange_done, True)
        conn.transport.write(head)

    def _exchange_done(self, result: ExchangeResult) -> None:
        """How an exchange begun by _start_exchange ended (a bound method, not a closure made per request)."""
        exchange, self._exchange = self._exchange, None
        assert exchange is not None and self.listener is not None
        request, conn = exchange.request, exchange.backend
        if isinstance(result, BackendFailed):
            conn.close()
            if self._may_resend(request, exchange, 0, True):
                # the idle keep-alive connection had been closed by the backend: once more, freshly
                self._handler = asyncio.get_running_loop().create_task(self._serve_one(request, fresh=True))
                return
            self._settle_endpoint(request, None if self._closing else False)
            if not self._closing:
                self._finish_request(self._backend_failed(request, 502, f"backend {_label(request)}: {result}"))
            return
        if isinstance(result, BaseException):  # timed out
            conn.close()
            self._settle_endpoint(request, False)
            keep_alive = False if exchange.started else self._backend_failed(
                request, 504, f"backend {_label(request)} did not answer in time")
            self._finish_request(keep_alive)
            return
        status, backend_reusable, client_keep_alive = result
        if request.endpoint is not None:  # a BackendService's endpoint (the test saves a call per request)
            self._settle_endpoint(request, status < 500)
        self._backend_done(self.listener, request, conn, backend_reusable, status)
        self._finish_request(client_keep_alive)

    def _backend_done(self, listener: ListenerRuntime, request: _Request, conn: BackendConnection, reusable: bool,
                      status: int) -> None:
        if reusable:
            self.worker.backends.release(request.address, conn)
        else:
            conn.exchange = None
            conn.close()
        self.worker.counters.request(listener.name, status)

    def _settle_endpoint(self, request: _Request, ok: bool | None) -> None:
        """The request's outcome at its BackendService endpoint (None: the client went away first): frees
        its in-flight slot, and feeds outlier detection (connect failures, timeouts and 5xx count)."""
        endpoint = request.endpoint
        if endpoint is None:
            return
        request.endpoint = None
        state = endpoint.state
        state.in_flight -= 1
        if ok is None:
            return
        service = request.upstream.service if request.upstream is not None else None
        now = time.monotonic()
        if ok:
            state.outlier.success(now)
            return
        state.failures += 1
        if service is not None:
            self.worker.counters.inc("mtlsgate_backend_endpoint_failures_total", service.name, endpoint.address)
        if service is not None and state.outlier.failure(now, service.outlier):
            self.worker.counters.inc("mtlsgate_backend_ejections_total", service.name, endpoint.address)
            log_event("backend_endpoint_ejected", backend_service=service.name, endpoint=endpoint.address,
                      worker=self.worker.worker_id, seconds=round(state.outlier.ejected_until - now, 3),
                      reason=f"{service.outlier.consecutive_errors} consecutive failures")

    async def _serve_one(self, request: _Request, fresh: bool = False) -> None:
        try:
            keep_alive = await self._handle(request, fresh)
        except asyncio.CancelledError:
            self._settle_endpoint(request, None)
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
        if self._paused_reading:
            self._resume_reading()
        if not keep_alive or self.worker.draining:
            self.close()
        elif self._pending:
            self._dispatch()
        elif not self._closing and self._current is None and not self._in_head:
            self._become_idle()

    async def _handle(self, request: _Request, fresh: bool) -> bool:
        listener = self.listener
        assert listener is not None
        verdict = self.verdict
        if self._rejected_at_http():
            status = listener.http_status(verdict)
            await self._drain_body(request)
            self._respond_simple(status, f"{status} {_REASONS.get(status, '')}: client certificate rejected: "
                                         f"{verdict.error}\n", request.head.keep_alive)
            return request.head.keep_alive
        return await self._forward(request, listener, verdict, fresh)

    async def _drain_body(self, request: _Request) -> None:
        if request.body is None:
            return
        while True:
            chunk = await request.body.get()
            if chunk is None:
                return
            self._took_body(request, chunk)

    def _took_body(self, request: _Request, chunk: bytes) -> None:
        request.buffered -= len(chunk)
        if request.buffered <= self.bounds.high_water and len(self._pending) < self.bounds.max_pipelined_requests:
            self._resume_reading()

    def _upstream_head(self, request: _Request, listener: ListenerRuntime, verdict: Any) -> bytes:
        """The head for the backend. Our lines (X-Forwarded-*, certificate headers, XFCC) are made once per
        connection, again only if revalidation replaced the verdict or a route has its own header set; a
        request that brings X-Forwarded-For or XFCC of its own has them made for it (B2)."""
        head = request.head
        header_set = request.upstream.header_set if request.upstream is not None else listener.header_set
        if self._ours_verdict is not verdict or self._ours_set is not header_set:
            self._ours_verdict, self._ours_set, self._ours = verdict, header_set, None
            self._certificate_lines = b"".join(
                f"{name}: {value}\r\n".encode("latin-1") for name, value in header_set.render(verdict)
            ) if listener.mtls and verdict is not None else b""
        if head.forwarded_for or head.incoming_xfcc is not None:
            return request_rules.render_head(head, self._our_headers(head, listener, verdict))
        if self._ours is None:
            self._ours = self._our_headers(head, listener, verdict)
        return request_rules.render_head(head, self._ours)

    def _our_headers(self, head: request_rules.RequestHead, listener: ListenerRuntime, verdict: Any) -> bytes:
        xfcc = b""
        if listener.xfcc_mode != _XFCC_SANITIZE:
            xfcc = self._xfcc_value(listener, verdict, head.incoming_xfcc or [])
        return request_rules.our_headers(head.forwarded_for, peer=self.peer_bytes,
                                         certificate_headers=self._certificate_lines, xfcc=xfcc)

    def _xfcc_value(self, listener: ListenerRuntime, verdict: Any, incoming: list[bytes]) -> bytes:
        if verdict is None:
            return b""
        joined = b",".join(incoming).decode("latin-1") if incoming else None
        value = headers_mod.render_xfcc(verdict, listener.xfcc_mode, joined)
        return value.encode("latin-1") if value else b""

    async def _connect(self, request: _Request, fresh: bool) -> tuple[BackendConnection, bool]:
        """A connection to the request's backend. For a BackendService, an endpoint that cannot be
        connected to counts against it and one other endpoint is tried: nothing was sent yet, so this is
        no re-send (SPEC §11)."""
        service = request.upstream.service if request.upstream is not None else None
        timeout = service.connect_timeout if service is not None else None
        tls = service.tls if service is not None else None
        try:
            return await self.worker.backends.acquire(request.address, fresh=fresh, connect_timeout=timeout, tls=tls)
        except (TimeoutError, OSError):
            failed = request.endpoint
            if service is None or failed is None:
                raise
            self._settle_endpoint(request, False)
            other = service.pick(time.monotonic(), exclude=failed)
            if other is None:
                raise
            request.endpoint, request.address = other, other.key
            return await self.worker.backends.acquire(request.address, fresh=fresh, connect_timeout=timeout, tls=tls)

    async def _forward(self, request: _Request, listener: ListenerRuntime, verdict: Any, fresh: bool) -> bool:
        head = self._upstream_head(request, listener, verdict)
        upstream = request.upstream
        assert upstream is not None
        for attempt in (0, 1):
            if fresh:
                attempt = 1  # this is already the one re-send
            try:
                conn, reused = await self._connect(request, attempt > 0)
            except TimeoutError:
                self._settle_endpoint(request, False)
                return self._backend_failed(request, 504, f"connecting to backend {_label(request)} timed out")
            except OSError as exc:
                self._settle_endpoint(request, False)
                return self._backend_failed(request, 502, f"cannot connect to backend {_label(request)}: "
                                            f"{exc.strerror or exc}")
            backend = _label(request)
            assert conn.transport is not None
            result: asyncio.Future[tuple[int, bool, bool]] = asyncio.get_running_loop().create_future()
            exchange = self._exchange = conn.responses
            exchange.begin(self, request, functools.partial(settle, result), False)
            conn.transport.write(head)
            try:
                if request.body is not None:
                    await self._send_body(request, conn)
                exchange.request_sent()
                status, backend_reusable, client_keep_alive = await result
            except asyncio.CancelledError:
                conn.close()  # the client went away mid-exchange: this backend connection is in an unknown state
                raise
            except TimeoutError:
                conn.close()
                self._settle_endpoint(request, False)
                if exchange.started:
                    return False  # the head already went out; all we can do is close
                return self._backend_failed(request, 504, f"backend {backend} did not answer in time")
            except BackendFailed as exc:
                conn.close()
                if self._may_resend(request, exchange, attempt, reused):
                    continue
                self._settle_endpoint(request, False)
                return self._backend_failed(request, 502, f"backend {backend}: {exc}")
            finally:
                self._exchange = None
            self._settle_endpoint(request, status < 500)
            self._backend_done(listener, request, conn, backend_reusable, status)
            return client_keep_alive
        return False

    def _backend_failed(self, request: _Request, status: int, message: str) -> bool:
        assert self.listener is not None
        log_event("backend_error", listener=self.listener.name, worker=self.worker.worker_id, status=status,
                  message=message)
        self._respond_simple(status, f"{status} {_REASONS.get(status, '')}: {message}\n", request.head.keep_alive)
        return request.head.keep_alive

    async def _send_body(self, request: _Request, conn: BackendConnection) -> None:
        assert conn.transport is not None and request.body is not None
        chunked = request.head.chunked
        while True:
            chunk = await request.body.get()
            if chunk is None:
                if not request.body_complete:
                    raise BackendFailed("request body malformed")  # _malformed closed both sides
                if chunked:
                    conn.transport.write(b"0\r\n\r\n")
                return
            if chunked:
                conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                conn.transport.write(chunk)
            await conn.drain()
            if conn.closed:
                raise BackendFailed("backend closed the connection while the request body was sent")
            self._took_body(request, chunk)

    # ---- writing to the client

    def send(self, data: bytes) -> None:
        """Encrypt and send response bytes; raises TlsFailed when the client is gone."""
        if self._closing or self.tls is None or self.transport is None:
            raise TlsFailed("client connection closed")
        self.tls.write(data)
        out = self.tls.outgoing()  # (_flush's work, without its call: once per response)
        if out and not self.transport.is_closing():
            self.transport.write(out)

    def _respond_simple(self, status: int, body: str, keep_alive: bool) -> None:
        assert self.listener is not None
        payload = body.encode()
        connection = "" if keep_alive else "Connection: close\r\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(payload)}\r\n{connection}\r\n")
        self.worker.counters.request(self.listener.name, status)
        with contextlib.suppress(TlsFailed):
            self.send(head.encode() + payload)

    def _send_error_and_close(self, status: int, message: str) -> None:
        self._respond_simple(status, f"{status} {_REASONS.get(status, '')}: {message}\n", False)
        self.close()

    # ---- lifecycle and deadlines

    def _set_phase(self, phase: str, timeout: float) -> None:
        self.phase = phase
        self.deadline = time.monotonic() + timeout if timeout else 0.0

    def _become_idle(self) -> None:
        self.phase = _IDLE  # (no _set_phase call: once per request, and the timeout is never 0)
        self.deadline = time.monotonic() + self.bounds.keepalive_idle_timeout
        self.worker.admission.idle(self)

    def _peer_closed(self) -> None:
        if not self.in_flight and not self._pending:
            self.close()

    def _forget(self) -> None:
        self.deadline = 0.0
        self.worker.connections.discard(self)
        self.worker.admission.closed(self)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._forget()  # at once, so that an eviction frees its slot for the connection that caused it
        if self.tls is not None and self.tls.handshake_done and self.transport is not None:
            self.tls.shutdown()
            with contextlib.suppress(Exception):
                self._flush()
        if self.transport is not None:
            self.transport.close()

    def idle(self) -> bool:
        return not self.in_flight and not self._pending

    def check_deadlines(self, now: float) -> None:
        """Called by the worker's sweeper: the client-side deadline of the current phase, then the
        backend's response idle deadline."""
        if self.deadline and now >= self.deadline:
            self.deadline = 0.0
            self._timed_out(self.phase)
        exchange = self._exchange
        if exchange is not None and exchange.deadline and now >= exchange.deadline:
            exchange.deadline = 0.0
            self.worker.counters.inc("mtlsgate_connections_timed_out_total", "response")
            exchange.timed_out()

    def _timed_out(self, phase: str) -> None:
        self.worker.counters.inc("mtlsgate_connections_timed_out_total", phase)
        if phase == _HANDSHAKE:
            if self.tls is not None and not self.tls.handshake_done:
                self._handshake_failed(f"handshake not completed within {self.bounds.handshake_timeout:g}s")
            return
        if phase == _IDLE:
            self.close()
            return
        exchange = self._exchange
        if exchange is not None:
            exchange.backend.close()  # the request never completed: that backend connection is unusable
        # A 408 only where it cannot be mistaken for the answer to an earlier pipelined request.
        first = bool(self._pending) and self._current is self._pending[0]
        if (phase == _HEAD and not self.in_flight) or \
                (phase == _BODY and first and (exchange is None or not exchange.started)):
            what = "request head" if phase == _HEAD else "request body"
            limit = self.bounds.head_timeout if phase == _HEAD else self.bounds.body_idle_timeout
            self._send_error_and_close(408, f"{what} not received within {limit:g}s")
        else:
            self.close()

