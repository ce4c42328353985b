"""Fleet status: what the control plane knows about every node's xDS stream, and the sync state per type.

States follow istioctl proxy-status: NOT_SENT (nothing sent for the type), STALE (sent, not yet
acknowledged), SYNCED (the last thing sent was ACKed), ERROR (the last thing sent was NACKed). A node's
overall state is the worst of its types (ERROR > STALE > SYNCED > NOT_SENT). Pure bookkeeping: the ADS
glue feeds it events, the FleetService and metrics read it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2

from control_plane.xds.protocol import StreamProtocol, TypeState

# Disconnected nodes are kept for `status` (connected = false) up to this many, oldest dropped first.
MAX_DISCONNECTED = 10_000
MAX_NACK_HISTORY = 10  # per node and type, most recent kept

_ORDER = {api_pb2.ERROR: 3, api_pb2.STALE: 2, api_pb2.SYNCED: 1, api_pb2.NOT_SENT: 0}


def type_state(ts: TypeState | None, desired_version: str = "") -> int:
    """`desired_version`: the type's version in the node's current snapshot; a SYNCED type whose node
    has not been sent that version yet is STALE (a write the stream has not pushed yet is not synced)."""
    if ts is None or (ts.last_push is None and not ts.acked_version):
        return api_pb2.NOT_SENT
    state = _sent_state(ts)
    if state == api_pb2.SYNCED and desired_version and ts.acked_version != desired_version:
        return api_pb2.STALE
    return state


def _sent_state(ts: TypeState) -> int:
    if ts.last_push is None:
        return api_pb2.SYNCED  # reconnected already holding the current version
    if ts.nacked_version and ts.nacked_version == ts.last_push.version:
        return api_pb2.ERROR
    if ts.acked_nonce == ts.last_push.nonce:
        return api_pb2.SYNCED
    return api_pb2.STALE


def overall_state(states: list[int]) -> int:
    return max(states, key=lambda s: _ORDER[s]) if states else api_pb2.NOT_SENT


def _timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


@dataclass
class TypeTiming:
    last_ack_time: float = 0.0
    convergence_seconds: float = 0.0
    acked_revision: int = 0


@dataclass(frozen=True)
class NackEntry:
    version: str
    error: str
    time: float


@dataclass
class NodeRecord:
    id: str
    cluster: str
    labels: Mapping[str, str]
    peer: str
    connected_since: float
    protocol: StreamProtocol
    stream_id: int
    connected: bool = True
    disconnected_at: float = 0.0
    timings: dict[str, TypeTiming] = field(default_factory=dict)
    nacks: dict[str, list[NackEntry]] = field(default_factory=dict)

    def to_proto(self, desired: Mapping[str, str] | None = None) -> api_pb2.NodeStatus:
        """`desired`: version per type of the node's current snapshot (see `type_state`)."""
        out = api_pb2.NodeStatus(id=self.id, cluster=self.cluster, labels=dict(self.labels),
                                 connected=self.connected, peer=self.peer)
        out.connected_since.CopyFrom(_timestamp(self.connected_since))
        states = []
        latest_revision = max((t.acked_revision for t in self.timings.values()), default=0)
        worst_convergence = 0.0
        for type_url in rt.ALL_TYPES:
            ts = self.protocol.types.get(type_url)
            wanted = (desired or {}).get(type_url, "") if ts is not None and ts.subscribed else ""
            state = type_state(ts, wanted)
            states.append(state)
            timing = self.timings.get(type_url, TypeTiming())
            entry = out.types.add(type_url=type_url, state=state, desired_version=wanted)
            for nack in self.nacks.get(type_url, ()):
                entry.nack_history.add(version=nack.version, error=nack.error).time.CopyFrom(_timestamp(nack.time))
            if ts is not None:
                entry.acked_version = ts.acked_version
                # Only the NACK of what was sent last is current; an older one lives in nack_history.
                entry.error = ts.last_error if state == api_pb2.ERROR else ""
                if ts.last_push is not None:
                    entry.sent_version = ts.last_push.version
                    entry.sent_nonce = ts.last_push.nonce
            if timing.last_ack_time:
                entry.last_ack_time.CopyFrom(_timestamp(timing.last_ack_time))
                entry.convergence_seconds = timing.convergence_seconds
                if timing.acked_revision == latest_revision:
                    worst_convergence = max(worst_convergence, timing.convergence_seconds)
        out.state = overall_state(states)
        out.convergence_seconds = worst_convergence
        return out


@dataclass
class Fleet:
    """Every node seen, by node id. A node id reconnecting replaces its old record."""

    nodes: dict[str, NodeRecord] = field(default_factory=dict)

    def connect(self, record: NodeRecord) -> None:
        self.nodes[record.id] = record
        self._trim()

    def disconnect(self, node_id: str, stream_id: int, now: float | None = None) -> bool:
        """Mark the node disconnected if `stream_id` is still its current stream (a newer stream of the
        same node id must not be marked by the old one ending)."""
        record = self.nodes.get(node_id)
        if record is None or record.stream_id != stream_id:
            return False
        record.connected = False
        record.disconnected_at = now if now is not None else time.time()
        return True

    def record_ack(self, node_id: str, stream_id: int, type_url: str, revision: int, written_at: float,
                   now: float) -> float | None:
        """Record an ACK; returns the convergence time (store write → this ACK), or None when the write
        happened before the node connected (its first sync measures its start-up, not distribution)."""
        record = self.nodes.get(node_id)
        if record is None or record.stream_id != stream_id:
            return None
        convergence = max(0.0, now - written_at) if written_at >= record.connected_since else None
        record.timings[type_url] = TypeTiming(now, convergence or 0.0, revision)
        return convergence

    def record_nack(self, node_id: str, stream_id: int, type_url: str, version: str, error: str,
                    now: float) -> None:
        record = self.nodes.get(node_id)
        if record is None or record.stream_id != stream_id:
            return
        history = record.nacks.setdefault(type_url, [])
        history.append(NackEntry(version, error, now))
        del history[:-MAX_NACK_HISTORY]

    def connected_count(self) -> int:
        return sum(1 for r in self.nodes.values() if r.connected)

    def list(self, cluster: str = "",
             desired: Callable[[Mapping[str, str]], Mapping[str, str]] | None = None) -> list[api_pb2.NodeStatus]:
        """`desired(labels)`: the versions of the current snapshot for a node with these labels."""
        return [r.to_proto(desired(r.labels) if desired and r.connected else None)
                for _, r in sorted(self.nodes.items()) if not cluster or r.cluster == cluster]

    def _trim(self) -> None:
        gone = [r for r in self.nodes.values() if not r.connected]
        if len(gone) > MAX_DISCONNECTED:
            gone.sort(key=lambda r: r.disconnected_at)
            for r in gone[: len(gone) - MAX_DISCONNECTED]:
                del self.nodes[r.id]
