"""A tiny CRL publisher: serves one CRL file over HTTP the way a CA's distribution point does (DER or PEM
as stored, ETag and Last-Modified, 304 to a conditional GET) and logs every request. The demo runs it for
its CA (`mtlsgate pki revoke` rewrites the file); tests point the control plane's CRL fetcher at it."""

from __future__ import annotations

import email.utils
import hashlib
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("mtlsgate.crl_publisher")


class CrlPublisher:
    """Serves `path` at every URL path on HOST:PORT in a daemon thread. `requests` records
    (path, If-None-Match, If-Modified-Since, status) for each request, in order."""

    def __init__(self, path: Path, host: str = "127.0.0.1", port: int = 0,
                 on_request: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.requests: list[tuple[str, str, str, int]] = []
        self._lock = threading.Lock()
        self._on_request = on_request
        publisher = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "mtlsgate-crl-publisher"

            def do_GET(self) -> None:
                publisher._serve(self)

            def log_message(self, format: str, *args: object) -> None:
                pass  # one line per request is written by _serve

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="crl-publisher", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/crl"

    def start(self) -> CrlPublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        inm = handler.headers.get("If-None-Match", "")
        ims = handler.headers.get("If-Modified-Since", "")
        try:
            data = self.path.read_bytes()
            mtime = self.path.stat().st_mtime
        except OSError:
            status, data, headers = 404, b"no CRL published\n", {"Content-Type": "text/plain"}
        else:
            etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            headers = {"ETag": etag, "Last-Modified": email.utils.formatdate(mtime, usegmt=True),
                       "Content-Type": "application/x-pem-file" if data.lstrip().startswith(b"-----")
                       else "application/pkix-crl"}
            status = 304 if inm and inm == etag else 200
        with self._lock:
            self.requests.append((handler.path, inm, ims, status))
        line = f"GET {handler.path} {status} if-none-match={inm or '-'}"
        log.info("%s", line)
        if self._on_request is not None:
            self._on_request(line)
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        body = b"" if status == 304 else data
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
