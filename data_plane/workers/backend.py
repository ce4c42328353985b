"""The backend side of forwarding: kept-alive HTTP/1.1 connections to backends (a small pool per worker),
and the exchange that parses one response and relays it to the client as it arrives, holding the
backend back while the client reads slower (SPEC §11 backpressure)."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httptools

from data_plane.http.bounds import Bounds
from data_plane.http.response import forward_head
from data_plane.workers.tls import TlsFailed
from data_plane.workers.upstream_tls import UpstreamTls, open_tls

if TYPE_CHECKING:
    from data_plane.workers.http_proxy import ClientConnection, _Request


class BackendConnection(asyncio.Protocol):
    """A kept-alive HTTP/1.1 connection to a backend. While an exchange is active, response bytes go
    straight through httptools into the exchange's callbacks, which write to the client: no queue, no
    coroutine switch per chunk."""

    def __init__(self, high_water: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None  # while a request is in flight
        self.responses = Exchange(self)  # this connection's response parser, begun again for each request
        self.closed = False
        self.failure = ""  # why the connection broke, when a layer below knows (TLS: the backend's alert)
        self._high_water = high_water
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self._high_water)

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

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake()

    async def drain(self) -> None:
        """Wait while the backend's socket buffer is above the high-water mark (it reads slower than the
        client sends): the request body is held back here, and so the client by TCP."""
        if self._drained is not None:
            await self._drained

    def _wake(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _lost(self) -> None:
        self.closed = True
        self._wake()
        if self.exchange is not None:
            self.exchange.backend_closed()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class BackendPool:
    """Idle kept-alive backend connections of one worker, per backend address."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        # Keyed per endpoint: (host, port) — a BackendService's endpoints each get their own idle connections.
        self._idle: dict[tuple[Any, ...], collections.deque[BackendConnection]] = collections.defaultdict(
            collections.deque)

    def take_idle(self, address: tuple[Any, ...]) -> BackendConnection | None:
        """A kept-alive connection to `address` if one is idle (the backend may still have closed it)."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def acquire(self, address: tuple[Any, ...], *, fresh: bool = False,
                      connect_timeout: float | None = None, tls: UpstreamTls | None = None
                      ) -> tuple[BackendConnection, bool]:
        """A connection and whether it was reused (a reused one may have been closed by the backend).
        With `tls`, the TLS handshake (and the verdict on the backend's certificate) is part of connecting
        and bounded by the same timeout; a refusal raises BackendTlsRefused (an OSError)."""
        conn = None if fresh else self.take_idle(address)
        if conn is not None:
            return conn, True
        loop = asyncio.get_running_loop()
        high_water = self.bounds.high_water
        async with asyncio.timeout(connect_timeout or self.bounds.backend_connect_timeout):
            if tls is not None:
                conn = BackendConnection(high_water)
                await open_tls(loop, tls, conn, address[0], address[1])
            else:
                _, conn = await loop.create_connection(lambda: BackendConnection(high_water), address[0], address[1])
        return conn, False

    def release(self, address: tuple[Any, ...], conn: BackendConnection) -> None:
        idle = self._idle[address]
        conn.exchange = None
        if conn.closed or len(idle) >= self.bounds.max_idle_backend_connections:
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
    BackendFailed when the backend closed or sent garbage before a response began, or TimeoutError.

    A backend connection has one Exchange (`responses`), begun again for each request it carries: its parser
    reads the connection's responses one after the other, as llhttp does on a kept-alive connection, and
    nothing is allocated per request (B2). A connection is only reused after a complete response that
    left the parser at a message boundary; every other outcome closes it."""

    __slots__ = ("backend", "chunked_out", "client", "client_keep_alive", "complete", "deadline", "finished",
                 "got_bytes", "head_bytes", "idle_timeout", "interim", "on_done", "out", "parser", "raw", "request",
                 "reusable", "started", "status")

    def __init__(self, backend: BackendConnection) -> None:
        self.backend = backend
        self.parser = httptools.HttpResponseParser(self)
        self.out: list[bytes] = []
        self.finished = True  # until begun

    def begin(self, client: ClientConnection, request: _Request, on_done: Callable[[ExchangeResult], None],
              sent: bool) -> None:
        """The next request on this connection. `sent`: the request goes out whole right after this (a
        bodiless one), so its response deadline starts now; else `request_sent()` starts it."""
        self.client = client
        self.request = request
        self.on_done = on_done
        self.finished = False
        self.status = 0
        # The response's bytes until its head is complete: the head is forwarded from them, not rebuilt
        # field by field (no on_header callbacks: B2), and its size is bounded like a request head's.
        self.raw = b""
        self.head_bytes = client.bounds.max_header_bytes
        self.got_bytes = False  # any byte of a response arrived (then a re-send is never allowed)
        self.started = False  # the response head went to the client
        self.interim = False
        self.complete = False  # the whole response was parsed
        self.reusable = False  # and the backend connection may carry the next request
        self.chunked_out = False
        self.client_keep_alive = request.head.keep_alive and not client.worker.draining
        self.out.clear()
        service = request.upstream.service if request.upstream is not None else None
        self.idle_timeout = (service.response_timeout if service is not None else None) \
            or client.bounds.response_idle_timeout
        # the response idle deadline (the sweeper checks it), armed once the request is out
        self.deadline = time.monotonic() + self.idle_timeout if sent else 0.0
        self.backend.exchange = self

    def request_sent(self) -> None:
        self.deadline = time.monotonic() + self.idle_timeout

    # ---- bytes from the backend

    def received(self, data: bytes) -> None:
        self.got_bytes = True
        if not self.started:
            self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.started:
                ours = exc.__cause__ or exc.__context__  # raised by one of our callbacks
                self._fail(str(ours) if isinstance(ours, BackendFailed) else f"malformed backend response: {exc}")
                return
            # a malformed body, or bytes after the complete response (out of turn): what came before is
            # relayed, the rest never is, and this backend connection is not used again
            self._flush()
            self._finish(backend_reusable=False, client_keep_alive=self.complete and self.client_keep_alive)
            return
        if not self.started and len(self.raw) > self.head_bytes and not self.finished:
            self._fail(self._head_too_large())  # and not one byte more is parsed of it
            return
        self._flush()
        if self.complete:
            if not self.finished:  # _finish's work, without its two calls: once per response (B2)
                self.finished = True
                self.on_done((self.status, self.reusable, self.client_keep_alive))
        elif self.request.head.method == b"HEAD" and self.started and not self.finished:
            self._finish(backend_reusable=False, client_keep_alive=self.client_keep_alive)
        elif self.deadline and not self.finished:
            self.deadline = time.monotonic() + self.idle_timeout  # more to come: idle from now

    def backend_closed(self) -> None:
        if self.finished:
            return
        if not self.started:
            self._fail(self.backend.failure or "backend closed the connection without a response")
            return
        # a close-delimited body ends here
        if self.chunked_out:
            self.out.append(b"0\r\n\r\n")
        self._flush()
        self._finish(backend_reusable=False, client_keep_alive=self.client_keep_alive and self.chunked_out)

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # a second response to one request: stop parsing here
            raise BackendFailed("backend sent bytes after its complete response")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # httptools admits CRLF line ends only, and no empty line inside a head: the first one ends it
        end = self.raw.index(b"\r\n\r\n") + 4
        if end > self.head_bytes:
            raise BackendFailed(self._head_too_large())
        head, self.raw = self.raw[:end], self.raw[end:]
        if 100 <= self.status < 200:
            # Interim responses are not relayed, except the 100 Continue a client asked for (it holds
            # its body back until then); the final response follows on the same connection.
            self.interim = True
            if self.status == 100 and self.request.head.expect_continue:
                self.request.head.expect_continue = False
                self.out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._head(head)

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
            return
        if self.chunked_out:
            self.out.append(b"0\r\n\r\n")
        # finished by received() once the parser is done with this read; the parser's keep-alive reading
        # is of this message only until this callback returns
        self.complete = True
        self.reusable = self.parser.should_keep_alive()

    def _head_too_large(self) -> str:
        return f"backend response head larger than {self.head_bytes} bytes"

    # ---- to the client

    def _head(self, raw: bytes) -> None:
        head = self.request.head
        out = forward_head(self.status, raw, request_method=head.method, request_http_version=head.http_version,
                           keep_alive=self.client_keep_alive)
        self.chunked_out, self.client_keep_alive = out.chunked, out.keep_alive
        self.out.append(out.data)
        self.started = True
        self.raw = b""

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


def settle(future: asyncio.Future[tuple[int, bool, bool]], result: ExchangeResult) -> None:
    if not future.done():
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class BackendFailed(Exception):
    """The backend closed or misbehaved before a response began (nothing was sent to the client)."""
