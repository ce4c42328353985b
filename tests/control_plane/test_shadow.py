"""Shadow candidates through the real control plane and CLI (SPEC §12): apply --shadow stores a candidate
beside the active resource and changes nothing enforced; an invalid candidate is refused whole in one line;
promote is an ordinary audited write of the active resource; discard leaves everything as it was; the
store keeps candidates on both backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mtlsgate.v1 import resources_pb2

from control_plane.api.authorization import Caller
from control_plane.api.shadow_service import Shadows
from control_plane.authz.identity import Identity
from control_plane.pki import DemoPki
from tests.control_plane.conftest import ControlPlane
from tests.control_plane.shadow_manifests import policy, trust_config, write
from tests.control_plane.test_store import OpenStore, open_store  # noqa: F401  (fixture)


def _get_json(cp: ControlPlane, kind: str, name: str) -> dict:
    out = cp.cli("get", kind, name, "-o", "json", check=True).stdout
    return json.loads(out)


def test_apply_shadow_stores_a_candidate_and_leaves_the_active_alone(control_plane: ControlPlane, demo_pki: DemoPki,
                                                                     tmp_path: Path) -> None:
    cp = control_plane
    cp.cli("apply", "-f", write(tmp_path / "a.yaml", trust_config(demo_pki), policy()), check=True)
    before = _get_json(cp, "trust-configs", "demo")
    shadowed = cp.cli("apply", "--shadow", "-f", write(tmp_path / "c.yaml", trust_config(demo_pki, anchors="other")),
                      check=True)
    assert "shadow candidate of trustConfigs/demo stored" in shadowed.stdout
    assert _get_json(cp, "trust-configs", "demo") == before  # the active one is untouched
    again = cp.cli("apply", "--shadow", "-f", str(tmp_path / "c.yaml"), check=True)
    assert "unchanged" in again.stdout
    listed = json.loads(cp.cli("shadow", "list", "-o", "json", check=True).stdout)
    assert [c["name"] for c in listed] == ["trustConfigs/demo"]
    status = json.loads(cp.cli("shadow", "status", "trustConfigs/demo", "-o", "json", check=True).stdout)
    assert status["name"] == "trustConfigs/demo" and status["activeEtag"] == before["etag"]
    assert status["wouldNewlyReject"] == 0
    # the active resource cannot be deleted from under its candidate
    refused = cp.cli("delete", "trust-configs", "demo")
    assert refused.returncode != 0
    # discard: the candidate is gone, the active one is as it was
    assert cp.cli("shadow", "discard", "demo", check=True).returncode == 0
    assert json.loads(cp.cli("shadow", "list", "-o", "json", check=True).stdout) == []
    assert _get_json(cp, "trust-configs", "demo") == before
    gone = cp.cli("shadow", "status", "trustConfigs/demo")
    assert gone.returncode != 0 and "has no shadow candidate" in gone.stderr


def test_promote_is_an_audited_write_of_the_active_resource(control_plane: ControlPlane, demo_pki: DemoPki,
                                                            tmp_path: Path) -> None:
    cp = control_plane
    cp.cli("apply", "-f", write(tmp_path / "a.yaml", trust_config(demo_pki), policy()), check=True)
    cp.cli("apply", "--shadow", "-f", write(tmp_path / "c.yaml", trust_config(demo_pki, anchors="both",
                                                                             description="two roots")), check=True)
    promoted = cp.cli("shadow", "promote", "trustConfigs/demo", check=True)
    assert "promoted" in promoted.stdout
    active = _get_json(cp, "trust-configs", "demo")
    assert active["description"] == "two roots" and len(active["trustStores"][0]["trustAnchors"]) == 2
    assert json.loads(cp.cli("shadow", "list", "-o", "json", check=True).stdout) == []
    audit = cp.cli("audit", "-o", "json", check=True).stdout
    assert "promoted shadow candidate" in audit and "shadow candidate of trustConfigs/demo" in audit


def test_an_invalid_candidate_is_refused_whole_with_one_line(control_plane: ControlPlane, demo_pki: DemoPki,
                                                             tmp_path: Path) -> None:
    cp = control_plane
    cp.cli("apply", "-f", write(tmp_path / "a.yaml", trust_config(demo_pki), policy()), check=True)
    bad = (trust_config(demo_pki, anchors="other")
           .replace("BEGIN CERTIFICATE-----\n", "BEGIN CERTIFICATE-----\n      AAAA", 1))
    good_policy = policy(mode="ALLOW_INVALID_OR_MISSING_CLIENT_CERT")
    refused = cp.cli("apply", "--shadow", "-f", write(tmp_path / "bad.yaml", good_policy, bad))
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "trustStores[0].trustAnchors[0]" in refused.stderr
    # nothing half-applied: the valid policy candidate in the same file was not stored either
    assert json.loads(cp.cli("shadow", "list", "-o", "json", check=True).stdout) == []
    # a candidate needs an active resource of that name; only the two kinds can be shadowed
    lonely = cp.cli("apply", "--shadow", "-f", write(tmp_path / "n.yaml", trust_config(demo_pki, name="nope")))
    assert lonely.returncode != 0 and "trustConfigs/nope not found" in lonely.stderr
    listener = cp.cli("apply", "--shadow", "-f", write(tmp_path / "l.yaml", "kind: Listener\nname: x\nport: 1\n"))
    assert listener.returncode == 2 and "TrustConfig and ServerTlsPolicy" in listener.stderr
    # a candidate policy must reference something that exists, as an ordinary write would
    dangling = cp.cli("apply", "--shadow", "-f", write(tmp_path / "p.yaml", policy(trust="missing")))
    assert dangling.returncode != 0 and "trustConfigs/missing does not exist" in dangling.stderr


def test_candidates_are_kept_by_both_store_backends(open_store: OpenStore) -> None:  # noqa: F811
    store = open_store()
    who = Caller(Identity("tester", "none"), None)
    store.create(resources_pb2.TrustConfig(name="trustConfigs/t", description="active",
                                           allowlisted_certificates=[]), actor="x")
    shadows = Shadows(store)
    from mtlsgate.v1 import shadow_pb2

    made = shadows.apply(shadow_pb2.ApplyShadowRequest(trust_config=resources_pb2.TrustConfig(
        name="trustConfigs/t", description="candidate")), who)
    assert made.changed and made.candidate_etag
    store.close()
    reopened = open_store()
    state = reopened.state()
    assert state.shadow_trust_configs["shadowTrustConfigs/t"].description == "candidate"
    assert state.trust_configs["trustConfigs/t"].description == "active"
    Shadows(reopened).discard(shadow_pb2.ShadowRequest(name="trustConfigs/t"), who)
    assert not reopened.state().shadow_trust_configs
    assert reopened.state().trust_configs["trustConfigs/t"].description == "active"
    with pytest.raises(Exception, match="has no shadow candidate"):
        Shadows(reopened).promote(shadow_pb2.ShadowRequest(name="trustConfigs/t"), who)


# ---------------------------------------------------------------- attackers: roles (SPEC §8)

from tests.control_plane.test_authz import ADMIN, ALICE, secure_cp  # noqa: E402,F401  (ALICE is a viewer)


def test_a_viewer_reads_shadow_status_but_cannot_shadow_promote_or_discard(secure_cp, demo_pki: DemoPki,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    active = write(tmp_path / "a.yaml", trust_config(demo_pki), policy())
    candidate = write(tmp_path / "c.yaml", trust_config(demo_pki, anchors="other"))
    assert secure_cp.cli("apply", "-f", active, identity=ADMIN).returncode == 0
    denied = secure_cp.cli("apply", "--shadow", "-f", candidate, identity=ALICE)
    assert denied.returncode == 1 and "has role viewer" in denied.stderr and "needs role editor" in denied.stderr
    assert secure_cp.cli("apply", "--shadow", "-f", candidate, identity=ADMIN).returncode == 0
    status = secure_cp.cli("shadow", "status", "trustConfigs/demo", "-o", "json", identity=ALICE)
    assert status.returncode == 0, status.stderr
    for action in ("promote", "discard"):
        refused = secure_cp.cli("shadow", action, "trustConfigs/demo", identity=ALICE)
        assert refused.returncode == 1 and "needs role editor" in refused.stderr, refused.stderr
    # still there, still a candidate: nothing the viewer tried happened
    listed = json.loads(secure_cp.cli("shadow", "list", "-o", "json", identity=ALICE).stdout)
    assert [c["name"] for c in listed] == ["trustConfigs/demo"]
    assert "untrusted CA" not in secure_cp.cli("get", "trust-configs", "demo", "-o", "yaml", identity=ALICE).stdout


def test_shadow_rpcs_are_classified() -> None:
    from control_plane.authz.bindings import Role
    from control_plane.authz.policy import allowed

    who = Identity("spiffe://corp/ops/viewer", "token")
    for method in ("ApplyShadow", "PromoteShadow", "DiscardShadow"):
        full = f"/mtlsgate.v1.ShadowService/{method}"
        assert not allowed(who, full, Role.VIEWER).allowed
        assert not allowed(who, full, Role.NODE).allowed
        assert allowed(who, full, Role.EDITOR).allowed
    for method in ("GetShadowStatus", "ListShadows"):
        assert allowed(who, f"/mtlsgate.v1.ShadowService/{method}", Role.VIEWER).allowed
        assert not allowed(who, f"/mtlsgate.v1.ShadowService/{method}", Role.NODE).allowed


def test_a_trust_config_a_candidate_policy_uses_cannot_be_deleted(control_plane: ControlPlane, demo_pki: DemoPki,
                                                                 tmp_path: Path) -> None:
    """A candidate ServerTlsPolicy's trust config is a reference like any other: deleting it would leave
    the candidate unjudgeable (and promoting it impossible)."""
    cp = control_plane
    cp.cli("apply", "-f", write(tmp_path / "a.yaml", trust_config(demo_pki), trust_config(demo_pki, "other"),
                                policy()), check=True)
    cp.cli("apply", "--shadow", "-f", write(tmp_path / "c.yaml", policy(trust="other")), check=True)
    refused = cp.cli("delete", "trust-configs", "other")
    assert refused.returncode != 0
    assert "shadowServerTlsPolicies/strict" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert _get_json(cp, "trust-configs", "other")["name"].endswith("trustConfigs/other")
    cp.cli("shadow", "discard", "serverTlsPolicies/strict", check=True)
    assert cp.cli("delete", "trust-configs", "other").returncode == 0
