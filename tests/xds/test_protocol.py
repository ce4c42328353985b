"""The server-side xDS stream state machine: ACK, NACK without re-send, stale nonces, later names,
reconnect with the current version, and the fleet states derived from it."""

from __future__ import annotations

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2

from control_plane.store.sqlite import SqliteStore
from control_plane.xds.fleet import overall_state, type_state
from control_plane.xds.protocol import ProtocolError, RequestKind, StreamProtocol
from control_plane.xds.snapshot import SnapshotBuilder
from tests.xds.fleet_config import listener, rotated_crl_pem, trust_config, two_group_store


def req(type_url: str, *, version: str = "", nonce: str = "", names=(), error: str = ""):
    r = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=version, response_nonce=nonce,
                                       resource_names=list(names))
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


@pytest.fixture
def world(demo_pki):
    store = two_group_store(SqliteStore(), demo_pki, (18443, 18444))
    builder = SnapshotBuilder()
    return store, builder, demo_pki


def test_ack_nack_and_no_resend_of_rejected_version(world):
    store, builder, pki = world
    snap = builder.build(store.state()).for_labels({"zone": "a"})
    p = StreamProtocol(snapshot=snap)
    out = p.on_request(req(rt.LISTENER))
    assert out.kind is RequestKind.SUBSCRIBE and out.push is not None
    first = out.push
    assert [a.type_url for a in first.resources] == [rt.LISTENER]
    assert type_state(p.types[rt.LISTENER]) == api_pb2.STALE

    ack = p.on_request(req(rt.LISTENER, version=first.version, nonce=first.nonce))
    assert ack.kind is RequestKind.ACK and ack.push is None and ack.acked_push is first
    assert type_state(p.types[rt.LISTENER]) == api_pb2.SYNCED

    # A listener change → a push; the node NACKs it.
    store.create(listener("listeners/a2", 18445, selector={"zone": "a"}), actor="t")
    snap2 = builder.build(store.state()).for_labels({"zone": "a"})
    (second,) = [x for x in p.on_snapshot(snap2) if x.type_url == rt.LISTENER]
    nack = p.on_request(req(rt.LISTENER, version=first.version, nonce=second.nonce, error="port 18445 in use"))
    assert nack.kind is RequestKind.NACK and nack.error == "port 18445 in use" and nack.push is None
    assert type_state(p.types[rt.LISTENER]) == api_pb2.ERROR
    assert p.types[rt.LISTENER].acked_version == first.version

    # The same snapshot again (another type changed, or a rebuild) does not re-send the rejected version.
    tc = trust_config(pki)
    tc.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(pki, [42])
    store.update(tc, actor="t")
    snap3 = builder.build(store.state()).for_labels({"zone": "a"})
    assert [x.type_url for x in p.on_snapshot(snap3)] == []  # TrustBundle not subscribed on this stream
    assert p.on_snapshot(snap3) == []
    # ... but a changed configuration is sent.
    store.delete("listeners/a2", actor="t")
    snap4 = builder.build(store.state()).for_labels({"zone": "a"})
    (third,) = p.on_snapshot(snap4)
    assert third.version == first.version and third.nonce not in (first.nonce, second.nonce)
    assert type_state(p.types[rt.LISTENER]) == api_pb2.STALE


def test_stale_nonce_is_ignored(world):
    store, builder, _ = world
    p = StreamProtocol(snapshot=builder.build(store.state()).for_labels({"zone": "a"}))
    first = p.on_request(req(rt.LISTENER)).push
    store.create(listener("listeners/a2", 18445, selector={"zone": "a"}), actor="t")
    (second,) = p.on_snapshot(builder.build(store.state()).for_labels({"zone": "a"}))
    # An ACK of the first response arriving after the second was sent: stale, changes nothing.
    stale = p.on_request(req(rt.LISTENER, version=first.version, nonce=first.nonce))
    assert stale.kind is RequestKind.STALE
    assert p.types[rt.LISTENER].acked_version == "" and type_state(p.types[rt.LISTENER]) == api_pb2.STALE
    # Even a NACK with a stale nonce is ignored.
    assert p.on_request(req(rt.LISTENER, nonce=first.nonce, error="x")).kind is RequestKind.STALE
    assert p.on_request(req(rt.LISTENER, version=second.version, nonce=second.nonce)).kind is RequestKind.ACK


def test_names_subscribed_later_are_answered_and_foreign_names_are_not(world):
    store, builder, _ = world
    p = StreamProtocol(snapshot=builder.build(store.state()).for_labels({"zone": "a"}))
    out = p.on_request(req(rt.SERVER_CERTIFICATE, names=[]))
    assert out.push is None and type_state(p.types[rt.SERVER_CERTIFICATE]) == api_pb2.NOT_SENT
    out = p.on_request(req(rt.SERVER_CERTIFICATE, names=["certificates/edge", "certificates/edge-b"]))
    # Still the first request with a nonce-less request: answered, but only with this group's certificate.
    assert [r.type_url for r in out.push.resources] == [rt.SERVER_CERTIFICATE]
    assert len(out.push.resources) == 1
    ack = p.on_request(req(rt.SERVER_CERTIFICATE, version=out.push.version, nonce=out.push.nonce,
                           names=["certificates/edge", "certificates/edge-b"]))
    assert ack.kind is RequestKind.ACK and ack.push is None
    # Names change after an ACK → answered with the new set.
    ack2 = p.on_request(req(rt.SERVER_CERTIFICATE, version=out.push.version, nonce=out.push.nonce, names=[]))
    assert ack2.kind is RequestKind.ACK and ack2.push is not None and ack2.push.resources == []


def test_reconnect_with_current_version_is_not_resent(world):
    store, builder, _ = world
    snap = builder.build(store.state()).for_labels({"zone": "a"})
    version = snap.types[rt.LISTENER].version
    p = StreamProtocol(snapshot=snap)
    out = p.on_request(req(rt.LISTENER, version=version))
    assert out.push is None and type_state(p.types[rt.LISTENER]) == api_pb2.SYNCED
    # With an old version it is answered.
    p2 = StreamProtocol(snapshot=snap)
    assert p2.on_request(req(rt.LISTENER, version="0123456789abcdef")).push is not None


def test_protocol_errors_and_overall_state():
    p = StreamProtocol()
    with pytest.raises(ProtocolError, match="not served"):
        p.on_request(req("type.googleapis.com/envoy.config.cluster.v3.Cluster"))
    with pytest.raises(ProtocolError, match="at most"):
        p.on_request(req(rt.TRUST_BUNDLE, names=[f"trustConfigs/t{i}" for i in range(2000)]))
    assert overall_state([api_pb2.SYNCED, api_pb2.NOT_SENT]) == api_pb2.SYNCED
    assert overall_state([api_pb2.SYNCED, api_pb2.STALE, api_pb2.ERROR]) == api_pb2.ERROR
    assert overall_state([]) == api_pb2.NOT_SENT


def test_synced_on_an_older_version_than_the_snapshot_is_stale():
    """Between a snapshot rebuild and the stream pushing it, the node still holds the old version: it is
    not SYNCED (a script gating on status must not pass in that window)."""
    from control_plane.xds.protocol import TypeState

    ts = TypeState(rt.LISTENER, subscribed=True, acked_version="v1")
    assert type_state(ts) == api_pb2.SYNCED
    assert type_state(ts, "v1") == api_pb2.SYNCED
    assert type_state(ts, "v2") == api_pb2.STALE
