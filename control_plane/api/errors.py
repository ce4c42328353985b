"""The API's error model: domain errors → gRPC status codes with `google.rpc` details (BadRequest field
violations for invalid input, PreconditionFailure for etag and reference conflicts)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from control_plane.store.base import AlreadyExists, EtagMismatch, NotFound, StoreError, StoreUnavailable
from data_plane.validation.resources import FieldViolation


class InvalidResource(Exception):
    """The request is malformed or a resource fails validation: INVALID_ARGUMENT + BadRequest."""

    def __init__(self, violations: Sequence[FieldViolation], summary: str = "") -> None:
        self.violations = list(violations)
        first = str(self.violations[0]) if self.violations else ""
        more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        super().__init__(f"{summary}{first}{more}" if not summary or not first else f"{summary}: {first}{more}")


class ReferenceConflict(StoreError):
    """A reference would dangle (missing target, or deleting a referenced resource): FAILED_PRECONDITION."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(str(v) for v in self.violations))


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def status_for(exc: Exception) -> grpc.Status:
    """The gRPC status a domain error becomes."""
    if isinstance(exc, InvalidResource):
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations
        ])
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc), details=[_pack(detail)])
    elif isinstance(exc, ReferenceConflict):
        detail = error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type="REFERENCE", subject=v.field,
                                                            description=v.description)
            for v in exc.violations
        ])
        status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=str(exc), details=[_pack(detail)])
    elif isinstance(exc, EtagMismatch):
        detail = error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type="ETAG", subject="etag", description=str(exc))
        ])
        status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=str(exc), details=[_pack(detail)])
    elif isinstance(exc, NotFound):
        status = status_pb2.Status(code=code_pb2.NOT_FOUND, message=str(exc))
    elif isinstance(exc, AlreadyExists):
        status = status_pb2.Status(code=code_pb2.ALREADY_EXISTS, message=str(exc))
    elif isinstance(exc, StoreUnavailable):  # the database is down: retryable, not our bug
        status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(exc))
    else:
        status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {exc}")
    return rpc_status.to_status(status)
