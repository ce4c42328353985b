"""The storage interface of the control plane: what any backing store (SQLite, PostgreSQL) must provide —
atomic writes with etag preconditions, one global revision, an audit log, immutable snapshots of the whole
state, and a notification after every committed write — plus the pure rules both implementations share
(etag checks, stamping a stored message, building a state)."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import Message
from mtlsgate.v1 import backends_pb2, resources_pb2, rollouts_pb2


class StoreError(Exception):
    """A write the store refused; subclasses say why. `str()` is a one-line message for clients."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class StoreUnavailable(StoreError):
    """The store's database could not be reached (retry later). The write was not applied — unless the
    connection was lost during the commit itself, which the message says; the etag precondition of a retry
    tells which it was."""


class HistoryTruncated(StoreError):
    """A revision older than the bounded history the store keeps (MAX_REVISIONS_PER_RESOURCE)."""


class EtagMismatch(StoreError):
    """The caller's etag precondition does not match the stored resource (someone else wrote first)."""


@dataclass(frozen=True)
class StoreState:
    """Everything the store holds at one revision. Immutable snapshot: the mappings never change, and the
    messages in them must be treated as read-only (copy before modifying). Certificates include their
    private keys — never send this state to an API client as is."""

    revision: int
    written_at: float  # time.time() of the write that produced `revision` (0.0 for an empty store)
    trust_configs: Mapping[str, resources_pb2.TrustConfig]
    server_tls_policies: Mapping[str, resources_pb2.ServerTlsPolicy]
    certificates: Mapping[str, resources_pb2.Certificate]
    listeners: Mapping[str, resources_pb2.Listener]
    nodes: Mapping[str, resources_pb2.Node] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))  # registered Nodes (SPEC §8)
    rollout_policies: Mapping[str, rollouts_pb2.RolloutPolicy] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))  # SPEC §12
    rollouts: Mapping[str, rollouts_pb2.RolloutRun] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))  # roll-out runs, written by the driver
    # shadow candidates (SPEC §12), named shadowTrustConfigs/ID and shadowServerTlsPolicies/ID
    shadow_trust_configs: Mapping[str, resources_pb2.TrustConfig] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    shadow_server_tls_policies: Mapping[str, resources_pb2.ServerTlsPolicy] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    backend_services: Mapping[str, backends_pb2.BackendService] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))  # SPEC §15
    backend_authentication_configs: Mapping[str, backends_pb2.BackendAuthenticationConfig] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))  # SPEC §15

    def collection(self, collection: str) -> Mapping[str, Message]:
        """The mapping for a collection name such as `trustConfigs`."""
        return getattr(self, COLLECTION_FIELDS[collection])  # type: ignore[no-any-return]

    def get(self, name: str) -> Message | None:
        collection, _, _ = name.partition("/")
        try:
            return self.collection(collection).get(name)
        except KeyError:
            return None


@dataclass(frozen=True)
class AuditRecord:
    revision: int
    time: float
    actor: str
    method: str  # CREATE | UPDATE | DELETE
    resource_name: str
    etag_before: str
    etag_after: str
    role: str = ""  # the actor's role when it wrote (SPEC §8; empty in records from before roles)
    detail: str = ""  # why, for writes the control plane made itself (a roll-out's halt or undo, …)


# Every write keeps the resource's previous revisions, this many per resource (the newest included): the
# roll-out driver serves nodes it has not reached from an older revision (SPEC §12).
MAX_REVISIONS_PER_RESOURCE = 32


@dataclass(frozen=True)
class ResourceRevision:
    """One stored version of a resource: what it was from `revision` on (None: deleted at `revision`)."""

    revision: int
    name: str
    etag: str
    resource: Message | None


@dataclass(frozen=True)
class WriteResult:
    """What a write did. `resource` is the stored message (None after a delete); `changed` is False when
    an update carried exactly the stored content (nothing written, no new revision)."""

    resource: Message | None
    before: Message | None
    revision: int
    changed: bool


# Called inside the write, before commit, with the state the write applies to and the message about to be
# stored (None for a delete). Raising aborts the write; the API uses it for cross-resource checks
# (references exist, referenced resources are not deleted) so that they are atomic with the write.
WriteCheck = Callable[[StoreState, Message | None], None]


class Store(Protocol):
    def state(self) -> StoreState:
        """The current snapshot (cheap: no copying, no I/O)."""
        ...

    def revision(self) -> int: ...

    def get(self, name: str) -> Message | None:
        """A copy of the resource named `name` (normalised), or None."""
        ...

    def list(self, collection: str) -> list[Message]:
        """Copies of every resource of a collection (`trustConfigs`, …), ordered by name."""
        ...

    def create(self, resource: Message, *, actor: str, role: str = "",
               check: WriteCheck | None = None, detail: str = "") -> WriteResult:
        """Store a new resource (`resource.name` normalised); AlreadyExists if the name is taken."""
        ...

    def update(self, resource: Message, *, actor: str, role: str = "", expected_etag: str = "",
               allow_missing: bool = False, check: WriteCheck | None = None, detail: str = "") -> WriteResult:
        """Replace a resource. NotFound unless it exists or `allow_missing`; EtagMismatch if
        `expected_etag` is set and differs from the stored etag. `detail` goes into the audit record."""
        ...

    def delete(self, name: str, *, actor: str, role: str = "", expected_etag: str = "",
               check: WriteCheck | None = None, detail: str = "") -> WriteResult: ...

    def revisions(self, name: str, *, limit: int = MAX_REVISIONS_PER_RESOURCE) -> builtins.list[ResourceRevision]:
        """The kept revisions of one resource, newest first (a deletion is a revision with no resource)."""
        ...

    def state_at(self, revision: int) -> StoreState:
        """The whole state as it was at `revision` (≤ the current one). HistoryTruncated when a resource
        changed since has no kept revision that old."""
        ...

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """`callback(revision)` after every committed write, in the thread that wrote (the gRPC API writes
        from its event loop, so callbacks run on that loop). A replicated store also calls it, from its
        own thread, when it learns of writes made by other replicas (once per batch, with the newest
        revision). Returns an unsubscribe function."""
        ...

    def audit(self, resource_name: str = "", *, after_revision: int = 0, limit: int = 100) -> builtins.list[AuditRecord]:
        """Audit records in revision order, optionally for one resource, starting after `after_revision`."""
        ...

    def fleet_table(self) -> FleetTable:
        """Where this control plane publishes the fleet status of the nodes it holds and reads the other
        replicas' (SPEC §14)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ReplicaRow:
    """One control-plane replica in the fleet table. Times are the database's clock."""

    id: str
    name: str
    started_at: float
    heartbeat_at: float
    stopped: bool = False  # shut down cleanly
    generation: int = 0  # increases with every publish that carried node rows


@dataclass(frozen=True)
class FleetRow:
    """One node's status (a serialised `NodeStatus`) as one replica published it; `status == b""` is a
    tombstone (the replica forgot the node). `seq`: the replica's generation when it wrote the row."""

    replica: str
    node_id: str
    seq: int
    status: bytes


@dataclass(frozen=True)
class FleetRead:
    """One read of the fleet table: the database's clock, every replica, and the rows newer than asked."""

    now: float
    replicas: tuple[ReplicaRow, ...]
    rows: tuple[FleetRow, ...]
    generations: Mapping[str, int]  # replica id → the generation its rows were read up to


class FleetTable(Protocol):
    """Fleet status shared by the replicas of one store (SPEC §14). `shared` is False for a store only one
    control plane can open (SQLite): there is nobody to share with, publishing is a no-op."""

    shared: bool

    def publish(self, replica: ReplicaRow, rows: Sequence[tuple[str, bytes]],
                forget: Sequence[str] = ()) -> float:
        """Heartbeat `replica` (stamped with the database's clock, which is returned), upsert its node rows
        (`(node_id, serialised NodeStatus or b"" to forget the node)`), and delete the replicas in
        `forget` with all their rows, in one transaction."""
        ...

    def read(self, local_replica: str, after: Mapping[str, int], max_rows: int) -> FleetRead:
        """Every replica, and the rows of the other replicas newer than `after[replica]` (generation)."""
        ...

    def retire(self, replica_id: str) -> None:
        """Mark the replica stopped (clean shutdown): the others show its nodes as moving at once."""
        ...


class LocalFleetTable:
    """The fleet table of a single-replica store: nothing is shared; the clock is this machine's."""

    shared = False

    def publish(self, replica: ReplicaRow, rows: Sequence[tuple[str, bytes]],
                forget: Sequence[str] = ()) -> float:
        return time.time()

    def read(self, local_replica: str, after: Mapping[str, int], max_rows: int) -> FleetRead:
        return FleetRead(time.time(), (), (), {})

    def retire(self, replica_id: str) -> None:
        return None


# Fields the store owns: never part of a resource's content (so never part of its etag).
_METADATA_FIELDS = ("etag", "create_time", "update_time")


def content_etag(resource: Message) -> str:
    """An etag derived from the resource's content (metadata excluded): identical content has the
    identical etag, so a no-op update keeps it and `apply` can report `unchanged`."""
    content = type(resource)()
    content.CopyFrom(resource)
    for field in _METADATA_FIELDS:
        content.ClearField(field)
    return hashlib.sha256(content.SerializeToString(deterministic=True)).hexdigest()[:20]


def same_content(a: Message, b: Message) -> bool:
    return content_etag(a) == content_etag(b)


def is_postgres_url(db: str) -> bool:
    """Whether a `--db` value names a PostgreSQL database (anything else is a SQLite file)."""
    return db.startswith(("postgresql://", "postgres://"))


COLLECTION_FIELDS = {"trustConfigs": "trust_configs", "serverTlsPolicies": "server_tls_policies",
                     "certificates": "certificates", "listeners": "listeners", "nodes": "nodes",
                     "rolloutPolicies": "rollout_policies", "rollouts": "rollouts",
                     "shadowTrustConfigs": "shadow_trust_configs",
                     "shadowServerTlsPolicies": "shadow_server_tls_policies",
                     "backendServices": "backend_services",
                     "backendAuthenticationConfigs": "backend_authentication_configs"}


def copy_message(message: Message) -> Message:
    out = type(message)()
    out.CopyFrom(message)
    return out


def make_state(revision: int, written_at: float, maps: Mapping[str, Mapping[str, Message]]) -> StoreState:
    """A StoreState from `{collection: {name: message}}` (collections missing from `maps` are empty)."""
    frozen = {field: types.MappingProxyType(dict(sorted(maps.get(c, {}).items())))
              for c, field in COLLECTION_FIELDS.items()}
    return StoreState(revision=revision, written_at=written_at, **frozen)  # type: ignore[arg-type]


def with_change(state: StoreState, revision: int, written_at: float, name: str,
                stored: Message | None) -> StoreState:
    """`state` with one resource replaced (or removed when `stored` is None), at `revision`."""
    maps = {c: dict(state.collection(c)) for c in COLLECTION_FIELDS}
    collection = name.partition("/")[0]
    if stored is None:
        maps[collection].pop(name, None)
    else:
        maps[collection][name] = stored
    return make_state(revision, written_at, maps)


def check_etag(name: str, before: Message, expected_etag: str) -> None:
    current = before.etag  # type: ignore[attr-defined]
    if expected_etag and expected_etag != current:
        raise EtagMismatch(
            f"etag mismatch for {name}: the request carries {expected_etag!r} but the stored resource "
            f"has {current!r} (it was changed since you read it; get it again and retry)"
        )


def stamp(resource: Message, before: Message | None, now: float) -> Message:
    """The message to store: a copy with the content etag, create_time kept from `before`, update_time now."""
    stored = copy_message(resource)
    stored.etag = content_etag(stored)  # type: ignore[attr-defined]
    if before is not None:
        stored.create_time.CopyFrom(before.create_time)  # type: ignore[attr-defined]
    else:
        stored.create_time.FromNanoseconds(int(now * 1e9))  # type: ignore[attr-defined]
    stored.update_time.FromNanoseconds(int(now * 1e9))  # type: ignore[attr-defined]
    return stored


@dataclass(frozen=True)
class WritePlan:
    """What a write will do to `state`, decided before anything is stored: CREATE/UPDATE store `resource`
    (stamped at commit), DELETE removes `name`."""

    method: str
    name: str
    resource: Message | None
    before: Message | None


def plan_create(state: StoreState, resource: Message) -> WritePlan:
    name: str = resource.name  # type: ignore[attr-defined]
    if state.get(name) is not None:
        raise AlreadyExists(f"{name} already exists")
    return WritePlan("CREATE", name, resource, None)


def plan_update(state: StoreState, resource: Message, expected_etag: str, allow_missing: bool
                ) -> WritePlan | WriteResult:
    """The plan, or the WriteResult of a no-op (identical content: nothing written, no new revision)."""
    name: str = resource.name  # type: ignore[attr-defined]
    before = state.get(name)
    if before is None:
        if not allow_missing:
            raise NotFound(f"{name} not found")
        if expected_etag:
            raise EtagMismatch(f"{name} does not exist, but an etag precondition was given")
        return WritePlan("CREATE", name, resource, None)
    check_etag(name, before, expected_etag)
    if content_etag(resource) == before.etag:  # type: ignore[attr-defined]
        return WriteResult(copy_message(before), copy_message(before), state.revision, changed=False)
    return WritePlan("UPDATE", name, resource, before)


def plan_delete(state: StoreState, name: str, expected_etag: str) -> WritePlan:
    before = state.get(name)
    if before is None:
        raise NotFound(f"{name} not found")
    check_etag(name, before, expected_etag)
    return WritePlan("DELETE", name, None, before)


@dataclass(frozen=True)
class PastVersion:
    """What the history says about one resource at a past revision: `found` False means the history does
    not reach back that far; otherwise `resource` is its content then (None: it did not exist)."""

    found: bool
    resource: Message | None = None


def state_from_history(current: StoreState, revision: int, written_at: float,
                       past: Mapping[str, PastVersion]) -> StoreState:
    """`current` with every resource changed after `revision` put back to its version `past` gives."""
    missing = sorted(name for name, version in past.items() if not version.found)
    if missing:
        raise HistoryTruncated(
            f"revision {revision} is older than the kept history of {missing[0]} (the store keeps "
            f"{MAX_REVISIONS_PER_RESOURCE} revisions per resource)")
    maps = {c: dict(current.collection(c)) for c in COLLECTION_FIELDS}
    for name, version in past.items():
        collection = name.partition("/")[0]
        if collection not in maps:
            continue
        if version.resource is None:
            maps[collection].pop(name, None)
        else:
            maps[collection][name] = version.resource
    return make_state(revision, written_at, maps)


def past_version(row: tuple[bytes | None, str] | None, oldest_etag_before: str | None,
                 parse: Callable[[bytes], Message]) -> PastVersion:
    """From the newest history row at or before the revision (`(data, etag_before)`, data None for a
    deletion), or — without one — the `etag_before` of the oldest kept row: "" means the resource was
    created after the revision (so it did not exist then); anything else means older rows were pruned."""
    if row is not None:
        data = row[0]
        return PastVersion(True, parse(bytes(data)) if data is not None else None)
    if oldest_etag_before == "":
        return PastVersion(True, None)
    return PastVersion(False)
