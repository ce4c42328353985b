"""CRL fixtures for the CRL source suites: real CRLs signed by a test CA, with the cRLNumber and
extensions each case needs, and a hostile HTTP publisher on loopback."""

from __future__ import annotations

import datetime as dt
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from control_plane.pki import Issued, now


def signed_crl(issuer: Issued, number: int, revoked: list[int] = (), *, signer: Issued | None = None,
               delta_of: int | None = None, this_update: dt.datetime | None = None,
               next_update: dt.datetime | None = None, pem: bool = False) -> bytes:
    start = this_update or now() - dt.timedelta(minutes=5)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject).last_update(start)
               .next_update(next_update or start + dt.timedelta(days=1))
               .add_extension(x509.CRLNumber(number), critical=False))
    if delta_of is not None:
        builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start).build())
    crl = builder.sign((signer or issuer).key, hashes.SHA256())  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)


class HostilePublisher:
    """An HTTP server on loopback whose behaviour the test sets per request: `mode` is one of
    crl (serve `body`, honouring If-None-Match), status (answer `status`), stall (send 10 bytes of a
    longer body, then nothing until stopped), trickle (a byte every 0.2 s), garbage (stream `garbage_bytes` of junk without a
    Content-Length), redirect_loop (302 to itself). `log` records (path, If-None-Match, status)."""

    def __init__(self) -> None:
        self.mode = "crl"
        self.body = b""
        self.etag = ""
        self.status = 500
        self.garbage_bytes = 100 * 1024 * 1024
        self.log: list[tuple[str, str, int]] = []
        self.released = threading.Event()
        publisher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                publisher.handle(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/crl"

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        inm = h.headers.get("If-None-Match", "")
        mode = self.mode
        if mode == "crl":
            status = 304 if inm and inm == self.etag else 200
            self.log.append((h.path, inm, status))
            h.send_response(status)
            if self.etag:
                h.send_header("ETag", self.etag)
            body = b"" if status == 304 else self.body
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if mode == "status":
            self.log.append((h.path, inm, self.status))
            h.send_response(self.status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if mode == "redirect_loop":
            self.log.append((h.path, inm, 302))
            h.send_response(302)
            h.send_header("Location", h.path)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        self.log.append((h.path, inm, 200))
        h.send_response(200)
        if mode == "stall":
            h.send_header("Content-Length", "100000")
            h.end_headers()
            h.wfile.write(b"0123456789")
            h.wfile.flush()
            self.released.wait(60)
            return
        if mode == "trickle":  # one byte every 0.2 s: never silent long enough for a read timeout
            h.send_header("Content-Length", "100000")
            h.end_headers()
            for _ in range(1000):
                if self.released.wait(0.2):
                    return
                try:
                    h.wfile.write(b"0")
                    h.wfile.flush()
                except OSError:
                    return
            return
        assert mode == "garbage"
        h.send_header("Connection", "close")  # no Content-Length: the body runs until the socket closes
        h.end_headers()
        chunk = bytes(range(256)) * 4096  # 1 MiB
        sent = 0
        try:
            while sent < self.garbage_bytes:
                h.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the fetcher hung up once past its bound
