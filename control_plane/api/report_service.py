"""NodeReportService/Report, ClientService/ListClients (SPEC §12) and BackendHealthService/ListBackendHealth
(issue 16) — glue around `control_plane.fleet.aggregate` and `control_plane.fleet.backend_health`.

A report stream is admitted like an ADS stream (SPEC §8: the peer certificate must be the registered
identity of the node the first report names) and may then only describe that node. Every report is
bounded before it is parsed (size), after (counts, strings: `report_problem`) and in rate (a token bucket
per node); a refused report gets a ReportAck with the reason and the stream goes on. Accepted reports are
written to the store in batches, once a second, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from mtlsgate.v1 import reports_pb2

from control_plane.authz.admission import NodeRefused, admit
from control_plane.fleet.aggregate import MAX_REPORT_BYTES, StoredReport, client_inventory, report_problem
from control_plane.fleet.backend_health import latest_backend_health
from control_plane.xds.ads import certificate_identities

log = logging.getLogger("mtlsgate.reports")

SERVICE_NAMES = ("mtlsgate.v1.NodeReportService", "mtlsgate.v1.ClientService", "mtlsgate.v1.BackendHealthService")
KEEP_SECONDS = 3600.0  # reports kept (SPEC §12 "aged out"); the inventory covers this window
FLUSH_SECONDS = 1.0
MAX_PENDING = 50_000  # reports waiting for the store; beyond, the oldest are dropped (and logged)
RATE_BURST = 5.0  # reports a node may send at once (its periodic one plus notable events) …
RATE_PER_SECOND = 1.0  # … refilled at this rate
BACKEND_HEALTH_WINDOW = 60.0  # seconds: a node whose latest report is older is not shown by ListBackendHealth


@dataclass
class _Oversized:
    """What the deserializer returns for a message over the bound: never parsed."""

    size: int


def _deserialize(data: bytes) -> reports_pb2.NodeReport | _Oversized:
    if len(data) > MAX_REPORT_BYTES:
        return _Oversized(len(data))
    return reports_pb2.NodeReport.FromString(data)


class _Bucket:
    def __init__(self, now: float) -> None:
        self.tokens, self.at = RATE_BURST, now

    def take(self, now: float) -> bool:
        self.tokens = min(RATE_BURST, self.tokens + (now - self.at) * RATE_PER_SECOND)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class ReportService:
    def __init__(self, store: Any, *, insecure: bool, keep_seconds: float = KEEP_SECONDS,
                 xds: Any = None) -> None:
        self.store = store
        self.xds = xds  # the XdsServer: revalidation reports feed its revocation tracker (B6)
        self.insecure = insecure
        self.keep_seconds = keep_seconds
        self._pending: list[tuple[str, float, bytes]] = []
        self._buckets: dict[str, _Bucket] = {}
        self._flusher: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- the report stream

    async def report(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        node: str | None = None
        async for message in requests:
            if isinstance(message, _Oversized):
                problem = f"report of {message.size} bytes is over the {MAX_REPORT_BYTES}-byte bound"
                log.warning("node report refused (%s): %s", node or context.peer(), problem)
                yield reports_pb2.ReportAck(error=problem)
                continue
            if node is None:
                node = await self._admit(message.node_id, context)
            now = time.time()
            problem = report_problem(message, node, message.ByteSize())
            if not problem and not self._bucket(node, now).take(now):
                problem = f"too many reports from node {node!r} (at most {RATE_PER_SECOND:g}/s after a burst of {RATE_BURST:g})"
            if problem:
                log.warning("node report refused (%s): %s", node, problem)
                yield reports_pb2.ReportAck(sequence=message.sequence, error=problem)
                continue
            self._keep(node, now, message.SerializeToString())
            if message.revalidations and self.xds is not None:
                self.xds.revalidation_reported(node, message, now)
            yield reports_pb2.ReportAck(sequence=message.sequence)

    async def _admit(self, node_id: str, context: grpc.aio.ServicerContext) -> str:
        identities = certificate_identities(context.auth_context() or {})
        try:
            admit(node_id[:256], "", {}, identities, self.store.state().nodes, insecure=self.insecure)
        except NodeRefused as exc:
            log.warning("node report stream for node.id %r from %s refused: %s", node_id[:64], context.peer(), exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        if not node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first report must name its node (node_id)")
        return node_id

    def _bucket(self, node: str, now: float) -> _Bucket:
        bucket = self._buckets.get(node)
        if bucket is None:
            if len(self._buckets) > 100_000:  # bounded: forget idle nodes' buckets
                self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < 60}
            bucket = self._buckets[node] = _Bucket(now)
        return bucket

    def _keep(self, node: str, now: float, data: bytes) -> None:
        self._pending.append((node, now, data))
        if len(self._pending) > MAX_PENDING:
            dropped = len(self._pending) - MAX_PENDING
            del self._pending[:dropped]
            log.warning("the store is behind: %d node reports dropped", dropped)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="report-flush")

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        rows, self._pending = self._pending, []
        if not rows:
            return
        try:
            await asyncio.to_thread(self.store.record_reports, rows, keep_seconds=self.keep_seconds)
        except Exception as exc:  # the store is down: keep them for the next try (bounded by _keep)
            log.warning("keeping %d node reports failed: %s", len(rows), exc)
            self._pending[:0] = rows

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        with contextlib.suppress(Exception):
            await self.flush()

    # ---------------------------------------------------------------- the inventory

    async def list_clients(self, request: reports_pb2.ListClientsRequest,
                           context: grpc.aio.ServicerContext) -> reports_pb2.ListClientsResponse:
        await self.flush()  # what was reported a moment ago counts
        now = time.time()
        since = now - self.keep_seconds
        raw = await asyncio.to_thread(self.store.reports, since=since)
        stored = [StoredReport(node_id, at, reports_pb2.NodeReport.FromString(data)) for node_id, at, data in raw]
        rows = client_inventory(stored, now=now, listener=request.listener, rejected_only=request.rejected,
                                expiring_within=request.expiring_within_seconds or None)
        out = reports_pb2.ListClientsResponse(since=_ts(min((s.received_at for s in stored), default=now)))
        for row in rows:
            days = row.days_to_expiry(now)
            record = out.clients.add(
                fingerprint_sha256=row.fingerprint_sha256, subject=row.subject, issuer=row.issuer, serial=row.serial,
                verified=row.verified, accepted=row.accepted, error=row.error, allowlisted=row.allowlisted,
                expired=row.expired, expired_allowlisted=row.expired_allowlisted, count=row.count,
                nodes=sorted(row.nodes), listeners=sorted(row.listeners), days_to_expiry=days or 0.0)
            if row.not_after:
                record.not_after.CopyFrom(_ts(row.not_after))
            record.first_seen.CopyFrom(_ts(row.first_seen))
            record.last_seen.CopyFrom(_ts(row.last_seen))
        return out


    # ---------------------------------------------------------------- backend endpoint health (issue 16)

    async def list_backend_health(self, request: reports_pb2.ListBackendHealthRequest,
                                  context: grpc.aio.ServicerContext) -> reports_pb2.ListBackendHealthResponse:
        await self.flush()
        now = time.time()
        raw = await asyncio.to_thread(self.store.reports, since=now - BACKEND_HEALTH_WINDOW)
        stored = [StoredReport(node_id, at, reports_pb2.NodeReport.FromString(data)) for node_id, at, data in raw]
        out = reports_pb2.ListBackendHealthResponse()
        for node in latest_backend_health(stored, backend_service=request.backend_service):
            out.nodes.add(node_id=node.node_id, report_time=_ts(node.received_at),
                          age_seconds=max(0.0, now - node.received_at), backend_services=node.services)
        return out


def _ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def add_report_services(server: grpc.aio.Server, ctx: Any) -> None:
    """`control_plane.server.SERVICES` hook."""
    service = ReportService(ctx.store, insecure=ctx.options.insecure, xds=ctx.xds)
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("mtlsgate.v1.NodeReportService", {
            "Report": grpc.stream_stream_rpc_method_handler(
                service.report, request_deserializer=_deserialize,
                response_serializer=reports_pb2.ReportAck.SerializeToString)}),
        grpc.method_handlers_generic_handler("mtlsgate.v1.ClientService", {
            "ListClients": grpc.unary_unary_rpc_method_handler(
                service.list_clients, request_deserializer=reports_pb2.ListClientsRequest.FromString,
                response_serializer=reports_pb2.ListClientsResponse.SerializeToString)}),
        grpc.method_handlers_generic_handler("mtlsgate.v1.BackendHealthService", {
            "ListBackendHealth": grpc.unary_unary_rpc_method_handler(
                service.list_backend_health, request_deserializer=reports_pb2.ListBackendHealthRequest.FromString,
                response_serializer=reports_pb2.ListBackendHealthResponse.SerializeToString)}),
    ))
    ctx.reports = service
    ctx.on_shutdown.append(service.close)
