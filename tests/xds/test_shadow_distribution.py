"""Shadow candidates on the wire (SPEC §12, §8): the snapshot puts `Listener.shadow_policies` only on the
listeners whose policy or trust config has a candidate, a candidate TrustConfig's bundle goes as
`shadowTrustConfigs/ID` only to streams whose snapshot references it, and the node asks for that bundle
without ever waiting for it (a missing or broken candidate bundle never blocks or NACKs the active config)."""

from __future__ import annotations

import dataclasses

import grpc
from mtlsgate import resource_types as rt
from mtlsgate.v1 import resources_pb2, shadow_pb2, shadow_pb2_grpc, xds_pb2

from control_plane.store.sqlite import SqliteStore
from control_plane.xds.protocol import StreamProtocol
from control_plane.xds.snapshot import SnapshotBuilder
from data_plane.node.agent import AgentSession, NodeIdentity
from data_plane.node.config import NodeConfig, validate_node_config
from tests.control_plane.shadow_manifests import other_root_pem
from tests.support import free_port, wait_until
from tests.xds.fleet_config import certificate, listener, strict_policy, trust_config
from tests.xds.raw_ads import RawAds
from tests.xds.test_agent import response

LISTENER, BUNDLE = rt.LISTENER, rt.TRUST_BUNDLE


def other_root_trust(pki, name: str = "trustConfigs/demo") -> resources_pb2.TrustConfig:
    """A TrustConfig of the same name anchored on a different root (the demo's untrusted CA)."""
    tc = resources_pb2.TrustConfig(name=name)
    tc.trust_stores.add().trust_anchors.add(pem_certificate=other_root_pem(pki))
    return tc


def two_trust_store(pki) -> SqliteStore:
    """zone=a: listeners/a (strict → trustConfigs/demo); zone=b: listeners/b (policy other → trustConfigs/other)."""
    store = SqliteStore()
    store.create(trust_config(pki), actor="t")
    store.create(trust_config(pki, name="trustConfigs/other"), actor="t")
    store.create(strict_policy(), actor="t")
    store.create(strict_policy("serverTlsPolicies/other", "trustConfigs/other"), actor="t")
    store.create(certificate(pki), actor="t")
    store.create(listener("listeners/a", 18443, selector={"zone": "a"}), actor="t")
    store.create(listener("listeners/b", 18444, selector={"zone": "b"}, policy="serverTlsPolicies/other"), actor="t")
    return store


def _shadow(store: SqliteStore, message) -> None:
    name = message.name.replace("trustConfigs/", "shadowTrustConfigs/").replace(
        "serverTlsPolicies/", "shadowServerTlsPolicies/")
    copy = type(message)()
    copy.CopyFrom(message)
    copy.name = name
    store.create(copy, actor="t")


def _listener(snap, name: str) -> resources_pb2.Listener:
    return resources_pb2.Listener.FromString(snap.types[LISTENER].resources[name].value)


def test_a_candidate_trust_config_goes_only_to_the_listeners_and_groups_that_use_it(demo_pki):
    store = two_trust_store(demo_pki)
    builder = SnapshotBuilder()
    before = builder.build(store.state())
    b_before = before.for_labels({"zone": "b"}).versions()
    assert not _listener(before.for_labels({"zone": "a"}), "listeners/a").shadow_policies

    _shadow(store, other_root_trust(demo_pki))
    after = builder.build(store.state())
    a, b = after.for_labels({"zone": "a"}), after.for_labels({"zone": "b"})
    assert sorted(a.types[BUNDLE].resources) == ["shadowTrustConfigs/demo", "trustConfigs/demo"]
    bundle = xds_pb2.TrustBundle.FromString(a.types[BUNDLE].resources["shadowTrustConfigs/demo"].value)
    assert bundle.name == "shadowTrustConfigs/demo"
    shadow, = _listener(a, "listeners/a").shadow_policies
    stored = store.state().shadow_trust_configs
    assert shadow.candidate == "trustConfigs/demo" and shadow.candidate_version == next(iter(stored.values())).etag
    assert shadow.server_tls_policy.mtls_policy.client_validation_trust_config == "shadowTrustConfigs/demo"
    assert shadow.server_tls_policy.mtls_policy.client_validation_mode == resources_pb2.MTLSPolicy.REJECT_INVALID
    # The active policy the listener enforces is unchanged.
    assert _listener(a, "listeners/a").resolved_server_tls_policy.mtls_policy.client_validation_trust_config \
        == "trustConfigs/demo"
    # Group b uses neither: nothing of it changes, and asking for the candidate by name is not answered.
    assert b.versions() == b_before
    assert b.types[BUNDLE].select(["shadowTrustConfigs/demo"]) == []
    assert not _listener(b, "listeners/b").shadow_policies


def test_a_candidate_policy_is_judged_with_the_trust_config_it_names(demo_pki):
    store = two_trust_store(demo_pki)
    candidate = strict_policy()
    candidate.mtls_policy.client_validation_mode = resources_pb2.MTLSPolicy.ALLOW_INVALID_OR_MISSING_CLIENT_CERT
    _shadow(store, candidate)
    a = SnapshotBuilder().build(store.state()).for_labels({"zone": "a"})
    shadow, = _listener(a, "listeners/a").shadow_policies
    assert shadow.candidate == "serverTlsPolicies/strict"
    assert shadow.server_tls_policy.mtls_policy.client_validation_trust_config == "trustConfigs/demo"
    assert shadow.server_tls_policy.mtls_policy.client_validation_mode == \
        resources_pb2.MTLSPolicy.ALLOW_INVALID_OR_MISSING_CLIENT_CERT
    assert sorted(a.types[BUNDLE].resources) == ["trustConfigs/demo"]


def test_the_node_asks_for_a_candidate_bundle_but_never_waits_for_it(demo_pki):
    """The candidate bundle withheld (a damaged store): the active configuration applies at once; once the
    bundle arrives it is applied as a second version."""
    store = two_trust_store(demo_pki)
    _shadow(store, other_root_trust(demo_pki))
    snap = SnapshotBuilder().build(store.state()).for_labels({"zone": "a"})
    server = StreamProtocol(snapshot=snap)
    agent = AgentSession(NodeIdentity("n1", "c", {"zone": "a"}).to_proto(), None)
    applied: list[NodeConfig] = []
    withheld: list = []

    def deliver(requests) -> None:
        for request in requests:
            if request.type_url == BUNDLE and "shadowTrustConfigs/demo" in request.resource_names:
                assert "trustConfigs/demo" in request.resource_names  # asked for with the required one
            push = server.on_request(request).push
            if push is None:
                continue
            if push.type_url == BUNDLE and not withheld:
                # the first bundle response loses the candidate's bundle
                kept = [r for r in push.resources if b"shadowTrustConfigs" not in r.value]
                withheld.append([r for r in push.resources if r not in kept])
                push = dataclasses.replace(push, resources=kept)
            step = agent.on_response(response(push), now=0.0)
            deliver(step.requests)
            if step.config is not None:
                validate_node_config(step.config)
                agent.accepted(step.config)
                applied.append(step.config)
                deliver(step.ack)

    deliver(agent.initial_requests())
    assert withheld and withheld[0], "the candidate bundle was part of the first response"
    assert applied and set(applied[0].bundles) == {"trustConfigs/demo"}  # applied without waiting
    assert _has_no_overdue(agent)


def _has_no_overdue(agent: AgentSession) -> bool:
    return not agent.check_overdue(now=10_000.0).requests


def test_a_candidate_bundle_that_does_not_compile_never_blocks_the_active_config(demo_pki):
    store = two_trust_store(demo_pki)
    _shadow(store, other_root_trust(demo_pki))
    snap = SnapshotBuilder().build(store.state()).for_labels({"zone": "a"})
    listeners = {n: resources_pb2.Listener.FromString(r.value) for n, r in snap.types[LISTENER].resources.items()}
    bundles = {n: xds_pb2.TrustBundle.FromString(r.value) for n, r in snap.types[BUNDLE].resources.items()}
    broken = xds_pb2.TrustBundle(name="shadowTrustConfigs/demo")
    broken.trust_stores.add().trust_anchors.append(b"not a certificate")
    bundles["shadowTrustConfigs/demo"] = broken
    certs = {n: xds_pb2.ServerCertificate.FromString(r.value)
             for n, r in snap.types[rt.SERVER_CERTIFICATE].resources.items()}
    validate_node_config(NodeConfig(listeners=listeners, bundles=bundles, certificates=certs))  # no ConfigRejected


def test_only_the_stream_that_uses_a_candidate_gets_its_bundle(control_plane, api, demo_pki):
    """Real control plane, two raw ADS streams (SPEC §8): zone=b's stream asking for the candidate bundle
    by name gets nothing; zone=a's gets it after apply --shadow (ShadowService/ApplyShadow)."""
    api.put(trust_config(demo_pki))
    api.put(trust_config(demo_pki, name="trustConfigs/other"))
    api.put(strict_policy())
    api.put(strict_policy("serverTlsPolicies/other", "trustConfigs/other"))
    api.put(certificate(demo_pki))
    api.put(listener("listeners/a", free_port(), selector={"zone": "a"}))
    api.put(listener("listeners/b", free_port(), selector={"zone": "b"}, policy="serverTlsPolicies/other"))
    shadows = shadow_pb2_grpc.ShadowServiceStub(api.channel)
    stored = shadows.ApplyShadow(shadow_pb2.ApplyShadowRequest(trust_config=other_root_trust(demo_pki)), timeout=10)

    channel = grpc.insecure_channel(control_plane.address)
    a = RawAds(channel, "raw-a", {"zone": "a"})
    b = RawAds(channel, "raw-b", {"zone": "b"})
    try:
        names = ("trustConfigs/demo", "trustConfigs/other", "shadowTrustConfigs/demo")
        for stream in (a, b):
            stream.send(LISTENER)
            first = stream.recv()
            stream.send(LISTENER, version=first.version_info, nonce=first.nonce)
            stream.send(BUNDLE, names=names)
        got = {}
        for key, stream in (("a", a), ("b", b)):
            reply = wait_until(lambda s=stream: (r := s.recv()) and r.type_url == BUNDLE and r, timeout=10,
                               message=f"{key}: bundles")
            got[key] = {xds_pb2.TrustBundle.FromString(r.value).name for r in reply.resources}
        assert got["a"] == {"trustConfigs/demo", "shadowTrustConfigs/demo"}
        assert got["b"] == {"trustConfigs/other"}
        listener_a = resources_pb2.Listener.FromString(_first_listener(channel))
        assert [s.candidate_version for s in listener_a.shadow_policies] == [stored.candidate_etag]
    finally:
        a.close()
        b.close()
        channel.close()


def _first_listener(channel: grpc.Channel) -> bytes:
    """listeners/a as a fresh zone=a stream is sent it."""
    stream = RawAds(channel, "raw-a2", {"zone": "a"})
    try:
        stream.send(LISTENER)
        reply = stream.recv()
        return next(r.value for r in reply.resources if b"listeners/a" in r.value)
    finally:
        stream.close()


def test_the_broken_bundle_would_be_rejected_as_an_active_one(demo_pki):
    """The control for the test above: the same bytes under an active name are a NACK."""
    import pytest

    from data_plane.node.config import ConfigRejected

    store = two_trust_store(demo_pki)
    snap = SnapshotBuilder().build(store.state()).for_labels({"zone": "a"})
    listeners = {n: resources_pb2.Listener.FromString(r.value) for n, r in snap.types[LISTENER].resources.items()}
    broken = xds_pb2.TrustBundle(name="trustConfigs/demo")
    broken.trust_stores.add().trust_anchors.append(b"not a certificate")
    certs = {n: xds_pb2.ServerCertificate.FromString(r.value)
             for n, r in snap.types[rt.SERVER_CERTIFICATE].resources.items()}
    with pytest.raises(ConfigRejected, match="trustConfigs/demo"):
        validate_node_config(NodeConfig(listeners=listeners, bundles={"trustConfigs/demo": broken}, certificates=certs))
