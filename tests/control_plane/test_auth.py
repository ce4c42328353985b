"""API protection: bearer tokens and mTLS client certificates, and who the audit log names."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from mtlsgate.v1 import api_pb2, api_pb2_grpc

from control_plane.pki import DemoPki
from tests.control_plane.conftest import ControlPlane
from tests.control_plane.harness import control_plane_args, health_serving, start_control_plane

TOKEN = "s3cr3t-token-for-alice-0123456789"


def test_bearer_token_is_required_and_names_the_actor(tmp_path: Path, logs_dir: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# operators\n{TOKEN} alice\n")
    proc, address = start_control_plane(tmp_path, logs_dir, ["--token-file", str(token_file)])
    cp = ControlPlane(proc, address, tmp_path / "control-plane.db")
    try:
        assert health_serving(address)  # probes need no token
        denied = cp.cli("get", "trust-configs")
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        wrong = cp.cli("get", "trust-configs", "--token", "not-the-token-at-all")
        assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
        manifest = tmp_path / "tc.yaml"
        manifest.write_text("kind: TrustConfig\nname: t\ndescription: by alice\n")
        cp.cli("apply", "-f", str(manifest), env={"MTLSGATE_TOKEN": TOKEN}, check=True)
        audit = json.loads(cp.cli("audit", "-o", "json", "--token", TOKEN, check=True).stdout)
        assert [e["actor"] for e in audit] == ["alice"]
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                api_pb2_grpc.AuditServiceStub(channel).ListAuditEntries(api_pb2.ListAuditEntriesRequest())
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.stop()


def test_mtls_client_certificates(tmp_path: Path, logs_dir: Path, demo_pki: DemoPki) -> None:
    ca_bundle = tmp_path / "ca-bundle.pem"  # the server's chain ends at the intermediate: trust the root
    ca_bundle.write_text(demo_pki.path("ca_cert").read_text())
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_bundle.read_bytes(), private_key=demo_pki.path("client_key").read_bytes(),
        certificate_chain=demo_pki.path("client_cert").read_bytes())
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_text(demo_pki.path("ca_cert").read_text() + demo_pki.path("intermediate_cert").read_text())
    proc, address = start_control_plane(
        tmp_path, logs_dir, ["--tls-cert", str(demo_pki.path("server_cert")), "--tls-key",
                             str(demo_pki.path("server_key")), "--client-ca", str(client_ca)], credentials=creds,
        insecure=False)
    cp = ControlPlane(proc, address, tmp_path / "control-plane.db")
    tls = ["--ca-cert", str(ca_bundle)]
    client = [*tls, "--cert", str(demo_pki.path("client_cert")), "--key", str(demo_pki.path("client_key"))]
    try:
        manifest = tmp_path / "tc.yaml"
        manifest.write_text("kind: TrustConfig\nname: t\n")
        assert cp.cli("apply", "-f", str(manifest), *client, check=True).stdout.strip() == "trustconfig/t created"
        audit = json.loads(cp.cli("audit", "-o", "json", *client, check=True).stdout)
        assert audit[0]["actor"] == "spiffe://demo.mtlsgate/client/valid"
        no_cert = cp.cli("get", "trust-configs", *tls)
        assert no_cert.returncode == 1 and "UNAVAILABLE" not in no_cert.stdout
        untrusted = cp.cli("get", "trust-configs", *tls, "--cert", str(demo_pki.path("untrusted_cert")),
                           "--key", str(demo_pki.path("untrusted_key")))
        assert untrusted.returncode == 1
        plaintext = cp.cli("get", "trust-configs")
        assert plaintext.returncode == 1
        half = cp.cli("get", "trust-configs", "--cert", str(demo_pki.path("client_cert")))
        assert half.returncode == 2 and "--cert and --key go together" in half.stderr
    finally:
        proc.stop()


def test_token_file_errors(tmp_path: Path) -> None:
    import subprocess

    from tests.support import MTLSGATE, free_port

    short = tmp_path / "short"
    short.write_text("abc\n")
    result = subprocess.run([*MTLSGATE, *control_plane_args(f"127.0.0.1:{free_port()}", tmp_path / "x.db",
                                                            ["--token-file", str(short)])],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == f"mtlsgate control-plane: {short}:1: token too short (at least 16 characters)"
