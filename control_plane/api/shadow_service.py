"""ShadowService (SPEC §12): store a candidate TrustConfig or ServerTlsPolicy beside the active one
(validated exactly like an ordinary write of it), show what node reports say about it, promote it (an
ordinary audited write of the active resource) or discard it. Candidates live in the store's own
collections `shadowTrustConfigs` / `shadowServerTlsPolicies`, so both backends keep, replicate and audit
them like any resource; the snapshot builder sends them to nodes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from mtlsgate.v1 import reports_pb2, resources_pb2, shadow_pb2, shadow_pb2_grpc

from control_plane.api.authorization import Caller, current_caller
from control_plane.api.errors import InvalidResource, ReferenceConflict, status_for
from control_plane.api.integrity import check_write
from control_plane.api.resource_service import ResourceApi
from control_plane.authz.identity import Identity
from control_plane.fleet.shadow import summarise
from control_plane.resource_names import (
    SERVER_TLS_POLICY,
    SHADOW_COLLECTIONS,
    TRUST_CONFIG,
    InvalidName,
    Kind,
    active_name,
    normalise_name,
    shadow_name,
)
from control_plane.store.base import NotFound, Store, StoreError, StoreState, copy_message
from data_plane.validation.resources import FieldViolation

log = logging.getLogger("mtlsgate.shadow")

SERVICE_NAME = "mtlsgate.v1.ShadowService"
# How far back status reads node reports (the store ages reports out sooner anyway).
STATUS_WINDOW_SECONDS = 24 * 3600.0
_UNKNOWN = Caller(Identity("unknown", "none"), None)


class ShadowError(Exception):
    """A request that cannot be done as asked; one line for the caller."""


def _kind_of(name: str) -> Kind:
    collection = name.partition("/")[0]
    if collection == TRUST_CONFIG.collection:
        return TRUST_CONFIG
    if collection == SERVER_TLS_POLICY.collection:
        return SERVER_TLS_POLICY
    raise InvalidName(f"{name!r}: only trustConfigs/ID and serverTlsPolicies/ID can have a shadow candidate")


def resolve_name(state: StoreState, text: str) -> str:
    """`trustConfigs/ID`, `serverTlsPolicies/ID` (or a full GCP name); a bare ID when exactly one
    candidate (or, failing that, one active resource) of that ID exists."""
    text = text.strip()
    if not text:
        raise InvalidName("a name is required (trustConfigs/ID or serverTlsPolicies/ID)")
    if "/" not in text:
        for pool in ([c for c in SHADOW_COLLECTIONS.values()], list(SHADOW_COLLECTIONS)):
            found = [f"{c}/{text}" for c in pool if f"{c}/{text}" in state.collection(c)]
            if len(found) == 1:
                return active_name(found[0]) if found[0].startswith("shadow") else found[0]
            if len(found) > 1:
                raise InvalidName(f"{text!r} is ambiguous: say trustConfigs/{text} or serverTlsPolicies/{text}")
        raise NotFound(f"no trustConfigs/{text} or serverTlsPolicies/{text}")
    name = normalise_name(text)
    _kind_of(name)
    return name


def _candidate_view(active: Message | None, candidate: Message, name: str, changed: bool = True
                    ) -> shadow_pb2.ShadowCandidate:
    out = shadow_pb2.ShadowCandidate(name=name, candidate_etag=candidate.etag,  # type: ignore[attr-defined]
                                     active_etag=active.etag if active is not None else "",  # type: ignore[attr-defined]
                                     changed=changed)
    out.create_time.CopyFrom(candidate.update_time)  # type: ignore[attr-defined]
    return out


class Shadows:
    """The operations, synchronous (the servicer runs them in a thread: writes wait for the database)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def apply(self, request: shadow_pb2.ApplyShadowRequest, caller: Caller) -> shadow_pb2.ShadowCandidate:
        which = request.WhichOneof("candidate")
        if which is None:
            raise InvalidResource([FieldViolation("candidate", "required (trustConfig or serverTlsPolicy)")])
        incoming = getattr(request, which)
        kind = TRUST_CONFIG if which == "trust_config" else SERVER_TLS_POLICY
        api = ResourceApi(kind, self.store)
        name = api._name(incoming.name, f"{kind.json_field}.name")
        active = self.store.get(name)
        if active is None:
            raise NotFound(f"{name} not found: a shadow candidate is stored beside an existing {kind.kind} "
                           "(apply it normally first)")
        # Exactly the validation an ordinary write of `name` gets (field checks, references, the rules
        # that need the rest of the store), so that promoting it later cannot fail on content.
        incoming.name = name
        prepared = api.prepare(incoming, active)
        candidate_name = shadow_name(name)

        def check(state: StoreState, new: Message | None) -> None:
            if state.get(name) is None:
                raise NotFound(f"{name} was deleted")
            if new is not None:
                as_active = copy_message(new)
                as_active.name = name  # type: ignore[attr-defined]
                check_write(state, name, as_active)

        if request.validate_only:
            check(self.store.state(), prepared)
            prepared.name = candidate_name  # type: ignore[attr-defined]
            return _candidate_view(active, prepared, name, changed=False)
        stored = copy_message(prepared)
        stored.name = candidate_name  # type: ignore[attr-defined]
        result = self.store.update(stored, actor=caller.identity.name, role=caller.role_name, allow_missing=True,
                                   check=check, detail=f"shadow candidate of {name}")
        assert result.resource is not None
        if result.changed:
            log.info("stored shadow candidate of %s (revision %d, by %s)", name, result.revision,
                     caller.identity.name)
        return _candidate_view(active, result.resource, name, result.changed)

    def _candidate(self, state: StoreState, name: str) -> Message:
        candidate = state.get(shadow_name(name))
        if candidate is None:
            raise NotFound(f"{name} has no shadow candidate")
        return candidate

    def status(self, request: shadow_pb2.ShadowRequest) -> shadow_pb2.ShadowStatus:
        state = self.store.state()
        name = resolve_name(state, request.name)
        candidate = self._candidate(state, name)
        out = shadow_pb2.ShadowStatus(candidate=_candidate_view(state.get(name), candidate, name, False))
        reports = self._reports(candidate)
        out.reports_available = reports is not None
        summary = summarise(reports or [], name, candidate.etag)  # type: ignore[attr-defined]
        out.judged, out.would_newly_reject, out.would_newly_accept = (
            summary.judged, summary.would_newly_reject, summary.would_newly_accept)
        out.nodes.extend(summary.nodes)
        for f in summary.findings:
            finding = out.findings.add(direction=f.direction, fingerprint_sha256=f.fingerprint_sha256,  # type: ignore[arg-type]
                                       active_error=f.active_error, candidate_error=f.candidate_error,
                                       count=f.count, nodes=f.nodes, listeners=f.listeners)
            finding.last_seen.FromNanoseconds(int(f.last_seen * 1e9))
        return out

    def _reports(self, candidate: Message) -> list[tuple[str, float, reports_pb2.NodeReport]] | None:
        """Node reports received since this candidate revision was stored; None without a report store."""
        reports = getattr(self.store, "reports", None)
        if not callable(reports):
            return None
        since = candidate.update_time.ToNanoseconds() / 1e9  # type: ignore[attr-defined]
        out = []
        for node_id, received_at, data in reports(since=since, node_ids=None):
            report = reports_pb2.NodeReport()
            report.ParseFromString(bytes(data))
            out.append((node_id, received_at, report))
        return out

    def list(self) -> shadow_pb2.ListShadowsResponse:
        state = self.store.state()
        out = shadow_pb2.ListShadowsResponse()
        for collection in SHADOW_COLLECTIONS.values():
            for cname, candidate in state.collection(collection).items():
                name = active_name(cname)
                out.candidates.append(_candidate_view(state.get(name), candidate, name, False))
        return out

    def promote(self, request: shadow_pb2.ShadowRequest, caller: Caller) -> shadow_pb2.ShadowCandidate:
        state = self.store.state()
        name = resolve_name(state, request.name)
        candidate = self._candidate(state, name)
        promoted = copy_message(candidate)
        promoted.name = name  # type: ignore[attr-defined]
        kind = _kind_of(name)
        # An ordinary write of the active resource (same validation, references, audit). The enforcement
        # change is this one write; dropping the candidate afterwards only stops the (now equal) shadow.
        api = ResourceApi(kind, self.store)
        active = state.get(name)
        prepared = api.prepare(promoted, active)
        result = self.store.update(prepared, actor=caller.identity.name, role=caller.role_name,
                                   expected_etag=active.etag if active is not None else "",  # type: ignore[attr-defined]
                                   check=lambda s, new: check_write(s, name, new),
                                   detail=f"promoted shadow candidate {candidate.etag}")  # type: ignore[attr-defined]
        self._drop(name, candidate, caller, "promoted")
        assert result.resource is not None
        log.info("promoted shadow candidate of %s (revision %d, by %s)", name, result.revision, caller.identity.name)
        return _candidate_view(result.resource, candidate, name, result.changed)

    def discard(self, request: shadow_pb2.ShadowRequest, caller: Caller) -> empty_pb2.Empty:
        state = self.store.state()
        name = resolve_name(state, request.name)
        candidate = self._candidate(state, name)
        self._drop(name, candidate, caller, "discarded")
        log.info("discarded shadow candidate of %s (by %s)", name, caller.identity.name)
        return empty_pb2.Empty()

    def _drop(self, name: str, candidate: Message, caller: Caller, why: str) -> None:
        with contextlib.suppress(NotFound):  # someone else dropped it meanwhile: the outcome asked for
            self.store.delete(shadow_name(name), actor=caller.identity.name, role=caller.role_name,
                              expected_etag=candidate.etag,  # type: ignore[attr-defined]
                              detail=f"shadow candidate of {name} {why}")


class ShadowService(shadow_pb2_grpc.ShadowServiceServicer):
    def __init__(self, store: Store) -> None:
        self.shadows = Shadows(store)

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[Caller], Any]) -> Any:
        caller = current_caller() or _UNKNOWN
        try:
            return await asyncio.to_thread(work, caller)
        except InvalidName as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ShadowError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (InvalidResource, ReferenceConflict, StoreError) as exc:
            await context.abort_with_status(status_for(exc))

    async def ApplyShadow(self, request: shadow_pb2.ApplyShadowRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._call(context, lambda c: self.shadows.apply(request, c))

    async def GetShadowStatus(self, request: shadow_pb2.ShadowRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._call(context, lambda c: self.shadows.status(request))

    async def ListShadows(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> Any:
        return await self._call(context, lambda c: self.shadows.list())

    async def PromoteShadow(self, request: shadow_pb2.ShadowRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._call(context, lambda c: self.shadows.promote(request, c))

    async def DiscardShadow(self, request: shadow_pb2.ShadowRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._call(context, lambda c: self.shadows.discard(request, c))


def add_shadow_service(server: grpc.aio.Server, ctx: Any) -> None:
    """`control_plane.server.SERVICES` hook."""
    shadow_pb2_grpc.add_ShadowServiceServicer_to_server(ShadowService(ctx.store), server)


_ = resources_pb2  # the candidate messages are resources_pb2 types (imported for type checkers)
