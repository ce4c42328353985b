"""Pure fleet-gating decisions (control_plane/convergence.py) on hand-built FleetService reports."""

from __future__ import annotations

import pytest
from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2

from control_plane.convergence import (
    Progress,
    acked_versions,
    all_synced,
    apply_outcome,
    node_progress,
    parse_duration,
    settled,
    targeted,
    unhealthy,
)

S, E, ST = api_pb2.SYNCED, api_pb2.ERROR, api_pb2.STALE


def node(node_id: str, acked: str, desired: str, state: int = S, *, nack: str = "", connected: bool = True
         ) -> api_pb2.NodeStatus:
    out = api_pb2.NodeStatus(id=node_id, connected=connected, state=state)
    entry = out.types.add(type_url=rt.LISTENER, state=state, acked_version=acked, desired_version=desired)
    if nack:
        entry.error = nack if state == E else ""
        entry.nack_history.add(version=desired, error=nack)
    out.types.add(type_url=rt.TRUST_BUNDLE, state=S, acked_version="b1", desired_version="b1")
    return out


def report(*nodes: api_pb2.NodeStatus, revision: int = 5, store: int = 5) -> api_pb2.ListNodesResponse:
    return api_pb2.ListNodesResponse(nodes=list(nodes), revision=revision, store_revision=store)


def test_progress_of_one_node() -> None:
    assert node_progress(node("a", "v2", "v2")).progress is Progress.CONVERGED
    pending = node_progress(node("a", "v1", "v2", ST))
    assert (pending.progress, pending.detail) == (Progress.PENDING, "Listener")
    # SYNCED on the old version while the new one is not sent yet: still pending
    assert node_progress(node("a", "v1", "v2", S)).progress is Progress.PENDING
    rejected = node_progress(node("a", "v1", "v2", E, nack="port 8443\nin use"))
    assert (rejected.progress, rejected.detail) == (Progress.REJECTED, "Listener: port 8443 in use")
    # a NACK of an older version is not a rejection of the current one
    old = node("a", "v1", "v3", ST)
    old.types[0].nack_history.add(version="v2", error="old")
    assert node_progress(old).progress is Progress.PENDING


def test_targeted_nodes_and_outcome() -> None:
    before = acked_versions(report(node("a", "v1", "v1"), node("b", "v1", "v1"), node("c", "w1", "w1")))
    after = report(node("a", "v2", "v2"), node("b", "v1", "v2", E, nack="port in use"), node("c", "w1", "w1"),
                   node("new", "", "v2", ST), node("gone", "v1", "v2", connected=False))
    assert [n.id for n in targeted(after, before)] == ["a", "b", "new"]
    outcome = apply_outcome(after, ["a", "b", "new"])
    assert not outcome.done and [(n.node_id, n.progress) for n in outcome.failed] == [
        ("b", Progress.REJECTED), ("new", Progress.PENDING)]
    done = apply_outcome(report(node("a", "v2", "v2"), node("b", "v1", "v2", E, nack="x")), ["a", "b"])
    assert done.done and [n.node_id for n in done.failed] == ["b"]
    # a target that disconnected did not ACK
    lost = apply_outcome(report(node("a", "v1", "v2", connected=False)), ["a"])
    assert not lost.done and lost.nodes[0].detail == "disconnected"


def test_nothing_counts_before_the_write_is_in_the_snapshots() -> None:
    behind = report(node("a", "v1", "v1"), revision=4, store=5)
    assert not settled(behind) and not all_synced(behind) and not apply_outcome(behind, ["a"]).done
    assert all_synced(report(node("a", "v1", "v1"), node("off", "v0", "", E, connected=False)))


def test_status_exit_rule() -> None:
    r = report(node("a", "v1", "v1"), node("b", "v1", "v2", E, nack="x"), node("c", "v1", "v2", ST),
               node("d", "v0", "", E, connected=False))
    assert unhealthy(r) == [("b", "ERROR"), ("c", "STALE")]
    assert unhealthy(report(node("a", "v1", "v1"))) == []


@pytest.mark.parametrize(("text", "seconds"), [("30", 30.0), ("30s", 30.0), ("1.5m", 90.0), ("500ms", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "nan", "inf", "2h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
