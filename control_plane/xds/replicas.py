"""The fleet across control-plane replicas (SPEC §14): which replicas are alive, and which replica's view of
each node `status` shows. Pure decisions over what the replicas published to the store's fleet table (their
heartbeats and their nodes' statuses) and this replica's own live view; the fleet-sync task does the I/O.

Every time here is the database's clock (the heartbeat is stamped by the database, and the reader learns
the database's "now" with every read), so replicas with skewed clocks still agree on who is alive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mtlsgate.v1 import api_pb2

from control_plane.store.base import FleetRead, FleetRow, ReplicaRow

HEARTBEAT_INTERVAL = 1.0  # seconds between a replica's heartbeats (and its reads of the others)
STALE_AFTER = 5.0  # a replica silent this long is dead: its nodes show as moving (SPEC: within 10 s)
MOVING_FOR = 60.0  # a dead replica's connected nodes show as moving this long, then as disconnected
FORGET_AFTER = 3600.0  # a replica silent this long is deleted from the fleet table, with its nodes
FUTURE_TOLERANCE = 2.0  # a heartbeat further ahead of the database's clock is forged or corrupt: dead
MAX_ROWS = 200_000  # rows read from the fleet table per read (bounded memory whatever the table holds)


@dataclass(frozen=True)
class PublishedNode:
    """A node's status as one replica published it."""

    replica: str
    node_id: str
    seq: int  # the publishing replica's generation when it wrote this row
    status: api_pb2.NodeStatus | None  # None: the replica forgot the node (tombstone)


def alive(replica: ReplicaRow | None, now: float, stale_after: float = STALE_AFTER) -> bool:
    """Heartbeating: not stopped, and the last heartbeat neither older than `stale_after` nor in the
    future (a heartbeat from the future cannot have come from the database's clock)."""
    if replica is None or replica.stopped:
        return False
    age = now - replica.heartbeat_at
    return -FUTURE_TOLERANCE <= age < stale_after


def silent_for(replica: ReplicaRow, now: float) -> float:
    """Seconds since the replica's last heartbeat; forever for one from the future (see `alive`)."""
    if replica.heartbeat_at - now > FUTURE_TOLERANCE:
        return float("inf")
    return max(0.0, now - replica.heartbeat_at)


def forgotten(replicas: Iterable[ReplicaRow], now: float, forget_after: float = FORGET_AFTER) -> list[str]:
    """Replicas to delete from the fleet table: silent for longer than `forget_after`, or with a heartbeat
    from the future beyond tolerance (they would otherwise never expire)."""
    return [r.id for r in replicas
            if now - r.heartbeat_at >= forget_after or r.heartbeat_at - now > forget_after]


def _rank(status: api_pb2.NodeStatus) -> tuple[bool, bool, float]:
    """Across replicas: authenticated first (an unauthenticated stream on another replica never speaks for
    an authenticated node), then SYNCED, then the newest stream. A node that failed over holds its new
    stream SYNCED (it re-sent the versions it has) while the replica it left may still look alive and
    report the old stream for up to STALE_AFTER: the new one is the truth. (Within one replica the rule is
    the per-stream one of xds/fleet.py.)"""
    return (bool(status.identity), status.state == api_pb2.SYNCED, status.connected_since.ToNanoseconds() / 1e9)


@dataclass
class _Candidate:
    status: api_pb2.NodeStatus
    replica: str
    live: bool
    silent: float  # seconds since the holding replica's last heartbeat (0 for a live one)


def merge(local_replica: str, local: Iterable[api_pb2.NodeStatus], published: Iterable[PublishedNode],
          replicas: Mapping[str, ReplicaRow], now: float, *, stale_after: float = STALE_AFTER,
          moving_for: float = MOVING_FOR) -> list[api_pb2.NodeStatus]:
    """One status per node ID across the fleet, sorted by ID.

    This replica's own view (`local`, live by definition) and every other replica's published rows are
    candidates. A node connected to any live replica is shown from the best such view (`_rank`), with
    `streams` summed over the live replicas holding it. A node connected only to dead replicas is shown
    as `moving` (connected = false) for `moving_for` seconds after its replica fell silent, then as
    disconnected. Otherwise the best disconnected view, live replicas first. Rows this replica published
    itself (from an earlier life with the same id) are ignored: its memory is the truth. Rows whose status
    names another node than their key are ignored."""
    candidates: dict[str, list[_Candidate]] = {}
    for status in local:
        candidates.setdefault(status.id, []).append(_Candidate(status, local_replica, True, 0.0))
    for row in published:
        if row.replica == local_replica or row.status is None or row.status.id != row.node_id:
            continue
        record = replicas.get(row.replica)
        live = alive(record, now, stale_after)
        silent = silent_for(record, now) if record is not None else float("inf")
        candidates.setdefault(row.node_id, []).append(_Candidate(row.status, row.replica, live, silent))
    out = []
    for node_id in sorted(candidates):
        out.append(_decide(candidates[node_id], moving_for))
    return out


def _decide(candidates: list[_Candidate], moving_for: float) -> api_pb2.NodeStatus:
    def best(group: list[_Candidate]) -> _Candidate:
        return max(group, key=lambda c: _rank(c.status))

    holding = [c for c in candidates if c.live and c.status.connected]
    if holding:
        chosen = best(holding)
        out = _copy(chosen.status, chosen.replica)
        out.streams = sum(c.status.streams for c in holding)
        return out
    orphaned = [c for c in candidates if not c.live and c.status.connected]
    if orphaned:
        chosen = best(orphaned)
        out = _copy(chosen.status, chosen.replica)
        out.connected, out.streams = False, 0
        out.moving = chosen.silent < moving_for
        return out
    live = [c for c in candidates if c.live]
    chosen = best(live or candidates)
    out = _copy(chosen.status, chosen.replica)
    out.streams = 0
    return out


def _copy(status: api_pb2.NodeStatus, replica: str) -> api_pb2.NodeStatus:
    out = api_pb2.NodeStatus()
    out.CopyFrom(status)
    out.replica = replica
    out.moving = False
    return out


def replica_statuses(local: ReplicaRow, replicas: Mapping[str, ReplicaRow],
                     nodes: Iterable[api_pb2.NodeStatus], now: float,
                     stale_after: float = STALE_AFTER) -> list[api_pb2.ReplicaStatus]:
    """Every known replica (this one first), with the number of connected nodes each holds in `nodes`."""
    held: dict[str, int] = {}
    for node in nodes:
        if node.connected:
            held[node.replica] = held.get(node.replica, 0) + 1
    known = {**replicas, local.id: local}
    order = [local.id, *sorted((i for i in known if i != local.id), key=lambda i: (known[i].name, i))]
    out = []
    for replica_id in order:
        record = known[replica_id]
        is_alive = replica_id == local.id or alive(record, now, stale_after)
        out.append(api_pb2.ReplicaStatus(
            id=record.id, name=record.name, alive=is_alive, stopped=record.stopped, nodes=held.get(record.id, 0),
            heartbeat_age_seconds=0.0 if replica_id == local.id else round(now - record.heartbeat_at, 3)))
    return out


def parse_row(row: FleetRow) -> PublishedNode | None:
    """A published row as a status (None: unreadable, e.g. written by a newer or broken replica)."""
    if not row.status:
        return PublishedNode(row.replica, row.node_id, row.seq, None)
    status = api_pb2.NodeStatus()
    try:
        status.ParseFromString(row.status)
    except Exception:  # protobuf's DecodeError; any garbage must only cost this row
        return None
    return PublishedNode(row.replica, row.node_id, row.seq, status)


@dataclass
class RemoteFleet:
    """What this replica knows of the other replicas: their records and their latest published rows.
    Fed by reads of the fleet table (`apply_read`), which only return rows newer than `known()`."""

    replicas: dict[str, ReplicaRow] = field(default_factory=dict)
    rows: dict[tuple[str, str], PublishedNode] = field(default_factory=dict)
    unreadable: int = 0  # rows skipped because their status did not parse
    _seen: dict[str, int] = field(default_factory=dict)  # replica id → newest generation read

    def known(self) -> dict[str, int]:
        """Replica id → the generation this replica has read up to (what the next read starts after)."""
        return dict(self._seen)

    def apply_read(self, read: FleetRead) -> bool:
        """Take one read. Returns whether anything `status` shows may have changed (rows, or the set of
        replicas and their names or clean stops; heartbeats alone do not count: `alive` decides that)."""
        identity = {r.id: (r.name, r.stopped) for r in self.replicas.values()}
        self.replicas = {r.id: r for r in read.replicas}
        changed = identity != {r.id: (r.name, r.stopped) for r in self.replicas.values()}
        for raw in read.rows:
            row = parse_row(raw)
            if row is None:
                self.unreadable += 1
                continue
            if row.replica not in self.replicas:
                continue
            key = (row.replica, row.node_id)
            current = self.rows.get(key)
            if current is not None and current.seq >= row.seq:
                continue  # already known (a re-read after a read cut short)
            if row.status is None:
                changed |= self.rows.pop(key, None) is not None
            else:
                self.rows[key] = row
                changed = True
        for replica_id, generation in read.generations.items():
            self._seen[replica_id] = max(self._seen.get(replica_id, 0), generation)
        # A replica deleted from the table (forgotten) takes its rows with it.
        gone = [key for key in self.rows if key[0] not in self.replicas]
        for key in gone:
            del self.rows[key]
        for replica_id in [r for r in self._seen if r not in self.replicas]:
            del self._seen[replica_id]
        return changed or bool(gone)

    def published(self) -> list[PublishedNode]:
        return list(self.rows.values())

    def alive_ids(self, now: float, stale_after: float = STALE_AFTER) -> frozenset[str]:
        return frozenset(r.id for r in self.replicas.values() if alive(r, now, stale_after))
