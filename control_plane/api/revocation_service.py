"""RevocationService/ListRevocations (SPEC §12, B6): the revocation tracker of this replica's xDS server
(`control_plane.fleet.revocations`) as `mtlsgate status --revocations` shows it. Read access (viewer)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from mtlsgate.v1 import reports_pb2

from control_plane.fleet.revocations import Revocation

SERVICE_NAME = "mtlsgate.v1.RevocationService"
DEFAULT_LIMIT = 10


def _ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def revocation_to_proto(revocation: Revocation) -> reports_pb2.RevocationRecord:
    out = reports_pb2.RevocationRecord(
        sequence=revocation.sequence, revision=revocation.revision, trust_configs=revocation.trust_configs,
        serials=revocation.serials, serial_count=revocation.serial_count, untracked_nodes=revocation.untracked)
    out.publish_time.CopyFrom(_ts(revocation.published_at))
    for node_id in sorted(revocation.nodes):
        row = revocation.nodes[node_id]
        entry = out.nodes.add(node_id=node_id, acked_version=row.acked_version, closed=row.closed,
                              checked=row.checked, closed_fingerprints=row.closed_fingerprints)
        if row.acked_at:
            entry.ack_time.CopyFrom(_ts(row.acked_at))
            entry.ack_seconds = row.acked_at - revocation.published_at
        if row.enforced_at:
            entry.enforced_time.CopyFrom(_ts(row.enforced_at))
            entry.enforcement_seconds = row.enforced_at - revocation.published_at
    return out


class RevocationService:
    def __init__(self, xds: Any) -> None:
        self.xds = xds

    async def list_revocations(self, request: reports_pb2.ListRevocationsRequest,
                               context: grpc.aio.ServicerContext) -> reports_pb2.ListRevocationsResponse:
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: must be 0 (default) or positive")
        limit = min(request.limit or DEFAULT_LIMIT, 1_000)
        return reports_pb2.ListRevocationsResponse(
            revocations=[revocation_to_proto(r) for r in self.xds.revocations.list(limit)],
            replica=self.xds.replica.name)


def add_revocation_service(server: grpc.aio.Server, ctx: Any) -> None:
    """`control_plane.server.SERVICES` hook (after the xDS server's)."""
    service = RevocationService(ctx.xds)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "ListRevocations": grpc.unary_unary_rpc_method_handler(
            service.list_revocations, request_deserializer=reports_pb2.ListRevocationsRequest.FromString,
            response_serializer=reports_pb2.ListRevocationsResponse.SerializeToString)}),))
