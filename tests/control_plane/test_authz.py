"""Roles on every RPC (SPEC §8): bindings parsing and decisions as pure functions, then a real control
plane with real certificates and tokens: viewer reads, editor writes, unbound callers and wrong tokens are
refused on every method of every service, the audit log names identity and role, SIGHUP reloads."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mtlsgate.v1 import api_pb2

from control_plane.authz.bindings import BindingsError, Role, parse_bindings
from control_plane.authz.identity import Identity, Unauthenticated, who
from control_plane.authz.policy import Access, access_for, allowed, role_of
from tests.control_plane.secure_harness import ADMIN, CaPki, SecureControlPlane
from tests.support import wait_until

ALICE = "spiffe://corp/ops/alice"  # viewer through the glob
EDITOR = "spiffe://corp/ci/deployer"
STRANGER = "spiffe://corp/elsewhere/mallory"
CI_TOKEN = "ci-token-0123456789abcdef"
BINDINGS = f"""
bindings:
  - {{identity: "{ADMIN}", role: admin}}
  - {{identity: "spiffe://corp/ops/*", role: viewer}}
  - {{identity: "{EDITOR}", role: editor}}
  - {{identity: ci, role: editor}}
"""


# ---------------------------------------------------------------- pure decisions


def test_bindings_exact_beats_glob_and_longest_glob_wins() -> None:
    bindings = parse_bindings("""
bindings:
  - {identity: "spiffe://corp/*", role: viewer}
  - {identity: "spiffe://corp/ops/*", role: editor}
  - {identity: "spiffe://corp/ops/root", role: admin}
""")
    assert bindings.role_for("spiffe://corp/ops/root") is Role.ADMIN
    assert bindings.role_for("spiffe://corp/ops/bob") is Role.EDITOR
    assert bindings.role_for("spiffe://corp/hr/eve") is Role.VIEWER
    assert bindings.role_for("spiffe://corpx/ops/bob") is None  # the glob is a prefix of the whole identity
    assert bindings.role_for("spiffe://other/x") is None


@pytest.mark.parametrize(("text", "message"), [
    ("bindings: [{identity: a, role: root}]", "bindings[0].role: 'root' is not a role"),
    ("bindings: [{identity: 'a*b', role: admin}]", "`*` is only allowed at the end"),
    ("bindings: [{identity: a, role: admin}, {identity: a, role: viewer}]", "already bound in bindings[0]"),
    ("bindings: [{identity: a}]", "expected exactly `identity` and `role`"),
    ("roles: []", "expected a mapping with a `bindings:` list"),
    ("bindings: [", "not valid YAML"),
])
def test_bad_bindings_are_refused_with_the_entry(text: str, message: str) -> None:
    with pytest.raises(BindingsError, match=r"authz\.yaml") as caught:
        parse_bindings(text, "authz.yaml")
    assert message in str(caught.value)


def test_every_method_is_classified_and_unknown_ones_need_admin() -> None:
    assert access_for("/grpc.health.v1.Health/Check") is Access.OPEN
    assert access_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is Access.OPEN
    assert access_for("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources") \
        is Access.XDS
    assert access_for("/mtlsgate.v1.ListenerService/DeleteListener") is Access.WRITE
    assert access_for("/mtlsgate.v1.ListenerService/GetListener") is Access.READ
    assert access_for("/mtlsgate.v1.FleetService/WatchNodes") is Access.READ
    assert access_for("/mtlsgate.v1.CheckService/Check") is Access.CHECK
    assert access_for("/mtlsgate.v1.BackendHealthService/ListBackendHealth") is Access.READ
    assert access_for("/mtlsgate.v1.SomethingNew/DoIt") is Access.ADMIN
    assert access_for("/other.Service/Get") is Access.ADMIN


def test_node_identities_never_hold_an_api_role() -> None:
    node = Identity("spiffe://demo/node/a", "certificate")
    admin_for_everyone = parse_bindings("bindings: [{identity: '*', role: admin}]")
    assert role_of(node, admin_for_everyone, {node.name}) is Role.NODE
    assert role_of(node, None, {node.name}) is Role.NODE
    decision = allowed(node, "/mtlsgate.v1.ListenerService/ListListeners", Role.NODE)
    assert not decision.allowed and "node identity" in decision.reason and "needs role viewer" in decision.reason
    # what a node's reports say of backends is for operators, not for other nodes
    decision = allowed(node, "/mtlsgate.v1.BackendHealthService/ListBackendHealth", Role.NODE)
    assert not decision.allowed and "needs role viewer" in decision.reason


def test_default_without_authz_is_admin_for_the_authenticated_only() -> None:
    assert role_of(Identity("cn:ops", "certificate"), None, set()) is Role.ADMIN
    assert role_of(Identity("peer:127.0.0.1", "none"), None, set()) is None
    assert role_of(Identity("peer:127.0.0.1", "none"), None, set(), insecure=True) is Role.ADMIN


def test_who_prefers_a_valid_token_and_never_falls_back_from_a_wrong_one() -> None:
    auth = {"x509_subject_alternative_name": [b"spiffe://corp/ops/alice"], "x509_common_name": [b"alice"]}
    tokens = {CI_TOKEN: "ci"}
    assert who(auth, [], "ipv4:127.0.0.1:5", tokens) == Identity("spiffe://corp/ops/alice", "certificate")
    assert who(auth, [("authorization", f"Bearer {CI_TOKEN}")], "", tokens) == Identity("ci", "token")
    with pytest.raises(Unauthenticated):
        who(auth, [("authorization", "Bearer wrong-token-0123456789")], "", tokens)
    assert who({"x509_common_name": [b"ops"]}, [], "", None) == Identity("cn:ops", "certificate")
    assert who({}, [], "ipv4:127.0.0.1:5", None) == Identity("peer:127.0.0.1", "none")


# ---------------------------------------------------------------- a real control plane


@pytest.fixture
def secure_cp(tmp_path: Path, logs_dir: Path) -> SecureControlPlane:
    pki = CaPki(tmp_path / "pki")
    cp = SecureControlPlane.start(pki, tmp_path, logs_dir, tokens={CI_TOKEN: "ci"}, authz=BINDINGS)
    yield cp
    cp.stop()


def _manifest(tmp_path: Path, description: str = "x") -> str:
    path = tmp_path / "tc.yaml"
    path.write_text(f"kind: TrustConfig\nname: t\ndescription: {description}\n")
    return str(path)


def test_viewer_reads_but_cannot_write(secure_cp: SecureControlPlane, tmp_path: Path) -> None:
    assert secure_cp.cli("apply", "-f", _manifest(tmp_path), identity=ADMIN).returncode == 0
    for command in (("get", "trust-configs"), ("status",), ("status", "--backends"), ("audit",)):
        result = secure_cp.cli(*command, identity=ALICE)
        assert result.returncode == 0, (command, result.stderr)
    denied = secure_cp.cli("apply", "-f", _manifest(tmp_path, "changed"), identity=ALICE)
    assert denied.returncode == 1
    assert "PERMISSION_DENIED" in denied.stderr and ALICE in denied.stderr
    assert "has role viewer" in denied.stderr and "needs role editor" in denied.stderr
    deleted = secure_cp.cli("delete", "trust-configs", "t", identity=ALICE)
    assert deleted.returncode == 1 and "needs role editor" in deleted.stderr
    # check is a viewer's right: the call gets past authorization to the check itself
    with secure_cp.channel(ALICE) as channel:
        check = channel.unary_unary("/mtlsgate.v1.CheckService/Check",
                                    request_serializer=api_pb2.CheckRequest.SerializeToString,
                                    response_deserializer=api_pb2.CheckResponse.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            check(api_pb2.CheckRequest(policy="serverTlsPolicies/none", pem_chain="x"), timeout=10)
        assert caught.value.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def test_editor_writes_and_the_audit_log_names_identity_and_role(secure_cp: SecureControlPlane,
                                                                   tmp_path: Path) -> None:
    assert secure_cp.cli("apply", "-f", _manifest(tmp_path, "by deployer"), identity=EDITOR).returncode == 0
    assert secure_cp.cli("apply", "-f", _manifest(tmp_path, "by ci"), identity=STRANGER,
                         token=CI_TOKEN).returncode == 0  # the token decides, not the certificate
    assert secure_cp.cli("delete", "trust-configs", "t", identity=ADMIN).returncode == 0
    audit = json.loads(secure_cp.cli("audit", "-o", "json", identity=ALICE).stdout)
    assert [(e["actor"], e["role"], e["method"]) for e in audit] == [
        (EDITOR, "editor", "CREATE"), ("ci", "editor", "UPDATE"), (ADMIN, "admin", "DELETE")]
    table = secure_cp.cli("audit", identity=ALICE).stdout
    assert "ROLE" in table.splitlines()[0] and "editor" in table


def _all_management_methods() -> list[tuple[str, bool]]:
    methods = []
    from mtlsgate.v1 import reports_pb2

    for service in [*api_pb2.DESCRIPTOR.services_by_name.values(),
                    reports_pb2.DESCRIPTOR.services_by_name["BackendHealthService"]]:
        for method in service.methods:
            methods.append((f"/{service.full_name}/{method.name}", method.server_streaming))
    return methods


def test_unbound_identities_and_wrong_tokens_are_refused_on_every_rpc(secure_cp: SecureControlPlane) -> None:
    methods = _all_management_methods()
    assert len(methods) >= 24  # 4 resource services x 5, audit, fleet x 2, check …
    for identity, metadata, code, text in (
        (STRANGER, (), grpc.StatusCode.PERMISSION_DENIED, f"{STRANGER} has no role"),
        (ADMIN, (("authorization", "Bearer not-the-token-0123456789"),), grpc.StatusCode.UNAUTHENTICATED,
         "invalid bearer token"),
    ):
        with secure_cp.channel(identity) as channel:
            for method, streaming in methods:
                call = (channel.unary_stream if streaming else channel.unary_unary)(method)
                with pytest.raises(grpc.RpcError) as caught:
                    result = call(b"", timeout=10, metadata=metadata)
                    if streaming:
                        next(iter(result))
                assert caught.value.code() == code, (method, identity, caught.value)
                assert text in (caught.value.details() or ""), method
    with secure_cp.channel(STRANGER) as channel:  # health stays open to every authenticated peer
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_sighup_reloads_bindings_and_a_broken_file_keeps_the_old_ones(secure_cp: SecureControlPlane,
                                                                       tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    assert secure_cp.cli("apply", "-f", manifest, identity=ALICE).returncode == 1
    secure_cp.authz_path.write_text(BINDINGS + f'  - {{identity: "{ALICE}", role: editor}}\n')
    secure_cp.proc.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: secure_cp.cli("apply", "-f", manifest, identity=ALICE).returncode == 0, timeout=10,
               message="alice to become an editor after SIGHUP")

    secure_cp.authz_path.write_text("bindings: [{identity: x, role: superuser}]\n")
    secure_cp.proc.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: "keeping the previous 5 binding(s)" in secure_cp.proc.log(), timeout=10,
               message="the refusal to be logged")
    assert "'superuser' is not a role" in secure_cp.proc.log()
    assert secure_cp.proc.alive()
    assert secure_cp.cli("delete", "trust-configs", "t", identity=ALICE).returncode == 0  # still an editor
