"""Snapshot building: group selection, content-hash versions, shared encodings, only-changed types."""

from __future__ import annotations

from mtlsgate import resource_types as rt
from mtlsgate.v1 import resources_pb2, xds_pb2

from control_plane.store.sqlite import SqliteStore
from control_plane.xds.snapshot import SnapshotBuilder
from tests.xds.fleet_config import rotated_crl_pem, trust_config, two_group_store


def test_groups_get_exactly_their_resources(demo_pki):
    store = two_group_store(SqliteStore(), demo_pki, (18443, 18444))
    snaps = SnapshotBuilder().build(store.state())
    a = snaps.for_labels({"zone": "a", "rack": "1"})
    b = snaps.for_labels({"zone": "b"})
    none = snaps.for_labels({})
    assert list(a.types[rt.LISTENER].resources) == ["listeners/a"]
    assert list(a.types[rt.SERVER_CERTIFICATE].resources) == ["certificates/edge"]
    assert list(a.types[rt.TRUST_BUNDLE].resources) == ["trustConfigs/demo"]
    assert list(b.types[rt.LISTENER].resources) == ["listeners/b"]
    assert list(b.types[rt.SERVER_CERTIFICATE].resources) == ["certificates/edge-b"]
    assert b.types[rt.TRUST_BUNDLE].resources == {}
    assert all(not t.resources for t in none.types.values())
    # A by-name request for another group's key is not answered.
    assert b.types[rt.SERVER_CERTIFICATE].select(["certificates/edge"]) == []

    listener = resources_pb2.Listener.FromString(a.types[rt.LISTENER].resources["listeners/a"].value)
    assert listener.resolved_server_tls_policy.mtls_policy.client_validation_mode == resources_pb2.MTLSPolicy.REJECT_INVALID
    assert listener.resolved_server_tls_policy.mtls_policy.client_validation_trust_config == "trustConfigs/demo"
    cert = xds_pb2.ServerCertificate.FromString(
        a.types[rt.SERVER_CERTIFICATE].resources["certificates/edge"].value)
    assert "PRIVATE KEY" in cert.pem_private_key
    bundle = xds_pb2.TrustBundle.FromString(a.types[rt.TRUST_BUNDLE].resources["trustConfigs/demo"].value)
    assert bundle.name == "trustConfigs/demo" and len(bundle.trust_stores[0].crls) == 1


def test_versions_are_content_hashes_stable_across_builders(demo_pki):
    store = two_group_store(SqliteStore(), demo_pki, (18443, 18444))
    v1 = SnapshotBuilder().build(store.state()).for_labels({"zone": "a"}).versions()
    v2 = SnapshotBuilder().build(store.state()).for_labels({"zone": "a"}).versions()
    assert v1 == v2
    # A second store with the same content, written in another order, gives the same versions.
    other = SqliteStore()
    two_group_store(other, demo_pki, (18443, 18444))
    assert SnapshotBuilder().build(other.state()).for_labels({"zone": "a"}).versions() == v1


def test_crl_rotation_changes_only_the_trust_bundle_and_encodings_are_shared(demo_pki):
    store = two_group_store(SqliteStore(), demo_pki, (18443, 18444))
    builder = SnapshotBuilder()
    before = builder.build(store.state())
    a1, b1 = before.for_labels({"zone": "a"}), before.for_labels({"zone": "b"})
    assert before.for_labels({"zone": "a", "x": "y"}) is a1  # one snapshot object per group

    tc = trust_config(demo_pki)
    tc.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(demo_pki, [1234, 5678])
    store.update(tc, actor="test")
    after = builder.build(store.state())
    a2, b2 = after.for_labels({"zone": "a"}), after.for_labels({"zone": "b"})
    changed = {t for t in rt.ALL_TYPES if a1.types[t].version != a2.types[t].version}
    assert changed == {rt.TRUST_BUNDLE}
    assert b1.versions() == b2.versions()
    # Unchanged resources keep the very same encoded object (serialised once).
    assert a2.types[rt.LISTENER].resources["listeners/a"] is a1.types[rt.LISTENER].resources["listeners/a"]
    assert a2.types[rt.TRUST_BUNDLE].resources["trustConfigs/demo"] is not a1.types[rt.TRUST_BUNDLE].resources["trustConfigs/demo"]
