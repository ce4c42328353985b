"""Fleet status: what the control plane knows about every node's xDS stream, and the sync state per type.

States follow istioctl proxy-status: NOT_SENT (nothing sent for the type), STALE (sent, not yet
acknowledged), SYNCED (the last thing sent was ACKed), ERROR (the last thing sent was NACKed). A node's
overall state is the worst of its types (ERROR > STALE > SYNCED > NOT_SENT). Pure bookkeeping: the ADS
glue feeds it events, the FleetService and metrics read it.

Bookkeeping is per stream under a node ID (SPEC §8): a reconnecting node briefly has two streams, and under
`--insecure` anyone can open a stream with any node ID. A node is connected while any of its streams is;
its status is its primary stream's: authenticated streams before unauthenticated ones, then the one that
ACKed most recently, then the oldest. So a stream closing or misbehaving never clears another one's
state, and an unauthenticated stream never speaks for an authenticated node.
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
class StreamRecord:
    """One xDS stream of a node, as admitted."""

    stream_id: int
    cluster: str
    labels: Mapping[str, str]
    peer: str
    connected_since: float
    protocol: StreamProtocol
    identity: str = ""  # authenticated identity; "" = unauthenticated (only under --insecure)
    registered: bool = False  # cluster and labels came from the Node resource
    mismatch: str = ""  # what node.metadata / node.cluster declared against the Node resource
    timings: dict[str, TypeTiming] = field(default_factory=dict)
    nacks: dict[str, list[NackEntry]] = field(default_factory=dict)
    last_ack_time: float = 0.0

    def rank(self) -> tuple[bool, float, float]:
        return (bool(self.identity), self.last_ack_time, -self.connected_since)


@dataclass
class NodeRecord:
    """Every stream under one node ID, and the last primary stream once none is open (for `status`)."""

    id: str
    streams: dict[int, StreamRecord] = field(default_factory=dict)
    last: StreamRecord | None = None
    disconnected_at: float = 0.0

    @property
    def connected(self) -> bool:
        return bool(self.streams)

    def primary(self) -> StreamRecord | None:
        if self.streams:
            return max(self.streams.values(), key=StreamRecord.rank)
        return self.last

    def to_proto(self, desired: Mapping[str, str] | None = None) -> api_pb2.NodeStatus:
        """`desired`: version per type of the node's current snapshot (see `type_state`)."""
        stream = self.primary()
        assert stream is not None
        out = api_pb2.NodeStatus(id=self.id, cluster=stream.cluster, labels=dict(stream.labels),
                                 connected=self.connected, peer=stream.peer, registered=stream.registered,
                                 identity=stream.identity, streams=len(self.streams),
                                 metadata_mismatch=stream.mismatch)
        out.connected_since.CopyFrom(_timestamp(stream.connected_since))
        states = []
        latest_revision = max((t.acked_revision for t in stream.timings.values()), default=0)
        worst_convergence = 0.0
        for type_url in rt.ALL_TYPES:
            ts = stream.protocol.types.get(type_url)
            wanted = (desired or {}).get(type_url, "") if ts is not None and ts.subscribed else ""
            state = type_state(ts, wanted)
            states.append(state)
            timing = stream.timings.get(type_url, TypeTiming())
            entry = out.types.add(type_url=type_url, state=state, desired_version=wanted)
            for nack in stream.nacks.get(type_url, ()):
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
    """Every node seen, by node ID, with its streams. `changed` collects the IDs whose status may have
    changed since the last `drain_changed()` (what a replica publishes to the shared fleet table)."""

    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)
    # Nodes with no open stream, oldest disconnection first, and how many have one: kept as streams come
    # and go, so a connection costs O(1) however large the fleet (a 10,000-node reconnect storm spent a
    # third of the control plane's CPU counting and trimming the whole table on every connect).
    _gone: dict[str, None] = field(default_factory=dict)
    _connected: int = 0

    def touch(self, node_id: str) -> None:
        if node_id:
            self.changed.add(node_id)

    def touch_all(self) -> None:
        self.changed.update(self.nodes)

    def drain_changed(self) -> set[str]:
        changed, self.changed = self.changed, set()
        return changed

    def connect(self, node_id: str, stream: StreamRecord) -> None:
        record = self.nodes.setdefault(node_id, NodeRecord(node_id))
        if not record.streams:
            self._connected += 1
            self._gone.pop(node_id, None)
        record.streams[stream.stream_id] = stream
        self.changed.add(node_id)

    def disconnect(self, node_id: str, stream_id: int, now: float | None = None) -> bool:
        """Forget one stream; True when that left the node without any open stream."""
        record = self.nodes.get(node_id)
        if record is None or stream_id not in record.streams:
            return False
        closing = record.streams.pop(stream_id)
        self.changed.add(node_id)
        # What `status` shows once the node has no stream: the last authenticated state if there was one
        # (an unauthenticated stream that outlived it must not overwrite it).
        if record.last is None or closing.identity or not record.last.identity:
            record.last = closing
        if record.streams:
            return False
        record.disconnected_at = now if now is not None else time.time()
        self._connected -= 1
        self._gone[node_id] = None
        self._trim()
        return True

    def stream(self, node_id: str, stream_id: int) -> StreamRecord | None:
        record = self.nodes.get(node_id)
        return record.streams.get(stream_id) if record is not None else None

    def record_ack(self, node_id: str, stream_id: int, type_url: str, revision: int, written_at: float,
                   now: float) -> float | None:
        """Record an ACK on one stream; returns the convergence time (store write → this ACK), or None
        when the write happened before the stream connected (its first sync measures start-up)."""
        stream = self.stream(node_id, stream_id)
        if stream is None:
            return None
        convergence = max(0.0, now - written_at) if written_at >= stream.connected_since else None
        stream.timings[type_url] = TypeTiming(now, convergence or 0.0, revision)
        stream.last_ack_time = now
        self.changed.add(node_id)
        return convergence

    def record_nack(self, node_id: str, stream_id: int, type_url: str, version: str, error: str,
                    now: float) -> None:
        stream = self.stream(node_id, stream_id)
        if stream is None:
            return
        history = stream.nacks.setdefault(type_url, [])
        history.append(NackEntry(version, error, now))
        del history[:-MAX_NACK_HISTORY]
        self.changed.add(node_id)

    def connected_count(self) -> int:
        return self._connected

    def status(self, node_id: str,
               desired: Callable[[str, Mapping[str, str]], Mapping[str, str]] | None = None) -> api_pb2.NodeStatus | None:
        """One node's status (None: not known, or forgotten)."""
        record = self.nodes.get(node_id)
        stream = record.primary() if record is not None else None
        if record is None or stream is None:
            return None
        return record.to_proto(desired(record.id, stream.labels) if desired and record.connected else None)

    def list(self, cluster: str = "",
             desired: Callable[[str, Mapping[str, str]], Mapping[str, str]] | None = None) -> list[api_pb2.NodeStatus]:
        """`desired(node_id, labels)`: the versions of the node's current snapshot (a roll-out may hold a
        node at an older revision than its labels' group)."""
        out = []
        for _, record in sorted(self.nodes.items()):
            stream = record.primary()
            if stream is None:
                continue
            status = record.to_proto(desired(record.id, stream.labels) if desired and record.connected else None)
            if not cluster or status.cluster == cluster:
                out.append(status)
        return out

    def _trim(self) -> None:
        while len(self._gone) > MAX_DISCONNECTED:
            oldest = next(iter(self._gone))
            del self._gone[oldest]
            del self.nodes[oldest]
            self.changed.add(oldest)  # published as forgotten
