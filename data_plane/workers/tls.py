"""TLS termination for one listener configuration: an OpenSSL context whose verify callback hands the
client's chain to the validation engine, and a memory-BIO connection that the event loop drives.

Why pyOpenSSL with our own verify callback (see docs/tls-design.md): stdlib `ssl` cannot accept an
untrusted chain (ALLOW_INVALID_OR_MISSING_CLIENT_CERT), and pyOpenSSL's public `set_verify` wrapper cannot
choose the alert a rejection sends. Installing the callback with `SSL_CTX_set_verify` through pyOpenSSL's
own cffi bindings gives us the `X509_STORE_CTX`: the chain OpenSSL built from what the client sent, and
`X509_STORE_CTX_set_error`, whose value OpenSSL turns into the TLS alert. The OpenSSL trust store stays
empty on purpose: OpenSSL only builds the chain and checks proof of possession; the engine decides.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

log = logging.getLogger(__name__)

# OpenSSL builds at most this many certificates into the chain it hands us; the engine then applies the
# policy's own limits (10 intermediates) so that an overlong chain gets `client_cert_chain_exceeded_limit`.
OPENSSL_VERIFY_DEPTH = 32
# Handshake bytes accepted from a client before the handshake completes: bounds the client chain size
# (OpenSSL's own limit is 100 KiB of certificate list; ours is checked before OpenSSL parses anything).
MAX_HANDSHAKE_BYTES = 128 * 1024
_RECORD_SIZE = 16 * 1024  # one TLS record of plaintext; pyOpenSSL allocates this per recv()
_NO_POINTER = _ffi.NULL
# One scratch buffer per process: a worker is single-threaded and every use copies out at once.
_BUFFER_SIZE = 256 * 1024
_BUFFER = _ffi.new("char[]", _BUFFER_SIZE)

# X509_V_ERR_* codes whose mapping in OpenSSL's ssl_x509err2alert() gives the alert we want to send.
# OpenSSL has no X509 error that maps to access_denied; handshake_failure is the closest it can send.
_X509_ERROR_FOR_ALERT: dict[str, int] = {
    "certificate_expired": 10,  # X509_V_ERR_CERT_HAS_EXPIRED
    "certificate_revoked": 23,  # X509_V_ERR_CERT_REVOKED
    "unknown_ca": 20,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    "unsupported_certificate": 26,  # X509_V_ERR_INVALID_PURPOSE
    "bad_certificate": 28,  # X509_V_ERR_CERT_REJECTED
    "decrypt_error": 7,  # X509_V_ERR_CERT_SIGNATURE_FAILURE
    "handshake_failure": 50,  # X509_V_ERR_APPLICATION_VERIFICATION
    "access_denied": 50,
    "certificate_required": 50,
}
# TLS 1.2 suites per SslPolicy profile (SPEC §11, GCP's names). Only ECDHE key exchange: static-RSA suites
# (no forward secrecy) are never offered; CBC only under COMPATIBLE. TLS 1.3 suites are OpenSSL's
# defaults (all AEAD) under every profile, as with GCP.
_AEAD_GCM = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
             "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384")
_AEAD_CHACHA = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
_ECDHE_CBC = "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA"
TLS12_CIPHERS = {
    "MODERN": f"{_AEAD_GCM}:{_AEAD_CHACHA}",
    "RESTRICTED": _AEAD_GCM,
    "COMPATIBLE": f"{_AEAD_GCM}:{_AEAD_CHACHA}:{_ECDHE_CBC}",
}
MIN_TLS_VERSIONS = {"TLS_1_2": SSL.TLS1_2_VERSION, "TLS_1_3": SSL.TLS1_3_VERSION}


@dataclass(frozen=True)
class TlsProfile:
    """A listener's sslPolicy, resolved: `min_version` TLS_1_2 | TLS_1_3, `profile` MODERN | RESTRICTED |
    COMPATIBLE."""

    min_version: str = "TLS_1_2"
    profile: str = "MODERN"


_TLS_ALERT_NAMES = {
    40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate",
    44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown", 48: "unknown_ca",
    49: "access_denied", 51: "decrypt_error", 116: "certificate_required",
}


def x509_error_for_alert(alert: object) -> int:
    """The X509_V_ERR code that makes OpenSSL send `alert` (a name such as `unknown_ca`, an enum with a
    `.name`, or an alert number)."""
    if isinstance(alert, int):
        name = _TLS_ALERT_NAMES.get(alert, "bad_certificate")
    else:
        name = str(getattr(alert, "name", alert)).lower()
    return _X509_ERROR_FOR_ALERT.get(name, _X509_ERROR_FOR_ALERT["bad_certificate"])


class TlsFailed(Exception):
    """The TLS handshake or record layer failed; the connection is to be closed."""


@dataclass(frozen=True)
class ClientAuth:
    """What a listener's ServerTlsPolicy asks of the handshake.

    `validate(chain)` runs the validation engine on DER certificates (leaf first) and returns its verdict;
    `reject_at_tls` makes a verdict that is not `accepted` fail the handshake with the verdict's alert."""

    validate: Callable[[Sequence[bytes]], Any]
    tls_alert: Callable[[Any], object]
    reject_at_tls: bool


class ServerTls:
    """One listener's TLS settings for one configuration version (OpenSSL contexts are immutable once
    used, so a new configuration builds a new ServerTls; connections keep the one they started with)."""

    def __init__(self, identities: Sequence[tuple[str, str]], client_auth: ClientAuth | None,
                 profile: TlsProfile = TlsProfile()) -> None:
        """`identities`: (PEM chain, PEM key) per certificate, the default first. With more than one, the
        servername callback picks by the client's SNI (SPEC §15): the certificate with that exact DNS SAN,
        else one whose wildcard SAN covers it, else the first."""
        if not identities:
            raise ValueError("a listener needs at least one certificate")
        self.client_auth = client_auth
        self.profile = profile
        if client_auth is not None:
            self._verify_callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", self._verify)
        self.contexts = [self._context(chain, key) for chain, key in identities]
        self.context = self.contexts[0]
        self._exact: dict[bytes, SSL.Context] = {}
        self._wildcard: dict[bytes, SSL.Context] = {}
        self._names: list[list[str]] = []
        if len(self.contexts) > 1:
            for ctx, (chain, _) in zip(self.contexts, identities, strict=True):
                names = _dns_sans(chain)
                self._names.append(names)
                for dns in names:
                    table = self._wildcard if dns.startswith("*.") else self._exact
                    table.setdefault((dns[1:] if dns.startswith("*.") else dns).encode(), ctx)
            self.context.set_tlsext_servername_callback(self._choose)

    def _context(self, cert_chain_pem: str, key_pem: str) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(MIN_TLS_VERSIONS[self.profile.min_version])
        ctx.set_cipher_list(TLS12_CIPHERS[self.profile.profile].encode())
        # No resumption: a resumed session would skip the verify callback, so a revoked certificate
        # could come back through a ticket after a CRL update.
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        _load_identity(ctx, cert_chain_pem, key_pem)
        if self.client_auth is not None:
            # Every context of a listener verifies the same way: OpenSSL keeps the first context's verify
            # mode and callback on a connection whose context the servername callback switches.
            mode = SSL.VERIFY_PEER
            if self.client_auth.reject_at_tls:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            _lib.SSL_CTX_set_verify(ctx._context, mode, self._verify_callback)
            ctx.set_verify_depth(OPENSSL_VERIFY_DEPTH)
        return ctx

    def _choose(self, conn: SSL.Connection) -> None:
        name = conn.get_servername()
        if not name:
            return
        name = name.lower().rstrip(b".")
        ctx = self._exact.get(name)
        if ctx is None:
            dot = name.find(b".")
            ctx = self._wildcard.get(name[dot:]) if dot > 0 else None
        if ctx is not None and ctx is not self.context:
            conn.set_context(ctx)

    def sni_names(self) -> list[list[str]]:
        """The DNS SANs each certificate is chosen for (empty with a single certificate)."""
        return self._names

    def connection(self) -> TlsConnection:
        return TlsConnection(self)

    def effective_ciphers(self) -> list[str]:
        """The suites this context offers (OpenSSL names; TLS 1.3 ones first unless the minimum is 1.3,
        when only those are usable)."""
        names = SSL.Connection(self.context, None).get_cipher_list()
        if self.profile.min_version == "TLS_1_3":
            return [name for name in names if name.startswith("TLS_")]
        return names

    def _verify(self, ok: int, store_ctx: Any) -> int:
        """OpenSSL's verify callback. The first call comes after chain building, so the whole chain is
        there; we decide once and answer every later call (one per depth/error) the same way."""
        try:
            index = _lib.SSL_get_ex_data_X509_STORE_CTX_idx()
            ssl_ptr = _lib.X509_STORE_CTX_get_ex_data(store_ctx, index)
            conn: TlsConnection = SSL.Connection._reverse_mapping[ssl_ptr].get_app_data()
            if conn.verdict is None:
                conn.chain = _chain_der(store_ctx)
                assert self.client_auth is not None
                conn.verdict = self.client_auth.validate(conn.chain)
            verdict = conn.verdict
            assert self.client_auth is not None
            if self.client_auth.reject_at_tls and not verdict.accepted:
                _lib.X509_STORE_CTX_set_error(store_ctx, x509_error_for_alert(self.client_auth.tls_alert(verdict)))
                return 0
            _lib.X509_STORE_CTX_set_error(store_ctx, 0)
            return 1
        except Exception:
            log.exception("verify callback failed")
            _lib.X509_STORE_CTX_set_error(store_ctx, _X509_ERROR_FOR_ALERT["handshake_failure"])
            return 0


def _load_identity(ctx: SSL.Context, cert_chain_pem: str, key_pem: str) -> None:
    certs = x509.load_pem_x509_certificates(cert_chain_pem.encode())
    ctx.use_certificate(certs[0])
    for extra in certs[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(serialization.load_pem_private_key(key_pem.encode(), password=None))  # type: ignore[arg-type]
    ctx.check_privatekey()


def _dns_sans(cert_chain_pem: str) -> list[str]:
    leaf = x509.load_pem_x509_certificates(cert_chain_pem.encode())[0]
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower().rstrip(".") for name in sans.get_values_for_type(x509.DNSName)]


def _chain_der(store_ctx: Any) -> tuple[bytes, ...]:
    stack = _lib.X509_STORE_CTX_get1_chain(store_ctx)
    if stack == _ffi.NULL:
        return ()
    try:
        out = []
        for i in range(_lib.sk_X509_num(stack)):
            # get1_chain took a reference on each certificate; the wrapper releases it when collected.
            cert = crypto.X509._from_raw_x509_ptr(_lib.sk_X509_value(stack, i))
            out.append(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert))
        return tuple(out)
    finally:
        _lib.sk_X509_free(stack)


class TlsConnection:
    """Server side of one TLS connection over memory BIOs: bytes in from the socket, bytes out to it,
    plaintext in between. No I/O here; the caller moves the bytes."""

    def __init__(self, server: ServerTls) -> None:
        self.server = server
        self.verdict: Any = None
        self.chain: tuple[bytes, ...] = ()
        self.handshake_done = False
        self.closed_by_peer = False
        self._handshake_bytes = 0
        self._ssl = SSL.Connection(server.context, None)
        self._ssl.set_accept_state()
        self._ssl.set_app_data(self)

    # The per-request path (receive/read/write/outgoing) calls OpenSSL through pyOpenSSL's cffi bindings
    # directly, with one buffer per worker process: pyOpenSSL's wrappers allocate a buffer and check
    # errors in Python on every call, which cost ~20 us per proxied request. Errors fall back to the
    # wrappers, which raise the right exception.

    def receive(self, data: bytes) -> None:
        """Bytes read from the socket."""
        if not self.handshake_done:
            self._handshake_bytes += len(data)
            if self._handshake_bytes > MAX_HANDSHAKE_BYTES:
                raise TlsFailed(f"handshake exceeded {MAX_HANDSHAKE_BYTES} bytes")
        if _lib.BIO_write(self._ssl._into_ssl, data, len(data)) != len(data):
            raise TlsFailed("cannot buffer incoming TLS bytes")

    def do_handshake(self) -> bool:
        """Advance the handshake; True once it completed. Raises TlsFailed when it failed."""
        if self.handshake_done:
            return True
        try:
            self._ssl.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as exc:
            raise TlsFailed(_describe(exc)) from None
        self.handshake_done = True
        if self.verdict is None and self.server.client_auth is not None:
            # No certificate was presented (the verify callback only runs for one).
            self.verdict = self.server.client_auth.validate(())
        return True

    def read(self) -> bytes:
        """All plaintext available. Sets `closed_by_peer` on close_notify."""
        ssl_ptr = self._ssl._ssl
        n = _lib.SSL_read(ssl_ptr, _BUFFER, _RECORD_SIZE)
        # The usual read: one record, used up (short of the size asked for), and no more records wait in
        # the input BIO. Anything else (more records, a full-size one, no plaintext) takes the loop.
        if 0 < n < _RECORD_SIZE and not _lib.BIO_get_mem_data(self._ssl._into_ssl, _NO_POINTER):
            return _ffi.unpack(_BUFFER, n)
        return self._read_all(ssl_ptr, n)

    def _read_all(self, ssl_ptr: Any, n: int) -> bytes:
        """The rest of `read`, from the result `n` of its SSL_read (whose plaintext is still in the buffer)."""
        parts = []
        while True:
            if n > 0:
                parts.append(_ffi.unpack(_BUFFER, n))
                # More to read if the record was not used up (a read short of the size asked for used it
                # up: no SSL_pending call then) or more records wait in the input BIO.
                if (n < _RECORD_SIZE or not _lib.SSL_pending(ssl_ptr)) \
                        and not _lib.BIO_get_mem_data(self._ssl._into_ssl, _NO_POINTER):
                    break
                n = _lib.SSL_read(ssl_ptr, _BUFFER, _RECORD_SIZE)
                continue
            error = _lib.SSL_get_error(ssl_ptr, n)
            if error == _lib.SSL_ERROR_WANT_READ:
                break
            if error == _lib.SSL_ERROR_ZERO_RETURN:
                self.closed_by_peer = True
                break
            try:
                self._ssl.recv(1)  # raises the error with OpenSSL's description
            except SSL.ZeroReturnError:
                self.closed_by_peer = True
                break
            except SSL.WantReadError:
                break
            except SSL.Error as exc:
                raise TlsFailed(_describe(exc)) from None
            raise TlsFailed(f"TLS read failed (SSL error {error})")
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        """Encrypt `data` into records. A memory BIO takes everything, so one SSL_write of the bytes object
        itself is the common case (no view, no copy); pyOpenSSL turns on partial writes, so a short
        write finishes through its `sendall`, which raises the right error."""
        if not data:
            return
        n = _lib.SSL_write(self._ssl._ssl, data, len(data))
        if n == len(data):
            return
        rest = data[n:] if n > 0 else data
        try:
            self._ssl.sendall(rest)
        except SSL.Error as exc:
            raise TlsFailed(_describe(exc)) from None

    def has_outgoing(self) -> bool:
        """Whether `outgoing()` has bytes to give."""
        return _lib.BIO_get_mem_data(self._ssl._from_ssl, _NO_POINTER) > 0

    def outgoing(self) -> bytes:
        """Bytes to send to the socket (records, alerts). A memory BIO gives all it holds up to the size
        asked for, so a read that fills less than the buffer has emptied it: one call in the usual case."""
        from_ssl = self._ssl._from_ssl
        n = _lib.BIO_read(from_ssl, _BUFFER, _BUFFER_SIZE)
        if n <= 0:
            return b""
        first = _ffi.unpack(_BUFFER, n)
        if n < _BUFFER_SIZE:
            return first
        parts = [first]
        while (n := _lib.BIO_read(from_ssl, _BUFFER, _BUFFER_SIZE)) > 0:
            parts.append(_ffi.unpack(_BUFFER, n))
            if n < _BUFFER_SIZE:
                break
        return b"".join(parts)

    def shutdown(self) -> None:
        with contextlib.suppress(SSL.Error):
            self._ssl.shutdown()

    @property
    def version(self) -> str:
        return self._ssl.get_protocol_version_name()


def _describe(exc: SSL.Error) -> str:
    if isinstance(exc, SSL.SysCallError):
        return "connection reset during TLS"
    args = exc.args[0] if exc.args else []
    if isinstance(args, list) and args:
        return "; ".join(str(item[-1]) for item in args if isinstance(item, tuple)) or str(exc)
    return str(exc) or type(exc).__name__
