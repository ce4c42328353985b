"""Fleet status that cannot be spoofed (SPEC §8): bookkeeping per stream under a node ID. Pure checks of
the bookkeeping, then a real proxy node and a spoofing raw ADS stream with the same node ID under
`--insecure`: the real node stays connected and SYNCED whatever the spoofer does."""

from __future__ import annotations

import grpc
from mtlsgate.v1 import api_pb2

from control_plane.xds.fleet import Fleet, StreamRecord
from control_plane.xds.protocol import StreamProtocol
from tests.support import free_port, wait_until
from tests.xds.fleet_config import certificate, listener, trust_config
from tests.xds.raw_ads import RawAds

LISTENER = "type.googleapis.com/mtlsgate.v1.Listener"


def _stream(stream_id: int, *, identity: str = "", since: float = 1.0, cluster: str = "real") -> StreamRecord:
    return StreamRecord(stream_id, cluster, {}, f"peer-{stream_id}", since, StreamProtocol(), identity=identity)


def test_one_stream_closing_never_disconnects_another() -> None:
    fleet = Fleet()
    fleet.connect("n", _stream(1, since=1.0))
    fleet.connect("n", _stream(2, since=2.0, cluster="spoof"))  # a reconnect, or a spoofer
    assert fleet.disconnect("n", 2) is False  # the node still has stream 1
    [status] = fleet.list()
    assert status.connected and status.cluster == "real" and status.streams == 1
    assert fleet.disconnect("n", 1) is True
    assert not fleet.list()[0].connected
    assert fleet.disconnect("n", 1) is False  # twice is harmless


def test_connected_count_and_forgetting_follow_streams_as_they_come_and_go(monkeypatch) -> None:
    """Kept incrementally (a connect is O(1) at 10,000 nodes): the count of nodes with a stream, and the
    oldest disconnected nodes forgotten beyond the cap — never a connected one."""
    monkeypatch.setattr("control_plane.xds.fleet.MAX_DISCONNECTED", 2)
    fleet = Fleet()
    for i, node in enumerate("abcd"):
        fleet.connect(node, _stream(i))
    fleet.connect("a", _stream(9))  # a second stream of the same node is not a second node
    assert fleet.connected_count() == 4
    fleet.disconnect("b", 1, now=10.0)
    fleet.disconnect("a", 0, now=11.0)
    assert fleet.connected_count() == 4 - 1  # a still has stream 9
    fleet.disconnect("a", 9, now=12.0)
    fleet.disconnect("c", 2, now=13.0)  # three gone, cap 2: the oldest (b) is forgotten
    assert sorted(fleet.nodes) == ["a", "c", "d"] and fleet.connected_count() == 1
    fleet.connect("a", _stream(20))  # back: no longer a candidate for forgetting
    fleet.disconnect("d", 3, now=14.0)
    fleet.disconnect("d", 3, now=15.0)  # twice is harmless
    assert sorted(fleet.nodes) == ["a", "c", "d"] and fleet.connected_count() == 1
    assert [s.id for s in fleet.list() if s.connected] == ["a"]
    assert {s.id: s.connected for s in fleet.list()} == {"a": True, "c": False, "d": False}
    assert [fleet.connected_count()] == [sum(s.connected for s in fleet.list())]


def test_the_primary_stream_is_authenticated_then_most_recently_acked() -> None:
    fleet = Fleet()
    fleet.connect("n", _stream(1, identity="spiffe://x/node/n", since=5.0, cluster="authenticated"))
    fleet.connect("n", _stream(2, since=1.0, cluster="anonymous"))
    fleet.record_ack("n", 2, LISTENER, 1, 0.0, 10.0)  # the anonymous one ACKs, the other does not
    assert fleet.list()[0].cluster == "authenticated"
    fleet.disconnect("n", 1)
    assert fleet.list()[0].cluster == "anonymous"
    fleet.disconnect("n", 2)
    # Once all are gone, status shows the authenticated stream's last state, not the anonymous one's.
    assert fleet.list()[0].cluster == "authenticated" and not fleet.list()[0].connected

    fleet = Fleet()
    fleet.connect("m", _stream(1, since=1.0, cluster="old"))
    fleet.connect("m", _stream(2, since=2.0, cluster="new"))
    assert fleet.list()[0].cluster == "old"  # oldest first while nobody has ACKed
    fleet.record_ack("m", 2, LISTENER, 1, 0.0, 3.0)
    assert fleet.list()[0].cluster == "new"  # a reconnect takes over once it has ACKed


def test_a_spoofer_with_the_same_node_id_cannot_change_the_real_nodes_status(control_plane, api, start_node,
                                                                             demo_pki) -> None:
    api.put(trust_config(demo_pki))
    api.put(certificate(demo_pki))
    port = free_port()
    api.put(listener("listeners/a", port, policy=""))
    start_node("real", "edge", {"zone": "a"})

    def real_is_fine() -> bool:
        node = api.nodes().get("real")
        return node is not None and node.connected and node.state == api_pb2.SYNCED and node.cluster == "edge"

    wait_until(real_is_fine, timeout=20, message="the real node SYNCED")
    spoofer = RawAds(grpc.insecure_channel(control_plane.address), "real", {"zone": "elsewhere"})
    try:
        spoofer.send(LISTENER)
        first = spoofer.recv()
        spoofer.send(LISTENER, version="", nonce=first.nonce, error="spoofed NACK")
        wait_until(lambda: api.nodes()["real"].streams == 2, timeout=10, message="both streams counted")
        assert real_is_fine()
        # A write reaches the real node; the spoofer never ACKs it.
        api.put(listener("listeners/a", port, policy="", backend="127.0.0.1:10"))
        wait_until(lambda: real_is_fine() and api.nodes()["real"].types[0].acked_version != first.version_info,
                   timeout=10, message="the real node SYNCED on the new version")
    finally:
        spoofer.close()
    wait_until(lambda: api.nodes()["real"].streams == 1, timeout=10, message="the spoofer's stream gone")
    assert real_is_fine()
