"""The pure roll-out logic: wave planning, gates, policy bounds, revocation merging, who may steer."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from mtlsgate.v1 import rollouts_pb2

from control_plane.authz.bindings import Role
from control_plane.authz.identity import Identity
from control_plane.authz.policy import allowed
from control_plane.pki import DemoPki
from control_plane.rollouts.gates import GateInput, NodeProgress, RejectWindow, Verdict, gate
from control_plane.rollouts.plan import plan
from control_plane.rollouts.policy import MAX_WAVES, validate_rollout_policy
from control_plane.rollouts.serving import is_revocation_only, with_revocations
from control_plane.store.base import content_etag


def policy(**fields: object) -> rollouts_pb2.RolloutPolicy:
    return json_format.ParseDict(fields, rollouts_pb2.RolloutPolicy())


NODES = {"edge-3": {"zone": "b"}, "edge-1": {"zone": "a"}, "edge-4": {"zone": "b"}, "edge-2": {"zone": "a"},
         "edge-5": {"zone": "c"}}


def test_waves_are_deterministic_by_node_id_and_every_node_is_reached() -> None:
    waves = plan(NODES, policy(waves=[{"nodes": 1}, {"percent": 100}], bake="10s"))
    assert [w.node_ids for w in waves] == [("edge-1",), ("edge-2", "edge-3", "edge-4", "edge-5")]
    assert [w.bake_seconds for w in waves] == [10.0, 10.0]
    assert plan(dict(reversed(list(NODES.items()))), policy(waves=[{"nodes": 1}, {"percent": 100}])) == \
        plan(NODES, policy(waves=[{"nodes": 1}, {"percent": 100}]))
    by_label = plan(NODES, policy(waves=[{"selector": {"zone": "b"}}, {"percent": 50, "bake": "1s"}]))
    assert [(w.node_ids, w.source) for w in by_label] == [
        (("edge-3", "edge-4"), "waves[0]"), (("edge-1",), "waves[1]"), (("edge-2", "edge-5"), "rest")]
    assert plan({}, policy(waves=[{"nodes": 1}])) == []


def _input(**kw: object) -> GateInput:
    base: dict[str, object] = {"now": 100.0, "wave_started": 90.0, "bake_seconds": 5.0,
                               "nodes": [NodeProgress("edge-1", True, True)]}
    base.update(kw)
    return GateInput(**base)  # type: ignore[arg-type]


def test_gates() -> None:
    assert gate(_input()).verdict is Verdict.GO
    assert gate(_input(now=92.0)).verdict is Verdict.WAIT
    nacked = gate(_input(nodes=[NodeProgress("edge-1", True, False, "Listener version v2: port in use")]))
    assert nacked.verdict is Verdict.HALT and "edge-1 rejected Listener version v2" in nacked.reason
    assert gate(_input(nodes=[NodeProgress("edge-1", True, False)], now=95.0)).verdict is Verdict.WAIT
    late = gate(_input(nodes=[NodeProgress("edge-1", True, False)], now=130.0))
    assert late.verdict is Verdict.HALT and "did not ACK" in late.reason
    assert gate(_input(nodes=[NodeProgress("edge-1", False, False)])).verdict is Verdict.GO  # disconnected
    # maxRejectIncrease: 2 points allowed.
    worse = gate(_input(max_reject_increase=0.02, rejects_before=RejectWindow(100, 1),
                        rejects_during=RejectWindow(100, 40)))
    assert worse.verdict is Verdict.HALT and "40/100 = 40.0%" in worse.reason and "1/100 = 1.0%" in worse.reason
    early = gate(_input(now=91.0, max_reject_increase=0.02, rejects_during=RejectWindow(50, 50)))
    assert early.verdict is Verdict.HALT  # enough handshakes: halts before the bake ends
    assert gate(_input(now=91.0, max_reject_increase=0.02, rejects_during=RejectWindow(5, 5))).verdict is \
        Verdict.WAIT
    same = gate(_input(max_reject_increase=0.02, rejects_before=RejectWindow(100, 10),
                       rejects_during=RejectWindow(100, 11)))
    assert same.verdict is Verdict.GO
    blind = gate(_input(max_reject_increase=0.02, rejects_during=None))
    assert blind.verdict is Verdict.HALT and "no node reports" in blind.reason
    assert gate(_input(max_reject_increase=0.02, rejects_during=RejectWindow(0, 0))).verdict is Verdict.GO
    shadow = gate(_input(shadow_no_new_rejects=True, shadow_new_rejects=3))
    assert shadow.verdict is Verdict.HALT and "shadow" in shadow.reason
    blind = gate(_input(shadow_no_new_rejects=True, shadow_new_rejects=None))  # no evaluation: never pass blind
    assert blind.verdict is Verdict.HALT and "no shadow evaluation" in blind.reason
    assert gate(_input(shadow_no_new_rejects=True, shadow_new_rejects=0)).verdict is Verdict.GO


@pytest.mark.parametrize(("fields", "problem"), [
    ({"waves": []}, "waves: at least one wave is required"),
    ({"waves": [{"nodes": 1}] * (MAX_WAVES + 1)}, f"at most {MAX_WAVES}"),
    ({"waves": [{"nodes": 1, "percent": 50}]}, "waves[0]: needs exactly one of nodes, percent or selector"),
    ({"waves": [{}]}, "waves[0]: needs exactly one of nodes, percent or selector (got none)"),
    ({"waves": [{"percent": 150}]}, "waves[0].percent: must be more than 0 and at most 100"),
    ({"waves": [{"percent": 50}, {"percent": 20}]}, "waves[1].percent: 20 is below an earlier wave's 50"),
    ({"waves": [{"nodes": -3}]}, "waves[0].nodes: must be between 1 and"),
    ({"waves": [{"nodes": 1}], "bake": "172800s"}, "bake: at most 86400s"),
    ({"waves": [{"nodes": 1, "bake": "-1s"}]}, "waves[0].bake: must not be negative"),
    ({"waves": [{"nodes": 1}], "gates": {"maxRejectIncrease": 5}}, "gates.maxRejectIncrease: a fraction"),
    ({"waves": [{"selector": {f"k{i}": "v" for i in range(20)}}]}, "waves[0].selector: at most 16 labels"),
])
def test_malformed_policies_are_refused_naming_the_field(fields: dict[str, object], problem: str) -> None:
    problems = [str(p) for p in validate_rollout_policy(policy(**fields))]
    assert any(problem in p for p in problems), problems


def test_only_added_revocations_skip_the_waves(demo_pki: DemoPki) -> None:
    from tests.xds.fleet_config import rotated_crl_pem, trust_config

    base = trust_config(demo_pki)
    base.etag = content_etag(base)
    more = trust_config(demo_pki)
    more.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(demo_pki, [1, 2, 3])
    fewer = trust_config(demo_pki, crl_file="empty_crl")
    original = {e.serial_number for e in __import__("cryptography.x509", fromlist=["x"]).load_pem_x509_crl(
        demo_pki.path("crl").read_bytes())}
    superset = trust_config(demo_pki)
    superset.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(demo_pki, [*original, 99])
    assert is_revocation_only(base, superset)
    assert not is_revocation_only(base, more)  # drops the revoked demo client: not only additions
    assert not is_revocation_only(base, fewer)
    anchors = trust_config(demo_pki)
    del anchors.trust_stores[0].intermediate_cas[:]
    assert not is_revocation_only(base, anchors)
    merged = with_revocations(base, superset)
    assert merged is not None and merged.trust_stores[0].crls[0].pem_crl == superset.trust_stores[0].crls[0].pem_crl
    assert merged.etag == content_etag(merged) != base.etag
    assert with_revocations(base, fewer) is None


@pytest.mark.parametrize("method", ["PauseRollout", "ResumeRollout", "AbortRollout", "UndoRollout",
                                    "BeginRollout", "CommitRollout"])
def test_a_viewer_or_a_node_cannot_steer_a_rollout(method: str) -> None:
    who = Identity("spiffe://corp/ops/viewer", "token")
    full = f"/mtlsgate.v1.RolloutService/{method}"
    denied = allowed(who, full, Role.VIEWER)
    assert not denied.allowed and "needs role editor" in denied.reason
    assert not allowed(who, full, Role.NODE).allowed
    assert allowed(who, full, Role.EDITOR).allowed
    assert allowed(who, "/mtlsgate.v1.RolloutService/GetRollout", Role.VIEWER).allowed
    assert not allowed(who, "/mtlsgate.v1.RolloutPolicyService/UpdateRolloutPolicy", Role.VIEWER).allowed


def test_apply_refuses_a_malformed_policy_with_one_line(tmp_path: object) -> None:
    import subprocess
    from pathlib import Path

    from tests.support import MTLSGATE

    path = Path(str(tmp_path)) / "bad.yaml"
    path.write_text("kind: RolloutPolicy\nname: bad\nwaves: [{nodes: 1, percent: 50}]\nbake: 10s\n")
    done = subprocess.run([*MTLSGATE, "apply", "-f", str(path), "--server", "127.0.0.1:9"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "waves[0]: needs exactly one of nodes, percent or selector" in lines[0], done.stderr
    path.write_text("kind: RolloutPolicy\nname: bad\nwaves: [{nodes: 1}]\nbake: forever\n")
    done = subprocess.run([*MTLSGATE, "apply", "-f", str(path), "--server", "127.0.0.1:9"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1 and "bake" in done.stderr, done.stderr
