"""TrustConfigService, ServerTlsPolicyService, CertificateService and ListenerService: one generic
implementation of Create/Get/List/Update/Delete (AIP style: etag preconditions, validate_only, upsert with
allow_missing, update masks) parameterised by the resource kind."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2, field_mask_pb2, message_factory
from google.protobuf.message import Message
from mtlsgate.v1 import api_pb2, backends_pb2, resources_pb2, rollouts_pb2

from control_plane.api.authorization import Caller, current_caller
from control_plane.api.errors import InvalidResource, status_for
from control_plane.api.integrity import check_write
from control_plane.authz.admission import validate_node
from control_plane.authz.identity import Identity
from control_plane.crl_sources.schedule import carry_over
from control_plane.resource_names import KINDS, InvalidName, Kind, normalise_name, normalise_references
from control_plane.rollouts.policy import validate_rollout_policy
from control_plane.store.base import (
    AlreadyExists,
    EtagMismatch,
    NotFound,
    Store,
    StoreError,
    StoreState,
    content_etag,
)
from data_plane.validation import resources as validation
from data_plane.validation.resources import FieldViolation

log = logging.getLogger("mtlsgate.api")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_VALIDATORS: dict[str, Callable[[Any], list[FieldViolation]]] = {
    "trustConfigs": validation.validate_trust_config,
    "serverTlsPolicies": validation.validate_server_tls_policy,
    "certificates": validation.validate_certificate,
    "listeners": validation.validate_listener,
    "nodes": validate_node,
    "rolloutPolicies": validate_rollout_policy,
    "backendServices": validation.validate_backend_service,
    "backendAuthenticationConfigs": validation.validate_backend_authentication_config,
}
_OUTPUT_ONLY = ("etag", "create_time", "update_time")
CRL_FETCHER_ACTOR = "system:crl-fetcher"

# Fills a TrustConfig's live CRL source status (the CRL fetcher's memory) into what a client reads.
LiveStatus = Callable[[resources_pb2.TrustConfig], None]


def redact(resource: Message, live: LiveStatus | None = None) -> Message:
    """What a client may see: private keys are write-only (their SPKI SHA-256 is returned instead); a
    fetched CRL is shown by digest, number and dates, not as megabytes of DER."""
    out = type(resource)()
    out.CopyFrom(resource)
    if isinstance(out, resources_pb2.Certificate):
        out.ClearField("pem_private_key")
    if isinstance(out, resources_pb2.TrustConfig):
        if live is not None:
            live(out)
        for status in out.crl_source_status:
            status.ClearField("der_crl")
    return out


def _snake(path: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), path)


def as_caller(caller: Caller | str) -> Caller:
    """Writers inside the process (the CRL fetcher, tests) may name themselves with a plain string."""
    return caller if isinstance(caller, Caller) else Caller(Identity(caller, "none"), None)


class ResourceApi:
    """The write path for one kind: normalise, validate, check references, store, redact."""

    def __init__(self, kind: Kind, store: Store, live: LiveStatus | None = None) -> None:
        self.kind = kind
        self.store = store
        self.live = live

    # ---------------------------------------------------------- pure preparation

    def prepare(self, resource: Message, existing: Message | None) -> Message:
        """Normalise names, drop output-only fields, fill the key digest, validate. Raises InvalidResource."""
        out = type(resource)()
        out.CopyFrom(resource)
        for field in _OUTPUT_ONLY:
            out.ClearField(field)
        if isinstance(out, resources_pb2.Listener):
            out.ClearField("resolved_server_tls_policy")  # xDS-only, never stored
        if isinstance(out, backends_pb2.BackendService):
            out.ClearField("resolved_backend_authentication")  # xDS-only, never stored
        if isinstance(out, resources_pb2.Certificate):
            out.ClearField("private_key_sha256")
            if not out.pem_private_key and existing is not None:
                # Write-only key: an update that omits it keeps the stored one (as `get -o yaml` + edit does).
                out.pem_private_key = existing.pem_private_key  # type: ignore[attr-defined]
        if isinstance(out, resources_pb2.TrustConfig):
            carry_over(out, existing)  # type: ignore[arg-type]
        problems = [FieldViolation(f, d) for f, d in normalise_references(out)]
        problems += _VALIDATORS[self.kind.collection](out)
        if isinstance(out, resources_pb2.TrustConfig) and out.crl_source_status and problems and all(
                p.field.startswith("crlSourceStatus") for p in problems):
            # A fetched CRL this edit invalidates (its issuing CA was removed, …) is dropped, not blamed on
            # the person: the fetcher asks its source again at once.
            del out.crl_source_status[:]
            problems = _VALIDATORS[self.kind.collection](out)
        if problems:
            raise InvalidResource(problems)
        if isinstance(out, resources_pb2.Certificate):
            out.private_key_sha256 = validation.private_key_sha256(out.pem_private_key)
        return out

    def _name(self, text: str, field: str = "name") -> str:
        if not text:
            raise InvalidResource([FieldViolation(field, f"required ({self.kind.collection}/ID)")])
        try:
            return normalise_name(text, self.kind)
        except InvalidName as exc:
            raise InvalidResource([FieldViolation(field, str(exc))]) from None

    def _checker(self, name: str) -> Callable[[StoreState, Message | None], None]:
        return lambda state, new: check_write(state, name, new)

    def write_fetched(self, resource: resources_pb2.TrustConfig, expected_etag: str) -> Any:
        """The CRL fetcher's write: a TrustConfig whose crl_source_status it changed, stored through the
        same validation, cross-resource checks and audit log as a person's write, under an etag
        precondition (so an edit that landed since the fetcher read it is never overwritten)."""
        out = resources_pb2.TrustConfig()
        out.CopyFrom(resource)
        for field in _OUTPUT_ONLY:
            out.ClearField(field)
        problems = [FieldViolation(f, d) for f, d in normalise_references(out)]
        problems += validation.validate_trust_config(out)
        if problems:
            raise InvalidResource(problems)
        result = self.store.update(out, actor=CRL_FETCHER_ACTOR, role="system", expected_etag=expected_etag,
                                   check=self._checker(out.name))
        if result.changed:
            log.info("updated %s (revision %d, by %s)", out.name, result.revision, CRL_FETCHER_ACTOR)
        return result

    # ---------------------------------------------------------- operations

    def create(self, request: Any, caller: Caller | str) -> Message:
        caller = as_caller(caller)
        resource = getattr(request, self.kind.field)
        given_id = getattr(request, f"{self.kind.field}_id")
        field = self.kind.json_field
        if given_id and resource.name:
            name = self._name(resource.name, f"{field}.name")
            if name != self._name(given_id, f"{field}Id"):
                raise InvalidResource([FieldViolation(f"{field}Id", f"{given_id!r} disagrees with "
                                                      f"{field}.name {resource.name!r}")])
        else:
            name = self._name(given_id or resource.name, f"{field}Id" if given_id else f"{field}.name")
        resource.name = name
        prepared = self.prepare(resource, None)
        if request.validate_only:
            state = self.store.state()
            if state.get(name) is not None:
                raise AlreadyExists(f"{name} already exists")
            check_write(state, name, prepared)
            prepared.etag = content_etag(prepared)  # type: ignore[attr-defined]  # the etag it would get
            return redact(prepared, self.live)
        result = self.store.create(prepared, actor=caller.identity.name, role=caller.role_name,
                                   check=self._checker(name))
        log.info("created %s (revision %d, by %s as %s)", name, result.revision, caller.identity.name,
                 caller.role_name or "-")
        assert result.resource is not None
        return redact(result.resource, self.live)

    def get(self, request: api_pb2.GetResourceRequest) -> Message:
        name = self._name(request.name)
        found = self.store.get(name)
        if found is None:
            raise NotFound(f"{name} not found")
        return redact(found, self.live)

    def list(self, request: api_pb2.ListResourcesRequest) -> tuple[list[Message], str]:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 0 < size <= MAX_PAGE_SIZE:
            raise InvalidResource([FieldViolation("pageSize", f"must be between 0 and {MAX_PAGE_SIZE}")])
        items = [m for n, m in self.store.state().collection(self.kind.collection).items()
                 if n > request.page_token]
        page = items[:size]
        token = page[-1].name if len(items) > size else ""  # type: ignore[attr-defined]
        return [redact(m, self.live) for m in page], token

    def update(self, request: Any, caller: Caller | str) -> Message:
        caller = as_caller(caller)
        incoming = getattr(request, self.kind.field)
        field = self.kind.json_field
        name = self._name(incoming.name, f"{field}.name")
        existing = self.store.get(name)
        if existing is None and not request.allow_missing:
            raise NotFound(f"{name} not found (set allow_missing to create it)")
        resource = self._apply_mask(incoming, existing, request.update_mask)
        resource.name = name
        prepared = self.prepare(resource, existing)
        if request.validate_only:
            if existing is not None and incoming.etag and incoming.etag != existing.etag:  # type: ignore[attr-defined]
                raise EtagMismatch(f"etag mismatch for {name}")
            check_write(self.store.state(), name, prepared)
            prepared.etag = content_etag(prepared)  # type: ignore[attr-defined]  # the etag it would get
            return redact(prepared, self.live)
        result = self.store.update(prepared, actor=caller.identity.name, role=caller.role_name,
                                   expected_etag=incoming.etag, allow_missing=request.allow_missing,
                                   check=self._checker(name))
        if result.changed:
            verb = "created" if result.before is None else "updated"
            log.info("%s %s (revision %d, by %s as %s)", verb, name, result.revision, caller.identity.name,
                     caller.role_name or "-")
        assert result.resource is not None
        return redact(result.resource, self.live)

    def _apply_mask(self, incoming: Message, existing: Message | None, mask: field_mask_pb2.FieldMask) -> Message:
        if not mask.paths:
            return incoming
        paths = [_snake(p) for p in mask.paths]
        snake_mask = field_mask_pb2.FieldMask(paths=paths)
        if not snake_mask.IsValidForDescriptor(self.kind.message.DESCRIPTOR):
            raise InvalidResource([FieldViolation("updateMask", f"unknown field in {list(mask.paths)}")])
        base = self.kind.message()
        if existing is not None:
            base.CopyFrom(existing)
        snake_mask.MergeMessage(incoming, base, replace_message_field=True, replace_repeated_field=True)
        base.etag = incoming.etag  # type: ignore[attr-defined]
        return base

    def delete(self, request: api_pb2.DeleteResourceRequest, caller: Caller | str) -> None:
        caller = as_caller(caller)
        name = self._name(request.name)
        if request.validate_only:
            state = self.store.state()
            existing = state.get(name)
            if existing is None:
                raise NotFound(f"{name} not found")
            if request.etag and request.etag != existing.etag:  # type: ignore[attr-defined]
                raise EtagMismatch(f"etag mismatch for {name}: the request carries {request.etag!r} but the "
                                   f"stored resource has {existing.etag!r}")  # type: ignore[attr-defined]
            check_write(state, name, None)
            return
        result = self.store.delete(name, actor=caller.identity.name, role=caller.role_name,
                                   expected_etag=request.etag, check=self._checker(name))
        log.info("deleted %s (revision %d, by %s as %s)", name, result.revision, caller.identity.name,
                 caller.role_name or "-")


_UNKNOWN_CALLER = Caller(Identity("unknown", "none"), None)


def _unary(api: ResourceApi, call: Callable[[Any, Caller], Any], request_type: type[Message],
           response_type: type[Message]) -> grpc.RpcMethodHandler:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            # The authorization interceptor decided who is calling; every server installs it. In a thread:
            # a write waits for the database (PostgreSQL: round trips, or a pool timeout while it is
            # down), which must not stall the xDS streams on this loop.
            return await asyncio.to_thread(call, request, current_caller() or _UNKNOWN_CALLER)
        except (InvalidResource, StoreError) as exc:
            await context.abort_with_status(status_for(exc))

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )


def resource_service_handlers(store: Store, live: LiveStatus | None = None) -> list[grpc.GenericRpcHandler]:
    """Generic handlers for the four resource services (names and types from the proto descriptors);
    `live` fills the CRL fetcher's status into TrustConfigs that are read."""
    handlers = []
    for kind in KINDS:
        api = ResourceApi(kind, store, live)
        service_name = f"{kind.method_suffix}Service"
        service = next(file.services_by_name[service_name] for file in (api_pb2.DESCRIPTOR, rollouts_pb2.DESCRIPTOR)
                       if service_name in file.services_by_name)
        methods = {m.name: m for m in service.methods}
        # From the descriptor: `ListNodesResponse` is the fleet's, the Node kind's is ListNodesResourceResponse.
        list_response = message_factory.GetMessageClass(methods[f"List{kind.plural_suffix}"].output_type)

        def do_list(request: Any, caller: Caller, api: ResourceApi = api, list_response: Any = list_response) -> Any:
            items, token = api.list(request)
            return list_response(**{api.kind.list_field: items, "next_page_token": token})

        def do_get(request: Any, caller: Caller, api: ResourceApi = api) -> Any:
            return api.get(request)

        def do_delete(request: Any, caller: Caller, api: ResourceApi = api) -> Any:
            api.delete(request, caller)
            return empty_pb2.Empty()

        calls: dict[str, Callable[[Any, Caller], Any]] = {
            f"Create{kind.method_suffix}": api.create,
            f"Get{kind.method_suffix}": do_get,
            f"List{kind.plural_suffix}": do_list,
            f"Update{kind.method_suffix}": api.update,
            f"Delete{kind.method_suffix}": do_delete,
        }
        rpc_handlers = {}
        for method_name, call in calls.items():
            method = methods[method_name]
            request_type = message_factory.GetMessageClass(method.input_type)
            response_type = message_factory.GetMessageClass(method.output_type)
            rpc_handlers[method_name] = _unary(api, call, request_type, response_type)
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, rpc_handlers))
    return handlers
