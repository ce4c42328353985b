"""CheckService: the live `mtlsgate check` — validate a client chain against a stored ServerTlsPolicy and
its TrustConfig (SPEC §4 dry run), with the same code the proxy runs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
from mtlsgate.v1 import api_pb2, api_pb2_grpc

from control_plane.api.errors import InvalidResource, status_for
from control_plane.resource_names import (
    LISTENER,
    SERVER_TLS_POLICY,
    TRUST_CONFIG,
    InvalidName,
    normalise_name,
)
from control_plane.store.base import Store
from data_plane.validation.dry_run import DryRunError, dry_run, parse_pem_chain
from data_plane.validation.resources import FieldViolation

SERVICE_NAME = "mtlsgate.v1.CheckService"


class CheckService(api_pb2_grpc.CheckServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    async def Check(
        self, request: api_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CheckResponse:
        try:
            # Compiling a bundle with a large CRL takes a while: keep the event loop free.
            return await asyncio.to_thread(self.check, request)
        except InvalidResource as exc:
            await context.abort_with_status(status_for(exc))
            raise  # unreachable: abort raises
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
            raise
        except DryRunError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            raise

    def check(self, request: api_pb2.CheckRequest) -> api_pb2.CheckResponse:
        try:
            policy_name = normalise_name(request.policy, SERVER_TLS_POLICY)
        except InvalidName as exc:
            raise InvalidResource([FieldViolation("policy", str(exc))]) from None
        try:
            chain = parse_pem_chain(request.pem_chain)
        except DryRunError as exc:
            raise InvalidResource([FieldViolation("pemChain", str(exc))]) from None
        state = self.store.state()
        policy = state.server_tls_policies.get(policy_name)
        if policy is None:
            raise LookupError(f"{policy_name} not found")
        trust_config = None
        reference = (
            policy.mtls_policy.client_validation_trust_config if policy.HasField("mtls_policy") else ""
        )
        if reference:
            trust_config = state.trust_configs.get(normalise_name(reference, TRUST_CONFIG))
            if trust_config is None:
                raise LookupError(f"{reference} (named by {policy_name}) not found")
        header_entries: list[str] = []
        if request.listener:
            try:
                listener_name = normalise_name(request.listener, LISTENER)
            except InvalidName as exc:
                raise InvalidResource([FieldViolation("listener", str(exc))]) from None
            listener = state.listeners.get(listener_name)
            if listener is None:
                raise LookupError(f"{listener_name} not found")
            header_entries = list(listener.custom_request_headers)
        when = request.time.ToDatetime(tzinfo=UTC) if request.HasField("time") else datetime.now(UTC)
        result = dry_run(chain, trust_config, policy, when, header_entries)
        verdict = result.verdict
        return api_pb2.CheckResponse(
            present=verdict.present,
            chain_verified=verdict.chain_verified,
            error=verdict.error,
            reason=verdict.reason,
            headers=[api_pb2.Header(name=name, value=value) for name, value in result.headers],
            accepted=verdict.accepted,
            detail=verdict.detail,
        )


def add_check_service(server: grpc.aio.Server, ctx: object) -> None:
    """Registration hook for control_plane/server.py."""
    api_pb2_grpc.add_CheckServiceServicer_to_server(CheckService(ctx.store), server)  # type: ignore[attr-defined]
