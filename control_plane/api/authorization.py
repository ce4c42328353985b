"""Authentication and authorization on every RPC (SPEC §8), as one server interceptor: it names the
caller (`authz.identity.who`), finds its role (`authz.policy.role_of`: `--authz` bindings, registered
Node identities), and lets the call through or ends it with UNAUTHENTICATED / PERMISSION_DENIED naming
the identity and the role needed. The servicers read the decided caller from `current_caller()` (the
audit log records identity and role). Bindings reload on SIGHUP; a bad file keeps the old ones."""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from control_plane.authz.bindings import Bindings, BindingsError, Role, parse_bindings
from control_plane.authz.identity import Identity, Unauthenticated, who
from control_plane.authz.policy import Access, access_for, allowed, role_of

log = logging.getLogger("mtlsgate.authz")


@dataclass(frozen=True)
class Caller:
    identity: Identity
    role: Role | None

    @property
    def role_name(self) -> str:
        return self.role.value if self.role is not None else ""


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("mtlsgate_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC being served (set by the interceptor for the handler's task)."""
    return _CALLER.get()


def load_bindings(path: str | Path) -> Bindings:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BindingsError(f"cannot read --authz file {path}: {exc.strerror}") from None
    return parse_bindings(text, str(path))


class Authorizer:
    """The current rules: tokens, bindings (reloadable), the registered Node identities, `--insecure`."""

    def __init__(self, *, tokens: dict[str, str] | None, authz_path: str | None,
                 node_identities: Callable[[], Set[str]], insecure: bool) -> None:
        self.tokens = tokens
        self.authz_path = authz_path
        self.bindings: Bindings | None = load_bindings(authz_path) if authz_path else None
        self.node_identities = node_identities
        self.insecure = insecure

    def reload(self) -> bool:
        """Re-read `--authz` (SIGHUP). On any problem the old bindings stay in force and the reason is logged."""
        if not self.authz_path:
            log.info("SIGHUP: no --authz file to reload")
            return False
        try:
            bindings = load_bindings(self.authz_path)
        except BindingsError as exc:
            log.error("SIGHUP: keeping the previous %d binding(s): %s",
                      len(self.bindings.entries) if self.bindings else 0, exc)
            return False
        self.bindings = bindings
        log.info("SIGHUP: loaded %d binding(s) from %s", len(bindings.entries), self.authz_path)
        return True

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Raises Unauthenticated for a wrong token, or a missing one where tokens are the only way in."""
        identity = who(context.auth_context() or {}, context.invocation_metadata(), context.peer() or "",
                       self.tokens)
        if not identity.authenticated and self.tokens is not None:
            raise Unauthenticated("missing bearer token")
        return Caller(identity, role_of(identity, self.bindings, self.node_identities(), insecure=self.insecure))


_TOKEN_HINT = " (send metadata 'authorization: Bearer TOKEN'; CLI: --token or the context's token)"


class AuthorizationInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method or ""
        # xDS streams are admitted by the ADS servicer (Node registration), not by an API role.
        if handler is None or access_for(method) in (Access.OPEN, Access.XDS):
            return handler
        return _guarded(handler, method, self.authorizer)


def _guarded(handler: grpc.RpcMethodHandler, method: str, authorizer: Authorizer) -> grpc.RpcMethodHandler:
    async def admit(context: grpc.aio.ServicerContext) -> None:
        try:
            caller = authorizer.caller(context)
        except Unauthenticated as exc:
            log.warning("refused %s from %s: %s", method, context.peer(), exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{exc}{_TOKEN_HINT}")
        decision = allowed(caller.identity, method, caller.role)
        if not decision.allowed:
            log.warning("PERMISSION_DENIED %s: %s", method, decision.reason)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
        _CALLER.set(caller)

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result
        return call

    def streaming(behaviour: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await admit(context)
            items = behaviour(request, context)
            if hasattr(items, "__aiter__"):
                async for item in items:
                    yield item
            else:
                for item in items:
                    yield item
        return call

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kw)
