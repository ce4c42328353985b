"""The xDS state-of-the-world stream protocol, server side, as a sans-I/O state machine (one per stream).

It takes DiscoveryRequests and new group snapshots and answers with the pushes to make and what each
request meant (ACK, NACK, stale, subscription). Rules (xDS v3 spec): nonces are per stream; a request whose
`response_nonce` is not the last nonce sent for its type is stale and ignored; ACK = the sent version
echoed without `error_detail`; NACK = `error_detail` present — recorded, and the rejected version is never
re-sent (only a changed snapshot is pushed); names subscribed later are answered; a first request that
already carries the current version (a reconnecting node) is not answered with that same version again.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from mtlsgate import resource_types as rt

from control_plane.xds.snapshot import GroupSnapshot

# Bounds on what a node controls.
MAX_RESOURCE_NAMES = 1024
MAX_NAME_LENGTH = 256
MAX_ERROR_LENGTH = 2048


class ProtocolError(Exception):
    """The node broke the protocol in a way that ends the stream (the message says how)."""


class RequestKind(enum.Enum):
    SUBSCRIBE = "subscribe"  # first request for a type, or a change of names
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"  # response_nonce is not the latest one we sent: ignored


@dataclass(frozen=True)
class Push:
    """One DiscoveryResponse to send."""

    type_url: str
    version: str
    nonce: str
    resources: list[any_pb2.Any]
    revision: int
    written_at: float


@dataclass(frozen=True)
class RequestOutcome:
    kind: RequestKind
    type_url: str
    version: str = ""  # the version ACKed or NACKed
    error: str = ""  # the NACK's message
    push: Push | None = None  # what this request makes us send (names subscribed later)
    acked_push: Push | None = None  # for ACK: the push it acknowledges (convergence timing)


@dataclass
class TypeState:
    type_url: str
    names: frozenset[str] | None = None  # None = wildcard
    subscribed: bool = False
    last_push: Push | None = None
    sent_names: frozenset[str] | None = None
    acked_version: str = ""
    acked_nonce: str = ""
    nacked_version: str = ""  # the version of last_push, if the node rejected it
    last_error: str = ""


def _default_nonces() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: str(next(counter))


@dataclass
class StreamProtocol:
    """Per-stream protocol state. `snapshot` is the stream's node group's current snapshot (None until the
    first build)."""

    next_nonce: Callable[[], str] = field(default_factory=_default_nonces)
    types: dict[str, TypeState] = field(default_factory=dict)
    snapshot: GroupSnapshot | None = None

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> RequestOutcome:
        type_url = request.type_url
        if type_url not in rt.ALL_TYPES:
            raise ProtocolError(f"type_url {type_url[:200]!r} is not served here (known: {', '.join(rt.ALL_TYPES)})")
        if len(request.resource_names) > MAX_RESOURCE_NAMES:
            raise ProtocolError(f"{len(request.resource_names)} resource_names for {type_url}; "
                                f"at most {MAX_RESOURCE_NAMES} allowed")
        if any(len(n) > MAX_NAME_LENGTH for n in request.resource_names):
            raise ProtocolError(f"a resource name for {type_url} is longer than {MAX_NAME_LENGTH} characters")
        ts = self.types.setdefault(type_url, TypeState(type_url))
        names = None if type_url in rt.WILDCARD_TYPES else frozenset(request.resource_names)

        if request.response_nonce:
            if ts.last_push is None or request.response_nonce != ts.last_push.nonce:
                return RequestOutcome(RequestKind.STALE, type_url, request.version_info)
            pushed = ts.last_push
            ts.names = names
            if request.HasField("error_detail"):
                ts.nacked_version = pushed.version
                ts.last_error = request.error_detail.message[:MAX_ERROR_LENGTH]
                # Names may change in a NACK too, but answering them would re-send the rejected version.
                return RequestOutcome(RequestKind.NACK, type_url, pushed.version, ts.last_error)
            if request.version_info == pushed.version:
                ts.acked_version = pushed.version
                ts.acked_nonce = pushed.nonce
                ts.nacked_version = ""
                return RequestOutcome(RequestKind.ACK, type_url, pushed.version,
                                      push=self._push_if_names_changed(ts), acked_push=pushed)
            # The node still holds an older version (it is asking for new names before accepting).
            return RequestOutcome(RequestKind.SUBSCRIBE, type_url, request.version_info,
                                  push=self._push_if_names_changed(ts))

        if ts.subscribed:
            # A later request without a nonce (nothing was sent for this type yet): a change of names.
            ts.names = names
            return RequestOutcome(RequestKind.SUBSCRIBE, type_url, request.version_info,
                                  push=self._push_if_names_changed(ts))
        # First request for this type on this stream (new node, or a node reconnecting with what it has).
        ts.subscribed = True
        ts.names = names
        current = self._type_snapshot(type_url)
        if current is not None and request.version_info and request.version_info == current.version:
            # Reconnect with the current version: it already has it; record as acknowledged, send nothing.
            ts.acked_version = request.version_info
            ts.sent_names = names
            return RequestOutcome(RequestKind.SUBSCRIBE, type_url, request.version_info)
        if request.version_info:
            ts.acked_version = request.version_info
        return RequestOutcome(RequestKind.SUBSCRIBE, type_url, request.version_info, push=self._push(ts))

    def on_snapshot(self, snapshot: GroupSnapshot) -> list[Push]:
        """A new snapshot for this stream's group: push every subscribed type whose version changed
        (by-name types before Listener, so a node sees certificates/bundles/services before listeners using them)."""
        self.snapshot = snapshot
        pushes = []
        for type_url in (rt.SERVER_CERTIFICATE, rt.TRUST_BUNDLE, rt.BACKEND_SERVICE, rt.LISTENER):
            ts = self.types.get(type_url)
            if ts is None or not ts.subscribed:
                continue
            current = snapshot.types[type_url]
            sent_version = ts.last_push.version if ts.last_push else ts.acked_version
            if current.version == sent_version:
                continue
            push = self._push(ts)
            if push is not None:
                pushes.append(push)
        return pushes

    def _type_snapshot(self, type_url: str):  # -> TypeSnapshot | None
        return self.snapshot.types[type_url] if self.snapshot is not None else None

    def _push_if_names_changed(self, ts: TypeState) -> Push | None:
        if ts.names == ts.sent_names or self.snapshot is None:
            return None
        current = self.snapshot.types[ts.type_url]
        if ts.nacked_version and ts.nacked_version == current.version:
            return None
        return self._push(ts)

    def _push(self, ts: TypeState) -> Push | None:
        if self.snapshot is None:
            return None  # answered by on_snapshot once the first snapshot exists
        if ts.names is not None and not ts.names and ts.sent_names is None and ts.last_push is None:
            # By-name type subscribed with no names: nothing to send until names arrive.
            ts.sent_names = ts.names
            return None
        current = self.snapshot.types[ts.type_url]
        push = Push(ts.type_url, current.version, self.next_nonce(), current.select(ts.names),
                    self.snapshot.revision, self.snapshot.written_at)
        ts.last_push = push
        ts.sent_names = ts.names
        ts.nacked_version = ""
        return push
