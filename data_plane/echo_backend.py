"""The demo backend: an HTTP/1.1 server that answers every request with the headers it received, as JSON.

It lets a person (and the end-to-end tests) see exactly what a proxy forwarded, including the
`X-Client-Cert-*` headers. `GET /healthz` answers `ok` for health checks. Not meant for production load.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("mtlsgate.echo_backend")

# The body is read (so keep-alive keeps working) but never stored; anything larger is refused.
MAX_BODY_BYTES = 1 << 20


def echo_document(method: str, target: str, headers: Iterable[tuple[str, str]], body_bytes: int,
                  backend: str = "") -> dict:
    """What the backend answers: the request line and its headers. Header names are lowercased; a header
    sent more than once keeps every value, joined with ", " as HTTP allows."""
    merged: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        merged[key] = f"{merged[key]}, {value}" if key in merged else value
    document = {"method": method, "path": target, "headers": merged, "body_bytes": body_bytes}
    if backend:  # `echo-backend --name`: which of several backends answered
        document["backend"] = backend
    return document


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real backend behind the proxy would
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms to
    # every kept-alive response.
    disable_nagle_algorithm = True
    server_version = "mtlsgate-echo"
    sys_version = ""

    def _answer(self) -> None:
        if self.path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain")
            return
        length_header = self.headers.get("Content-Length", "0")
        try:
            length = int(length_header)
        except ValueError:
            self._send(HTTPStatus.BAD_REQUEST, b"bad Content-Length\n", "text/plain", close=True)
            return
        if length < 0 or length > MAX_BODY_BYTES:
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"body too large\n", "text/plain", close=True)
            return
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                return
            remaining -= len(chunk)
        document = echo_document(self.command, self.path, self.headers.items(), length,
                                 getattr(self.server, "backend_name", ""))
        body = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        self._send(HTTPStatus.OK, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many proxy workers may connect at once on startup.
    request_queue_size = 128


def parse_listen(address: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` → (host, port); ValueError naming the problem."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--listen {address!r}: expected HOST:PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {address!r}: port must be 1-65535")
    return host.strip("[]"), int(port)


def start(host: str, port: int) -> tuple[EchoServer, threading.Thread]:
    """Start serving in a background thread (for tests and embedding); `server.shutdown()` stops it."""
    server = make_server(host, port)
    thread = threading.Thread(target=server.serve_forever, name="echo-backend", daemon=True)
    thread.start()
    return server, thread


class EchoServerV6(EchoServer):
    address_family = socket.AF_INET6


def make_server(host: str, port: int, name: str = "") -> EchoServer:
    server_class = EchoServerV6 if ":" in host else EchoServer
    server = server_class((host, port), EchoHandler)
    server.backend_name = name  # type: ignore[attr-defined]
    return server
