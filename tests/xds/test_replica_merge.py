"""Which replica's view of a node `status` shows (control_plane/xds/replicas.py, pure): live replicas win,
a dead replica's nodes are shown as moving and then as disconnected, and neither a forged heartbeat, a
row naming another node, nor an unauthenticated stream on another replica speaks for a node."""

from __future__ import annotations

from mtlsgate.v1 import api_pb2

from control_plane.store.base import FleetRead, FleetRow, ReplicaRow
from control_plane.xds.replicas import (
    FUTURE_TOLERANCE,
    MOVING_FOR,
    STALE_AFTER,
    PublishedNode,
    RemoteFleet,
    alive,
    forgotten,
    merge,
    replica_statuses,
)

NOW = 1_000_000.0


def node(node_id: str, *, connected: bool = True, state: int = api_pb2.SYNCED, identity: str = "",
         acked_at: float = 0.0, since: float = NOW - 100, streams: int = 1) -> api_pb2.NodeStatus:
    status = api_pb2.NodeStatus(id=node_id, connected=connected, state=state, identity=identity, cluster="edge",
                                streams=streams if connected else 0)
    status.connected_since.FromNanoseconds(int(since * 1e9))
    entry = status.types.add(type_url="type.googleapis.com/mtlsgate.v1.Listener", state=state, acked_version="v1")
    if acked_at:
        entry.last_ack_time.FromNanoseconds(int(acked_at * 1e9))
    return status


def replica(replica_id: str, heartbeat_at: float = NOW, stopped: bool = False) -> ReplicaRow:
    return ReplicaRow(replica_id, f"name-{replica_id}", NOW - 500, heartbeat_at, stopped)


def row(replica_id: str, status: api_pb2.NodeStatus, node_id: str = "") -> PublishedNode:
    return PublishedNode(replica_id, node_id or status.id, 1, status)


def one(statuses: list[api_pb2.NodeStatus]) -> api_pb2.NodeStatus:
    assert len(statuses) == 1, statuses
    return statuses[0]


def test_alive_means_a_fresh_heartbeat_by_the_databases_clock_and_not_stopped() -> None:
    assert alive(replica("b", NOW - STALE_AFTER + 0.1), NOW)
    assert not alive(replica("b", NOW - STALE_AFTER), NOW)
    assert not alive(replica("b", NOW, stopped=True), NOW)
    assert not alive(None, NOW)
    # A heartbeat from the future was not stamped by the database's clock: forged or corrupt, never alive.
    assert alive(replica("b", NOW + FUTURE_TOLERANCE - 0.1), NOW)
    assert not alive(replica("b", NOW + 3600), NOW)
    assert forgotten([replica("old", NOW - 7200), replica("future", NOW + 7200), replica("b")], NOW) == [
        "old", "future"]


def test_the_local_view_and_other_live_replicas_nodes_make_the_whole_fleet() -> None:
    merged = merge("a", [node("n1")], [row("b", node("n2"))], {"b": replica("b")}, NOW)
    assert [(s.id, s.replica, s.connected, s.moving) for s in merged] == [("n1", "a", True, False),
                                                                           ("n2", "b", True, False)]


def test_a_dead_replicas_nodes_are_moving_then_disconnected_and_moved_once_they_reconnect() -> None:
    dead = {"b": replica("b", NOW - STALE_AFTER - 1)}
    moving = one(merge("a", [], [row("b", node("n2"))], dead, NOW))
    assert (moving.connected, moving.moving, moving.replica, moving.streams) == (False, True, "b", 0)
    assert moving.state == api_pb2.SYNCED  # what it last had, for the operator
    lost = one(merge("a", [], [row("b", node("n2"))], {"b": replica("b", NOW - MOVING_FOR - 1)}, NOW))
    assert (lost.connected, lost.moving) == (False, False)
    stopped = one(merge("a", [], [row("b", node("n2"))], {"b": replica("b", NOW, stopped=True)}, NOW))
    assert stopped.moving  # a clean stop: moving at once, not after STALE_AFTER
    # Reconnected here: the dead replica's row (still saying connected) loses to the live view.
    moved = one(merge("a", [node("n2", since=NOW - 1)], [row("b", node("n2", acked_at=NOW - 2))], dead, NOW))
    assert (moved.connected, moved.moving, moved.replica) == (True, False, "a")


def test_a_live_replicas_disconnected_view_never_hides_another_live_replica_holding_the_node() -> None:
    merged = one(merge("a", [node("n1", connected=False)], [row("b", node("n1"))], {"b": replica("b")}, NOW))
    assert (merged.connected, merged.replica) == (True, "b")
    # Held on two live replicas at once (a reconnect overlapping): both streams counted.
    both = one(merge("a", [node("n1", since=NOW - 1)], [row("b", node("n1", acked_at=NOW - 5))],
                     {"b": replica("b")}, NOW))
    assert (both.replica, both.streams) == ("a", 2)


def test_a_node_that_failed_over_is_shown_on_its_new_replica_while_the_old_one_still_looks_alive() -> None:
    # Killed replica b's last row still says connected and SYNCED (with ACKs), and b is not yet 5 s silent.
    # The node's new stream here is SYNCED without any push (it re-sent its versions): it wins at once.
    old = node("n1", acked_at=NOW - 10, since=NOW - 100)
    new = node("n1", since=NOW - 0.5)
    for local, remote, where in (([new], old, "a"), ([old], new, "b")):
        shown = one(merge("a", local, [row("b", remote)], {"b": replica("b", NOW - 2)}, NOW))
        assert (shown.replica, shown.connected) == (where, True)
    # A newer stream that is not SYNCED (a spoofer that never ACKs) does not win over a SYNCED one.
    spoof = node("n1", since=NOW - 0.5, state=api_pb2.STALE)
    assert one(merge("a", [old], [row("b", spoof)], {"b": replica("b")}, NOW)).replica == "a"


def test_a_forged_or_stale_heartbeat_row_does_not_make_a_node_connected() -> None:
    for forged, moving in ((replica("x", NOW + 3600), False), (replica("x", NOW - 30), True)):
        shown = one(merge("a", [], [row("x", node("n1", identity="spiffe://corp/node/n1"))], {"x": forged}, NOW))
        assert (shown.connected, shown.streams, shown.moving) == (False, 0, moving)
    # A row from a replica that has no heartbeat row at all.
    assert not one(merge("a", [], [row("ghost", node("n1"))], {}, NOW)).connected


def test_a_row_can_only_describe_the_node_it_is_stored_under() -> None:
    assert merge("a", [], [row("b", node("victim"), node_id="n2")], {"b": replica("b")}, NOW) == []


def test_an_unauthenticated_stream_on_another_replica_never_speaks_for_an_authenticated_node() -> None:
    real = node("n1", identity="spiffe://corp/node/n1", acked_at=NOW - 30)
    spoof = node("n1", identity="", acked_at=NOW - 0.1, state=api_pb2.ERROR)
    for local, remote in (([real], spoof), ([spoof], real)):
        shown = one(merge("a", local, [row("b", remote)], {"b": replica("b")}, NOW))
        assert shown.identity == "spiffe://corp/node/n1" and shown.state == api_pb2.SYNCED


def test_rows_this_replica_published_in_an_earlier_life_are_ignored() -> None:
    assert merge("a", [], [row("a", node("n1"))], {"a": replica("a")}, NOW) == []


def test_replica_statuses_count_the_nodes_each_holds() -> None:
    merged = merge("a", [node("n1")], [row("b", node("n2")), row("c", node("n3"))],
                   {"b": replica("b"), "c": replica("c", NOW - 20)}, NOW)
    statuses = replica_statuses(replica("a"), {"b": replica("b"), "c": replica("c", NOW - 20)}, merged, NOW)
    assert [(r.id, r.alive, r.nodes) for r in statuses] == [("a", True, 1), ("b", True, 1), ("c", False, 0)]
    assert statuses[2].heartbeat_age_seconds == 20


def test_the_remote_fleet_applies_incremental_reads_tombstones_and_forgotten_replicas() -> None:
    remote = RemoteFleet()
    b = ReplicaRow("b", "b", NOW, NOW, generation=2)
    first = FleetRead(NOW, (b,), (FleetRow("b", "n1", 1, node("n1").SerializeToString()),
                                  FleetRow("b", "n2", 2, node("n2").SerializeToString()),
                                  FleetRow("b", "junk", 2, b"\xff\xff\xff")), {"b": 2})
    assert remote.apply_read(first)
    assert sorted(r.node_id for r in remote.published()) == ["n1", "n2"] and remote.unreadable == 1
    assert remote.known() == {"b": 2}
    # A heartbeat alone is not a change; a re-read of a row already held is ignored.
    again = FleetRead(NOW + 1, (ReplicaRow("b", "b", NOW, NOW + 1, generation=2),),
                      (FleetRow("b", "n1", 1, node("n1", connected=False).SerializeToString()),), {})
    assert not remote.apply_read(again)
    assert all(r.status is not None and r.status.connected for r in remote.published())
    tomb = FleetRead(NOW + 2, (ReplicaRow("b", "b", NOW, NOW + 2, generation=3),), (FleetRow("b", "n1", 3, b""),),
                     {"b": 3})
    assert remote.apply_read(tomb) and [r.node_id for r in remote.published()] == ["n2"]
    assert remote.apply_read(FleetRead(NOW + 3, (), (), {}))  # b forgotten: its rows go with it
    assert remote.published() == [] and remote.known() == {}
