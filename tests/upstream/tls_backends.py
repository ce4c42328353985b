"""Real TLS backends on loopback for the upstream TLS tests: the demo echo backend behind Python's `ssl`,
with a certificate from the tests' PKI helpers and, optionally, a client certificate it requires."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from pathlib import Path
from typing import Any

from cryptography.x509.oid import ExtendedKeyUsageOID

from control_plane.pki import Issued, issue
from data_plane import echo_backend as echo
from tests.support import free_port

SERVER_AUTH = (ExtendedKeyUsageOID.SERVER_AUTH,)


def server_cert(issuer: Issued, *, dns: tuple[str, ...] = ("backend.internal",), ips: tuple[str, ...] = ("127.0.0.1",),
                eku: Any = SERVER_AUTH, **kw: Any) -> Issued:
    return issue("backend", issuer=issuer, dns=dns, ips=ips, eku=eku, **kw)


class TlsBackend:
    """An echo backend speaking TLS with `cert` (+ `chain`); with `client_ca` it requires a client certificate
    issued by it. `peers` records, per answered request, the client certificate's DER (None: none sent)."""

    def __init__(self, directory: Path, cert: Issued, chain: tuple[Issued, ...] = (),
                 client_ca: Issued | None = None) -> None:
        self.port = free_port()
        self.peers: list[bytes | None] = []
        self.handshake_errors: list[str] = []
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"backend-{self.port}.pem", directory / f"backend-{self.port}.key"
        cert_file.write_text(cert.cert_pem + "".join(c.cert_pem for c in chain))
        key_file.write_text(cert.key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        if client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=client_ca.cert_pem)
        outer = self

        class Handler(echo.EchoHandler):
            def setup(self) -> None:
                try:
                    self.request.do_handshake()
                except (ssl.SSLError, OSError) as exc:
                    outer.handshake_errors.append(str(exc))
                    raise
                super().setup()

            def _answer(self) -> None:
                outer.peers.append(self.request.getpeercert(binary_form=True))
                super()._answer()

            do_GET = _answer

        class Server(echo.EchoServer):
            def get_request(self) -> Any:
                sock, addr = self.socket.accept()
                return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # refused handshakes are the point of these tests; they are recorded above

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def expired(issuer: Issued) -> Issued:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    return server_cert(issuer, not_before=start, not_after=start + dt.timedelta(days=1))
