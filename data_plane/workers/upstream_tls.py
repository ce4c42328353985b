"""TLS from a worker to a BackendService's endpoints (SPEC §15): an OpenSSL client context per service and
configuration version, and an asyncio protocol that runs the handshake over memory BIOs on the event loop
(never blocking it) before the inner protocol — a BackendConnection, or a health probe's stream — sees a
connected transport.

The backend's chain is judged in OpenSSL's verify callback by data_plane/upstream/tls.py (the validation
engine with the serverAuth EKU, the TrustConfig's CRLs, then the tlsSettings name check), the way the
listener side judges client chains (data_plane/workers/tls.py): OpenSSL's own store stays empty, so it only
builds the chain and checks the handshake signature. A refused chain fails the handshake with an alert
before our client certificate (TLS 1.3: sent after the server's Finished) or any request byte leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import ssl
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from mtlsgate.v1 import backends_pb2, xds_pb2
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from data_plane.upstream import tls as upstream_tls
from data_plane.upstream.tls import BackendVerdict
from data_plane.validation import bundle as bundle_mod
from data_plane.validation.bundle import CompiledBundle
from data_plane.workers.tls import (
    MAX_HANDSHAKE_BYTES,
    OPENSSL_VERIFY_DEPTH,
    TLS12_CIPHERS,
    _chain_der,
    _describe,
    _load_identity,
    x509_error_for_alert,
)

log = logging.getLogger(__name__)

_ROOTS = backends_pb2.BackendAuthenticationConfig.WellKnownRoots
_ALERT_BY_REASON = {
    "revoked": "certificate_revoked", "issuer_revoked": "certificate_revoked",
    "expired": "certificate_expired", "not_yet_valid": "certificate_expired",
    "unknown_issuer": "unknown_ca", "leaf_eku": "unsupported_certificate", "issuer_eku": "unsupported_certificate",
}


class BackendTlsRefused(OSError):
    """The TLS handshake with a backend failed or its certificate was refused; nothing was sent to it.
    An OSError, so the worker treats it as a connect failure (502, another endpoint tried)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.strerror = message


@lru_cache(maxsize=1)
def public_roots() -> CompiledBundle:
    """The well-known public roots (certifi's bundle, else the system's), compiled once per process. Roots
    that the engine would not accept as anchors (not a CA, unparseable) are left out."""
    path = None
    with contextlib.suppress(ImportError):
        import certifi

        path = certifi.where()
    if path is None:
        paths = ssl.get_default_verify_paths()
        path = paths.cafile or paths.openssl_cafile
    anchors: list[bytes] = []
    # A few public roots have non-positive serials, which cryptography warns about; anchors are trusted as given.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open(path, "rb") as f:
                certs = x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError) as exc:
            log.warning("public roots unavailable (%s): PUBLIC_ROOTS backends will be refused", exc)
            certs = []
        for cert in certs:
            der = cert.public_bytes(Encoding.DER)
            try:
                bundle_mod.compile_bundle(_anchors_bundle("", [der]))
            except (bundle_mod.InvalidBundle, *bundle_mod.MALFORMED):
                continue
            anchors.append(der)
        return bundle_mod.compile_bundle(_anchors_bundle("publicRoots", anchors))


def _anchors_bundle(name: str, anchors: list[bytes]) -> xds_pb2.TrustBundle:
    return xds_pb2.TrustBundle(name=name, trust_stores=[xds_pb2.TrustBundle.Store(trust_anchors=anchors)])


class UpstreamTls:
    """One BackendService's TLS client settings for one configuration version."""

    def __init__(self, service: str, *, sni: str = "", subject_alt_names: Sequence[str] = (),
                 identity: tuple[str, str] | None = None, bundles: Sequence[CompiledBundle] = (),
                 digest: str = "") -> None:
        self.service = service
        self.sni = sni
        self.subject_alt_names = tuple(subject_alt_names)
        self.bundles = tuple(bundles)
        self.presents_certificate = identity is not None
        self.digest = digest  # names these settings: pools never mix connections made under other ones
        self._verify_callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", self._verify)
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(TLS12_CIPHERS["MODERN"].encode())
        ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # every connection's chain is judged afresh
        if identity is not None:
            _load_identity(ctx, *identity)  # sent only when the backend asks for a certificate
        _lib.SSL_CTX_set_verify(ctx._context, SSL.VERIFY_PEER, self._verify_callback)
        ctx.set_verify_depth(OPENSSL_VERIFY_DEPTH)
        self.context = ctx

    def protocol(self, app: asyncio.Protocol, host: str) -> TlsClientProtocol:
        return TlsClientProtocol(self, app, host)

    def judge(self, chain: Sequence[bytes], host: str) -> BackendVerdict:
        wanted = upstream_tls.expected_names(self.sni, self.subject_alt_names, host)
        return upstream_tls.judge(chain, self.bundles, wanted, dt.datetime.now(dt.UTC))

    def summary(self) -> dict[str, Any]:
        return {"sni": self.sni, "subject_alt_names": list(self.subject_alt_names),
                "client_certificate": self.presents_certificate,
                "trust": [b.name for b in self.bundles]}

    def _verify(self, ok: int, store_ctx: Any) -> int:
        """OpenSSL's verify callback: decide once on the whole chain, answer every later call the same."""
        try:
            index = _lib.SSL_get_ex_data_X509_STORE_CTX_idx()
            ssl_ptr = _lib.X509_STORE_CTX_get_ex_data(store_ctx, index)
            conn: TlsClientProtocol = SSL.Connection._reverse_mapping[ssl_ptr].get_app_data()
            if conn.verdict is None:
                conn.verdict = self.judge(_chain_der(store_ctx), conn.host)
            if not conn.verdict.ok:
                alert = _ALERT_BY_REASON.get(conn.verdict.reason, "bad_certificate")
                _lib.X509_STORE_CTX_set_error(store_ctx, x509_error_for_alert(alert))
                return 0
            _lib.X509_STORE_CTX_set_error(store_ctx, 0)
            return 1
        except Exception:
            log.exception("backend verify callback failed")
            _lib.X509_STORE_CTX_set_error(store_ctx, x509_error_for_alert("handshake_failure"))
            return 0


def upstream_tls_for(name: str, service: backends_pb2.BackendService,
                     certificates: Mapping[str, xds_pb2.ServerCertificate],
                     bundles: Mapping[str, CompiledBundle]) -> UpstreamTls | None:
    """The TLS settings of a BackendService (None: plain HTTP). `bundles` holds the compiled trust bundles
    by name; a missing certificate or bundle raises KeyError (node config validation refuses it first)."""
    from data_plane.validation.resources import backend_service_tls

    if not backend_service_tls(service):
        return None
    auth = service.resolved_backend_authentication
    identity = None
    digest = hashlib.sha256(service.tls_settings.SerializeToString(deterministic=True))
    if auth.client_certificate:
        cert = certificates[auth.client_certificate]
        identity = (cert.pem_certificate_chain, cert.pem_private_key)
        digest.update(cert.SerializeToString(deterministic=True))
    trust: list[CompiledBundle] = []
    if auth.trust_config:
        trust.append(bundles[auth.trust_config])
        digest.update(trust[-1].digest.encode())
    roots = auth.well_known_roots or (_ROOTS.NONE if auth.trust_config else _ROOTS.PUBLIC_ROOTS)
    if roots == _ROOTS.PUBLIC_ROOTS:
        trust.append(public_roots())
        digest.update(b"public")
    return UpstreamTls(name, sni=service.tls_settings.sni, subject_alt_names=service.tls_settings.subject_alt_names,
                       identity=identity, bundles=trust, digest=digest.hexdigest()[:16])


class TlsClientProtocol(asyncio.Protocol):
    """The TLS client of one backend connection: handshakes, then hands the inner protocol (`app`) a
    transport carrying plaintext. `handshake` resolves when the inner protocol is connected, or fails with
    BackendTlsRefused."""

    def __init__(self, tls: UpstreamTls, app: asyncio.Protocol, host: str) -> None:
        self.tls = tls
        self.app = app
        self.host = host
        self.verdict: BackendVerdict | None = None
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "not retrieved"
        self.raw: asyncio.Transport | None = None
        self.app_transport: _PlaintextTransport | None = None
        self._received = 0
        self._plaintext_seen = False  # any application byte from the backend on this connection
        self._ssl = SSL.Connection(tls.context, None)
        self._ssl.set_connect_state()
        self._ssl.set_app_data(self)
        name = upstream_tls.server_name(tls.sni, host)
        if name:
            self._ssl.set_tlsext_host_name(name.encode("idna"))

    # ---- from the socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        self._advance()

    def data_received(self, data: bytes) -> None:
        if self.app_transport is None:
            self._received += len(data)
            if self._received > MAX_HANDSHAKE_BYTES:
                self._fail(f"TLS handshake with backend exceeded {MAX_HANDSHAKE_BYTES} bytes")
                return
        self._ssl.bio_write(data)
        if self.app_transport is None:
            self._advance()
            if self.app_transport is None:
                return
        self._deliver()

    def eof_received(self) -> bool | None:
        if self.app_transport is not None:
            self._explain_early_close()
            self.app.eof_received()
        else:
            self._fail("backend closed the connection during the TLS handshake")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(BackendTlsRefused("backend closed the connection during the TLS handshake"))
        if self.app_transport is not None:
            self._explain_early_close()
            self.app.connection_lost(exc)

    def _explain_early_close(self) -> None:
        """A TLS 1.3 backend refuses a client certificate (or its absence) after our side finished the
        handshake; its alert can be lost to the TCP reset that follows. Say what the likely cause is."""
        if self._plaintext_seen or getattr(self.app, "failure", None) != "":
            return
        why = ("it may have refused our client certificate" if self.tls.presents_certificate
               else "no client certificate is configured for this service: does the backend require one?")
        self.app.failure = f"TLS with backend failed: closed before any response ({why})"  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        if self.app_transport is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app_transport is not None:
            self.app.resume_writing()

    # ---- TLS

    def _advance(self) -> None:
        try:
            self._ssl.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as exc:
            self._flush()  # the alert
            verdict = self.verdict
            self._fail(verdict.describe() if verdict is not None and not verdict.ok
                       else f"TLS handshake with backend failed: {_describe(exc)}")
            return
        self._flush()
        if self.verdict is None or not self.verdict.ok:  # no chain judged: never talk to such a backend
            self._fail(self.verdict.describe() if self.verdict is not None else "backend presented no certificate")
            return
        self.app_transport = _PlaintextTransport(self)
        self.app.connection_made(self.app_transport)
        if not self.handshake.done():
            self.handshake.set_result(None)

    def _deliver(self) -> None:
        parts = []
        closed = ""
        while True:
            try:
                parts.append(self._ssl.recv(65536))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                closed = "close_notify"
                break
            except SSL.Error as exc:
                closed = _describe(exc)
                break
        if parts:
            self._plaintext_seen = True
            self.app.data_received(b"".join(parts))
        if closed:
            failure = getattr(self.app, "failure", None)
            if closed != "close_notify" and failure == "":
                self.app.failure = f"TLS with backend failed: {closed}"  # type: ignore[attr-defined]
            if self.raw is not None:
                self.raw.close()

    def _flush(self) -> None:
        out = []
        while True:
            try:
                chunk = self._ssl.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out.append(chunk)
        if out and self.raw is not None and not self.raw.is_closing():
            self.raw.write(b"".join(out))

    def _fail(self, message: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(BackendTlsRefused(message))
        if self.raw is not None:
            self.raw.close()

    def write(self, data: bytes) -> None:
        try:
            self._ssl.sendall(data)
        except SSL.Error as exc:
            if self.raw is not None:
                self.raw.close()
            raise BackendTlsRefused(f"TLS with backend failed: {_describe(exc)}") from None
        self._flush()

    def close(self) -> None:
        if self.raw is None or self.raw.is_closing():
            return
        with contextlib.suppress(SSL.Error):
            self._ssl.shutdown()
        self._flush()
        self.raw.close()

    def abort(self) -> None:
        if self.raw is not None:
            self.raw.abort()


class _PlaintextTransport(asyncio.Transport):
    """What the inner protocol writes to: plaintext in, records out through the socket's transport."""

    def __init__(self, tls: TlsClientProtocol) -> None:
        super().__init__()
        self._tls = tls
        assert tls.raw is not None
        self._raw = tls.raw

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self._tls.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._raw.abort()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "tls_version":
            return self._tls._ssl.get_protocol_version_name()
        return self._raw.get_extra_info(name, default)


async def open_tls(loop: asyncio.AbstractEventLoop, tls: UpstreamTls, app: asyncio.Protocol,
                   host: str, port: int) -> TlsClientProtocol:
    """Connect and handshake; the caller bounds the whole with its connect timeout. On any failure (the
    timeout's cancellation included) the socket is closed."""
    _, protocol = await loop.create_connection(lambda: tls.protocol(app, host), host, port)
    try:
        await protocol.handshake
    except BaseException:
        protocol.abort()
        raise
    return protocol
