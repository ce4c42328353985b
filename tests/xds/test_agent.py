"""The node agent's protocol logic and validation, driven against the server's own pure state machine
(`StreamProtocol` fed by `SnapshotBuilder` over a real store): both ends sans-I/O, wired back to back."""

from __future__ import annotations

import stat

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2, resources_pb2

from control_plane.store.sqlite import SqliteStore
from control_plane.xds.fleet import type_state
from control_plane.xds.protocol import Push, StreamProtocol
from control_plane.xds.snapshot import SnapshotBuilder
from data_plane.node.agent import AgentSession, Backoff, NodeIdentity, load_cached, save_cached
from data_plane.node.apply import PortReservations
from data_plane.node.config import ConfigRejected, NodeConfig, validate_node_config
from tests.xds.fleet_config import listener, rotated_crl_pem, trust_config, two_group_store


def response(push: Push) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(version_info=push.version, nonce=push.nonce, type_url=push.type_url,
                                           resources=push.resources)


class Wire:
    """Server protocol ↔ agent session, delivering messages in order; `apply` decides success."""

    def __init__(self, store: SqliteStore, active: NodeConfig | None = None) -> None:
        self.store = store
        self.builder = SnapshotBuilder()
        self.server = StreamProtocol(snapshot=self.builder.build(store.state()).for_labels({"zone": "a"}))
        self.agent = AgentSession(NodeIdentity("n1", "c", {"zone": "a"}).to_proto(), active)
        self.applied: list[NodeConfig] = []
        self.reject_with = ""

    def to_server(self, requests: list[discovery_pb2.DiscoveryRequest]) -> None:
        for request in requests:
            outcome = self.server.on_request(request)
            if outcome.push is not None:
                self.to_agent([outcome.push])

    def to_agent(self, pushes: list[Push]) -> None:
        for push in pushes:
            step = self.agent.on_response(response(push), now=0.0)
            self.to_server(step.requests)
            if step.config is not None:
                try:
                    validate_node_config(step.config)
                    if self.reject_with:
                        raise ConfigRejected(self.reject_with)
                except ConfigRejected as exc:
                    self.to_server(self.agent.rejected(str(exc)))
                else:
                    self.agent.accepted(step.config)
                    self.applied.append(step.config)
                    self.to_server(step.ack)

    def store_changed(self) -> None:
        self.to_agent(self.server.on_snapshot(self.builder.build(self.store.state()).for_labels({"zone": "a"})))

    def states(self) -> dict[str, int]:
        return {t: type_state(self.server.types.get(t)) for t in rt.ALL_TYPES}


@pytest.fixture
def store(demo_pki):
    return two_group_store(SqliteStore(), demo_pki, (18443, 18444))


def test_listener_is_held_until_its_names_arrive_then_everything_is_acked(store):
    wire = Wire(store)
    wire.to_server(wire.agent.initial_requests())
    assert len(wire.applied) == 1  # one complete configuration, applied once
    config = wire.applied[0]
    assert set(config.listeners) == {"listeners/a"}
    assert set(config.certificates) == {"certificates/edge"} and set(config.bundles) == {"trustConfigs/demo"}
    assert wire.states() == {t: api_pb2.SYNCED for t in rt.ALL_TYPES if t != rt.BACKEND_SERVICE} | {rt.BACKEND_SERVICE: api_pb2.NOT_SENT}


def test_crl_rotation_is_applied_and_only_the_bundle_changes(store, demo_pki):
    wire = Wire(store)
    wire.to_server(wire.agent.initial_requests())
    tc = trust_config(demo_pki)
    tc.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(demo_pki, [777])
    store.update(tc, actor="t")
    wire.store_changed()
    assert len(wire.applied) == 2
    before, after = wire.applied
    assert before.versions[rt.LISTENER] == after.versions[rt.LISTENER]
    assert before.versions[rt.TRUST_BUNDLE] != after.versions[rt.TRUST_BUNDLE]


def test_invalid_bundle_is_nacked_with_its_name_and_the_last_good_config_stays(store, demo_pki):
    wire = Wire(store)
    wire.to_server(wire.agent.initial_requests())
    good = wire.agent.active
    # A CRL signed by a key that is not a CA of this trust config (the control plane's write checks are
    # bypassed by writing the store directly, as a buggy or hostile control plane might).
    from control_plane.pki import crl_pem, issue, make_crl

    rogue = issue("rogue CA", ca=True)
    tc = trust_config(demo_pki)
    tc.trust_stores[0].crls[0].pem_crl = crl_pem(make_crl(rogue, [1]))
    store.update(tc, actor="t")
    wire.store_changed()
    assert wire.agent.active is good and len(wire.applied) == 1
    bundle_state = wire.server.types[rt.TRUST_BUNDLE]
    assert type_state(bundle_state) == api_pb2.ERROR
    assert bundle_state.last_error.startswith("trustConfigs/demo: ")
    assert bundle_state.acked_version == good.versions[rt.TRUST_BUNDLE]
    # Nothing is re-sent for the same snapshot.
    assert wire.server.on_snapshot(wire.builder.build(store.state()).for_labels({"zone": "a"})) == []


def test_applier_rejection_nacks_and_a_resend_of_the_active_config_is_not_reapplied(store):
    wire = Wire(store)
    wire.to_server(wire.agent.initial_requests())
    wire.reject_with = "listeners/a: port 18999 is already in use on this node"
    store.update(listener("listeners/a", 18999, selector={"zone": "a"}), actor="t")
    wire.store_changed()
    assert wire.states()[rt.LISTENER] == api_pb2.ERROR
    assert wire.server.types[rt.LISTENER].last_error == wire.reject_with
    assert [lst.port for lst in wire.agent.active.listeners.values()] == [18443]
    # Back to the old port: the server sends that version again; it equals the active config → ACK only.
    wire.reject_with = ""
    store.update(listener("listeners/a", 18443, selector={"zone": "a"}), actor="t")
    wire.store_changed()
    assert len(wire.applied) == 1 and wire.states()[rt.LISTENER] == api_pb2.SYNCED


def test_reconnect_with_held_versions_gets_nothing_and_applies_nothing(store):
    first = Wire(store)
    first.to_server(first.agent.initial_requests())
    again = Wire(store, active=first.agent.active)
    again.to_server(again.agent.initial_requests())
    assert again.applied == []
    assert again.states() == {t: api_pb2.SYNCED for t in rt.ALL_TYPES if t != rt.BACKEND_SERVICE} | {rt.BACKEND_SERVICE: api_pb2.NOT_SENT}
    assert all(ts.last_push is None for ts in again.server.types.values())


def test_cache_round_trip_is_private_and_bad_caches_are_refused(tmp_path, store):
    wire = Wire(store)
    wire.to_server(wire.agent.initial_requests())
    save_cached(tmp_path / "cache", wire.agent.active)
    path = tmp_path / "cache" / "last-good.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    loaded = load_cached(tmp_path / "cache")
    assert loaded == wire.agent.active
    validate_node_config(loaded)
    path.write_text("{not json")
    with pytest.raises(ConfigRejected, match="cached configuration is unreadable"):
        load_cached(tmp_path / "cache")
    assert load_cached(tmp_path / "elsewhere") is None


def test_node_config_validation_messages(store):
    wire = Wire(store)
    wire.to_server(wire.agent.initial_requests())
    good = wire.agent.active
    lst = resources_pb2.Listener()
    lst.CopyFrom(good.listeners["listeners/a"])
    lst.certificate = "certificates/missing"
    with pytest.raises(ConfigRejected, match="listeners/a: certificate certificates/missing was not received"):
        validate_node_config(NodeConfig(good.versions, {"listeners/a": lst}, good.bundles, good.certificates))
    lst.CopyFrom(good.listeners["listeners/a"])
    lst.custom_request_headers.append("X-Bad:{no_such_variable}")
    with pytest.raises(ConfigRejected, match=r"listeners/a: customRequestHeaders\[0\]"):
        validate_node_config(NodeConfig(good.versions, {"listeners/a": lst}, good.bundles, good.certificates))
    twin = resources_pb2.Listener()
    twin.CopyFrom(good.listeners["listeners/a"])
    twin.name = "listeners/twin"
    with pytest.raises(ConfigRejected, match="listeners/twin: port 18443 is also used by listeners/a"):
        validate_node_config(NodeConfig(good.versions, {"listeners/a": good.listeners["listeners/a"],
                                                        "listeners/twin": twin}, good.bundles, good.certificates))
    cert = type(good.certificates["certificates/edge"])()
    cert.CopyFrom(good.certificates["certificates/edge"])
    cert.pem_private_key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ConfigRejected, match="certificates/edge: private key cannot be loaded") as err:
        validate_node_config(NodeConfig(good.versions, good.listeners, good.bundles, {"certificates/edge": cert}))
    assert "AAAA" not in str(err.value)


def test_port_reservations_are_all_or_nothing():
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    reservations = PortReservations("127.0.0.1")
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        reservations.update({"listeners/x": resources_pb2.Listener(port=free)})
        assert reservations.ports == {free}
        with pytest.raises(ConfigRejected, match=f"listeners/y: port {taken} is already in use on this node"):
            reservations.update({"listeners/x": resources_pb2.Listener(port=free),
                                 "listeners/y": resources_pb2.Listener(port=taken)})
        assert reservations.ports == {free}
        reservations.update({})
        assert reservations.ports == frozenset()
    finally:
        reservations.close()
        blocker.close()


def test_backoff_is_jittered_and_capped():
    import random

    backoff = Backoff(base=0.25, cap=5.0)
    rng = random.Random(1)
    delays = [backoff.delay(a, rng) for a in range(30) for _ in range(20)]
    assert all(0 <= d <= 5.0 for d in delays)
    assert max(backoff.delay(0, rng) for _ in range(100)) <= 0.25
    assert len({round(d, 6) for d in delays}) > 500  # jittered, not a fixed ladder


def test_names_that_never_arrive_are_nacked_after_the_grace_period():
    from google.protobuf import any_pb2

    from data_plane.node.agent import MISSING_NAMES_GRACE

    session = AgentSession(NodeIdentity("n1", "c").to_proto(), None)
    lst = resources_pb2.Listener(name="listeners/a", port=18443, certificate="certificates/ghost",
                                 backend="127.0.0.1:9")
    packed = any_pb2.Any(type_url=rt.LISTENER, value=lst.SerializeToString())
    step = session.on_response(discovery_pb2.DiscoveryResponse(
        version_info="v1", nonce="1", type_url=rt.LISTENER, resources=[packed]), now=100.0)
    assert step.config is None  # held
    (ask,) = step.requests
    assert ask.type_url == rt.SERVER_CERTIFICATE and list(ask.resource_names) == ["certificates/ghost"]
    # The control plane answers without it (it is not in this node's group).
    step = session.on_response(discovery_pb2.DiscoveryResponse(
        version_info="c1", nonce="2", type_url=rt.SERVER_CERTIFICATE), now=101.0)
    assert step.config is None and step.requests == []
    assert session.check_overdue(101.0 + MISSING_NAMES_GRACE / 2).requests == []
    nacks = session.check_overdue(101.0 + MISSING_NAMES_GRACE + 1).requests
    assert {n.type_url for n in nacks} == {rt.LISTENER, rt.SERVER_CERTIFICATE}
    assert all(n.error_detail.message == "ServerCertificate certificates/ghost was not delivered" for n in nacks)
    assert {n.type_url: n.response_nonce for n in nacks} == {rt.LISTENER: "1", rt.SERVER_CERTIFICATE: "2"}
    assert all(n.version_info == "" for n in nacks)  # nothing good held yet
