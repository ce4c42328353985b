"""AuditService: who changed what and when, straight from the store's audit log."""

from __future__ import annotations

import grpc
from mtlsgate.v1 import api_pb2, api_pb2_grpc

from control_plane.api.errors import InvalidResource, status_for
from control_plane.resource_names import InvalidName, normalise_name
from control_plane.store.base import Store
from data_plane.validation.resources import FieldViolation

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class AuditService(api_pb2_grpc.AuditServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    async def ListAuditEntries(self, request: api_pb2.ListAuditEntriesRequest,
                               context: grpc.aio.ServicerContext) -> api_pb2.ListAuditEntriesResponse:
        try:
            return self.list_entries(request)
        except InvalidResource as exc:
            await context.abort_with_status(status_for(exc))
            raise  # unreachable: abort raises

    def list_entries(self, request: api_pb2.ListAuditEntriesRequest) -> api_pb2.ListAuditEntriesResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 0 < size <= MAX_PAGE_SIZE:
            raise InvalidResource([FieldViolation("pageSize", f"must be between 0 and {MAX_PAGE_SIZE}")])
        name = ""
        if request.resource_name:
            try:
                name = normalise_name(request.resource_name)
            except InvalidName as exc:
                raise InvalidResource([FieldViolation("resourceName", str(exc))]) from None
        try:
            after = int(request.page_token or 0)
        except ValueError:
            raise InvalidResource([FieldViolation("pageToken", "not a token this server returned")]) from None
        records = self.store.audit(name, after_revision=after, limit=size + 1)
        response = api_pb2.ListAuditEntriesResponse()
        for record in records[:size]:
            entry = response.entries.add(revision=record.revision, actor=record.actor, method=record.method,
                                         resource_name=record.resource_name, etag_before=record.etag_before,
                                         etag_after=record.etag_after, role=record.role,
                                         detail=record.detail)
            entry.time.FromNanoseconds(int(record.time * 1e9))
        if len(records) > size:
            response.next_page_token = str(records[size - 1].revision)
        return response
