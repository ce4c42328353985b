"""Has the fleet converged? Pure decisions over FleetService reports, for scripts that gate on the fleet:
`mtlsgate status` (exit 1 while a node is ERROR or STALE, `--wait-synced`) and `mtlsgate apply --wait`
(every node the change targets has ACKed the new version, or NACKed it, or time ran out)."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2

Versions = Mapping[str, str]  # type URL → version


class Progress(enum.Enum):
    CONVERGED = "converged"  # acked every desired version
    PENDING = "pending"  # sent or about to be sent, no answer yet
    REJECTED = "rejected"  # NACKed the version it should take


@dataclass(frozen=True)
class NodeProgress:
    node_id: str
    progress: Progress
    detail: str = ""  # the NACK text (REJECTED) or the types still waiting (PENDING)


def settled(report: api_pb2.ListNodesResponse) -> bool:
    """The snapshots include every store write (no write waiting in the debounce)."""
    return report.revision >= report.store_revision


def acked_versions(report: api_pb2.ListNodesResponse) -> dict[str, dict[str, str]]:
    """Node id → the versions it had acknowledged, per type: the baseline `targeted` compares with."""
    return {n.id: {t.type_url: t.acked_version for t in n.types} for n in report.nodes}


def node_progress(node: api_pb2.NodeStatus) -> NodeProgress:
    rejected, pending = [], []
    for entry in node.types:
        if not entry.desired_version or entry.acked_version == entry.desired_version:
            continue
        nacked = entry.nack_history[-1] if entry.nack_history else None
        if entry.state == api_pb2.ERROR and nacked is not None and nacked.version == entry.desired_version:
            rejected.append(f"{rt.short_type(entry.type_url)}: {' '.join(entry.error.split())}")
        else:
            pending.append(rt.short_type(entry.type_url))
    if rejected:
        return NodeProgress(node.id, Progress.REJECTED, "; ".join(rejected))
    if pending:
        return NodeProgress(node.id, Progress.PENDING, ", ".join(pending))
    return NodeProgress(node.id, Progress.CONVERGED)


def targeted(report: api_pb2.ListNodesResponse, before: Mapping[str, Versions]) -> list[api_pb2.NodeStatus]:
    """The connected nodes a change affects: their current snapshot differs from what they had acked
    before it (a node that connected since is targeted: it has everything to take)."""
    out = []
    for node in report.nodes:
        if not node.connected:
            continue
        old = before.get(node.id)
        if old is None or any(t.desired_version and t.desired_version != old.get(t.type_url, "")
                              for t in node.types):
            out.append(node)
    return out


@dataclass(frozen=True)
class WaitOutcome:
    done: bool  # nothing left to wait for
    nodes: tuple[NodeProgress, ...]

    @property
    def failed(self) -> list[NodeProgress]:
        return [n for n in self.nodes if n.progress is not Progress.CONVERGED]


def apply_outcome(report: api_pb2.ListNodesResponse, target_ids: Iterable[str]) -> WaitOutcome:
    """How far the targeted nodes are; done when none is pending (a NACK is final for that version; a
    target that disconnected counts as pending: it did not ACK)."""
    by_id = {n.id: n for n in report.nodes}
    nodes = []
    for node_id in sorted(target_ids):
        node = by_id.get(node_id)
        if node is None or not node.connected:
            nodes.append(NodeProgress(node_id, Progress.PENDING, "disconnected"))
        else:
            nodes.append(node_progress(node))
    return WaitOutcome(settled(report) and all(n.progress is not Progress.PENDING for n in nodes), tuple(nodes))


def unhealthy(report: api_pb2.ListNodesResponse) -> list[tuple[str, str]]:
    """(node id, state) of every connected node that is ERROR or STALE, and of every node moving off a
    dead replica (SPEC §14; shown as MOVING): what makes `status` exit 1."""
    bad = (api_pb2.ERROR, api_pb2.STALE)
    return [(n.id, "MOVING" if n.moving else api_pb2.SyncState.Name(n.state)) for n in report.nodes
            if n.moving or (n.connected and n.state in bad)]


def all_synced(report: api_pb2.ListNodesResponse) -> bool:
    """`status --wait-synced`: the snapshots hold every write and every connected node has acked them."""
    return settled(report) and not unhealthy(report) and all(
        node_progress(n).progress is Progress.CONVERGED for n in report.nodes if n.connected)


def parse_duration(text: Any) -> float:
    """`30`, `30s`, `500ms`, `1.5m`: seconds, or a number with one unit; ValueError otherwise."""
    value = str(text).strip().lower()
    factor = 1.0
    if value.endswith("ms"):
        value, factor = value[:-2], 0.001
    elif value.endswith("s"):
        value = value[:-1]
    elif value.endswith("m"):
        value, factor = value[:-1], 60.0
    seconds = float(value) * factor
    if not 0 < seconds <= 86_400:
        raise ValueError(text)
    return seconds
