"""Import GCP-format files and apply manifests through the CLI, read them back with `get`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import hashes, serialization

from control_plane.pki import DemoPki
from tests.control_plane.conftest import ControlPlane

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n")


def test_import_gcp_files_then_get_yaml_returns_the_same_content(control_plane: ControlPlane,
                                                                  demo_pki: DemoPki, tmp_path: Path) -> None:
    tc_file = demo_pki.path("trust_config")
    # gcloud exports carry output fields and CRLF line endings can sneak in: both must be accepted.
    exported = tmp_path / "exported.yaml"
    exported.write_text("name: projects/p1/locations/global/trustConfigs/old\n"
                        "createTime: '2024-01-02T03:04:05.123456Z'\nupdateTime: 2024-01-02T03:04:05Z\n"
                        "etag: abc123\n" + tc_file.read_text(), newline="\r\n")
    assert b"\r\n" in exported.read_bytes()
    result = control_plane.cli("import", "trust-config", "demo", "--source", str(exported), check=True)
    assert result.stdout.strip() == "trustconfig/demo created"
    result = control_plane.cli("import", "server-tls-policy", "strict", "--source",
                               str(demo_pki.path("server_tls_policy")), check=True)
    assert result.stdout.strip() == "servertlspolicy/strict created"

    source = yaml.safe_load(tc_file.read_text())
    got = yaml.safe_load(control_plane.cli("get", "trust-configs", "demo", "-o", "yaml", check=True).stdout)
    assert got["kind"] == "TrustConfig" and got["name"] == "trustConfigs/demo"
    assert got["etag"] and got["createTime"] and got["updateTime"]
    assert got["createTime"] != "2024-01-02T03:04:05.123456Z"  # output fields are the server's own
    assert got["description"] == source["description"]
    for key in ("trustAnchors", "intermediateCas"):
        assert [_lf(a["pemCertificate"]) for a in got["trustStores"][0][key]] == \
            [_lf(a["pemCertificate"]) for a in source["trustStores"][0][key]]
    assert _lf(got["trustStores"][0]["crls"][0]["pemCrl"]) == _lf(source["trustStores"][0]["crls"][0]["pemCrl"])

    policy = json.loads(control_plane.cli("get", "server-tls-policy", "strict", "-o", "json", check=True).stdout)
    assert policy["mtlsPolicy"] == {"clientValidationMode": "REJECT_INVALID",
                                    "clientValidationTrustConfig": "trustConfigs/demo"}  # GCP name normalised
    assert policy["description"] == "mtlsgate demo policy"

    # Re-importing the same file changes nothing: same etag, no new revision.
    again = control_plane.cli("import", "trust-config", "demo", "--source", str(exported), check=True)
    assert again.stdout.strip() == "trustconfig/demo unchanged"
    regot = yaml.safe_load(control_plane.cli("get", "trust-config", "demo", "-o", "yaml", check=True).stdout)
    assert regot["etag"] == got["etag"] and regot["updateTime"] == got["updateTime"]

    # `get -o yaml` output is itself an apply manifest.
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(control_plane.cli("get", "trust-configs", "-o", "yaml", check=True).stdout)
    assert control_plane.cli("apply", "-f", str(dumped), check=True).stdout.strip() == "trustconfig/demo unchanged"


def test_apply_example_manifest_reports_changes_and_hides_keys(control_plane: ControlPlane, tmp_path: Path) -> None:
    manifest = EXAMPLES / "mtlsgate.yaml"
    first = control_plane.cli("apply", "-f", str(manifest), check=True).stdout.splitlines()
    assert first == ["trustconfig/demo created", "certificate/edge created", "servertlspolicy/strict created",
                     "servertlspolicy/permissive created", "listener/strict created", "listener/permissive created"]
    second = control_plane.cli("apply", "-f", str(manifest), check=True).stdout.splitlines()
    assert all(line.endswith(" unchanged") for line in second) and len(second) == 6

    edited = tmp_path / "m" / "edited.yaml"
    edited.parent.mkdir()
    edited.write_text(manifest.read_text().replace("port: 8444", "port: 9444"))
    third = control_plane.cli("apply", "-f", str(edited.parent), check=True).stdout.splitlines()
    assert "listener/permissive configured" in third and "listener/strict unchanged" in third

    cert = json.loads(control_plane.cli("get", "certificates", "edge", "-o", "json", check=True).stdout)
    assert "pemPrivateKey" not in cert
    key = serialization.load_pem_private_key((EXAMPLES / "pki" / "server-key.pem").read_bytes(), None)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    assert cert["privateKeySha256"] == digest.finalize().hex()
    assert "PRIVATE KEY" not in control_plane.cli("get", "certificates", "-o", "yaml", check=True).stdout

    table = control_plane.cli("get", "listeners", check=True).stdout
    assert table.splitlines()[0].split() == ["NAME", "PORT", "CERTIFICATE", "POLICY", "BACKEND", "NODES", "AGE"]
    assert "permissive  9444" in table
    listed = json.loads(control_plane.cli("get", "listener", "-o", "json", check=True).stdout)
    assert [item["name"] for item in listed] == ["listeners/permissive", "listeners/strict"]

    audit = json.loads(control_plane.cli("audit", "listeners/permissive", "-o", "json", check=True).stdout)
    assert [e["method"] for e in audit] == ["CREATE", "UPDATE"]
    assert audit[1]["etagBefore"] == audit[0]["etagAfter"] != audit[1]["etagAfter"]
    assert audit[0]["actor"] == "peer:127.0.0.1"


def test_delete_and_cli_errors(control_plane: ControlPlane) -> None:
    control_plane.cli("apply", "-f", str(EXAMPLES / "mtlsgate.yaml"), check=True)
    refused = control_plane.cli("delete", "trust-config", "demo")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "mtlsgate delete: FAILED_PRECONDITION: name: trustConfigs/demo is still referenced by "
        "serverTlsPolicies/permissive (mtlsPolicy.clientValidationTrustConfig), serverTlsPolicies/strict "
        "(mtlsPolicy.clientValidationTrustConfig); change or delete those first")
    assert control_plane.cli("delete", "listener", "strict", check=True).stdout.strip() == "listener/strict deleted"
    missing = control_plane.cli("get", "listener", "strict")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    bad_kind = control_plane.cli("get", "widgets")
    assert bad_kind.returncode == 2 and "unknown kind 'widgets'" in bad_kind.stderr
    bad_name = control_plane.cli("get", "listener", "Strict_1")
    assert bad_name.returncode == 2 and "invalid resource id 'Strict_1'" in bad_name.stderr
    unreachable = control_plane.cli("get", "listeners", env={"MTLSGATE_SERVER": "127.0.0.1:1"})
    assert unreachable.returncode == 1 and "cannot reach the control plane at 127.0.0.1:1" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1


def test_update_mask_and_write_only_key(control_plane: ControlPlane, tmp_path: Path) -> None:
    from mtlsgate.v1 import api_pb2, resources_pb2

    from tests.control_plane.conftest import Api

    control_plane.cli("apply", "-f", str(EXAMPLES / "mtlsgate.yaml"), check=True)
    # `get -o yaml`, edit, apply: the key is not in the file, and the stored key is kept.
    exported = control_plane.cli("get", "certificate", "edge", "-o", "yaml", check=True).stdout
    edited = tmp_path / "edge.yaml"
    edited.write_text(exported.replace("description: the demo", "description: edited, the demo"))
    assert control_plane.cli("apply", "-f", str(edited), check=True).stdout.strip() == "certificate/edge configured"
    api = Api(control_plane.address)
    try:
        cert = api.certificates.GetCertificate(api_pb2.GetResourceRequest(name="edge"))
        assert cert.description.startswith("edited") and cert.private_key_sha256 and not cert.pem_private_key
        listener = api.listeners.UpdateListener(api_pb2.UpdateListenerRequest(
            listener=resources_pb2.Listener(name="listeners/strict", port=9443, backend="ignored:1"),
            update_mask={"paths": ["port"]}))
        assert (listener.port, listener.backend) == (9443, "127.0.0.1:9000")
    finally:
        api.close()


def test_apply_dry_run_writes_nothing(control_plane: ControlPlane) -> None:
    manifest = str(EXAMPLES / "mtlsgate.yaml")
    lines = control_plane.cli("apply", "-f", manifest, "--dry-run", check=True).stdout.splitlines()
    assert lines[0] == "trustconfig/demo created (dry run)"
    assert lines[-1] == "listener/permissive created (dry run, validated locally)"
    assert control_plane.cli("audit", check=True).stdout.strip() == "No audit entries."
    control_plane.cli("apply", "-f", manifest, check=True)
    lines = control_plane.cli("apply", "-f", manifest, "--dry-run", check=True).stdout.splitlines()
    assert lines == [line.replace("created", "unchanged") for line in
                     ["trustconfig/demo created (dry run)", "certificate/edge created (dry run)",
                      "servertlspolicy/strict created (dry run)", "servertlspolicy/permissive created (dry run)",
                      "listener/strict created (dry run)", "listener/permissive created (dry run)"]]
