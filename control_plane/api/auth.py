"""API protection (SPEC §8): an optional bearer token (`--token-file`), checked by a server interceptor,
and the caller identity recorded as the audit log's actor (token identity, else the mTLS client
certificate's SPIFFE ID or CN, else the peer address). mTLS itself is the server credentials' job."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Health checks (load balancers, probes) and xDS (nodes authenticate with mTLS, SPEC §8) stay open.
TOKEN_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/envoy.service.discovery.v3.")
MAX_TOKENS = 1000


class TokenFileError(ValueError):
    pass


@dataclass(frozen=True)
class Tokens:
    """Accepted bearer tokens → the identity recorded in the audit log."""

    identities: Mapping[str, str]

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        """One token per line, optionally followed by whitespace and an identity (`s3cr3t alice`); blank
        lines and `#` comments ignored. Without an identity the audit log shows `token:<sha256 prefix>`."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise TokenFileError(f"cannot read token file {path}: {exc.strerror}") from exc
        identities: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            token, _, identity = line.partition(" ")
            if len(token) < 16:
                raise TokenFileError(f"{path}:{number}: token too short (at least 16 characters)")
            identities[token] = identity.strip() or f"token:{hashlib.sha256(token.encode()).hexdigest()[:12]}"
        if not identities:
            raise TokenFileError(f"{path}: no token in the file")
        if len(identities) > MAX_TOKENS:
            raise TokenFileError(f"{path}: too many tokens (limit {MAX_TOKENS})")
        return cls(identities)

    def identity(self, metadata: Any) -> str | None:
        """The identity for the request's `authorization: Bearer TOKEN`, or None."""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                offered = value[len("Bearer "):].strip().encode()
                for token, identity in self.identities.items():
                    if hmac.compare_digest(offered, token.encode()):
                        return identity
        return None


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every non-exempt call without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(TOKEN_EXEMPT_PREFIXES):
            return handler
        if self.tokens.identity(details.invocation_metadata) is not None:
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or invalid bearer token (send metadata 'authorization: Bearer TOKEN'; CLI: --token)"

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator for streaming handlers

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kw)


def caller_identity(context: grpc.aio.ServicerContext, tokens: Tokens | None) -> str:
    """Who is calling, for the audit log."""
    if tokens is not None:
        identity = tokens.identity(context.invocation_metadata())
        if identity:
            return identity
    auth = context.auth_context() or {}
    for san in auth.get("x509_subject_alternative_name", ()):
        text = san.decode(errors="replace") if isinstance(san, bytes) else str(san)
        if text.startswith("spiffe://"):
            return text
    for cn in auth.get("x509_common_name", ()):
        return "cn:" + (cn.decode(errors="replace") if isinstance(cn, bytes) else str(cn))
    peer = context.peer() or ""
    # "ipv4:127.0.0.1:53412" → "peer:127.0.0.1": the ephemeral port identifies nobody.
    family, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0] if family in ("ipv4", "ipv6") else peer
    return f"peer:{host.strip('[]')}" if host else "unknown"
