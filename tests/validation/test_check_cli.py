"""`mtlsgate check` as a user runs it: offline on the `pki init` files, and live against a real
control-plane process over gRPC (CheckService)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from mtlsgate.v1 import api_pb2, api_pb2_grpc

from control_plane.pki import DemoPki
from tests.control_plane.harness import start_control_plane
from tests.support import MTLSGATE, free_port


def mtlsgate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTLSGATE, *map(str, args)], capture_output=True, text=True, timeout=60)


def offline(pki: DemoPki, cert: str, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return mtlsgate(
        "check",
        "--cert",
        pki.path(cert),
        "--trust-config",
        pki.path("trust_config"),
        "--policy",
        pki.path("server_tls_policy"),
        *extra,
    )


@pytest.mark.parametrize(
    "cert, code, error, reason",
    [
        ("client_cert", 0, "", ""),
        ("revoked_cert", 1, "client_cert_revoked", "revoked"),
        ("expired_cert", 1, "client_cert_validation_failed", "expired"),
        ("wrong_eku_cert", 1, "client_cert_chain_invalid_eku", "leaf_eku"),
        ("untrusted_cert", 1, "client_cert_validation_failed", "unknown_issuer"),
    ],
)
def test_offline_demo_certificates(demo_pki: DemoPki, cert: str, code: int, error: str, reason: str) -> None:
    result = offline(demo_pki, cert, "-o", "json")
    assert result.returncode == code, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"present", "chain_verified", "error", "reason", "headers"}
    assert (out["present"], out["chain_verified"], out["error"], out["reason"]) == (
        True,
        code == 0,
        error,
        reason,
    )
    assert out["headers"]["X-Client-Cert-Error"] == error
    assert len(out["headers"]) == 14


def test_offline_at_and_text_output(demo_pki: DemoPki) -> None:
    later = offline(demo_pki, "client_cert", "--at", "2040-01-01T00:00:00Z")
    assert later.returncode == 1
    assert "reason:         expired" in later.stdout
    assert "X-Client-Cert-Present: true" in later.stdout


def test_offline_allow_mode_accepts_everything(demo_pki: DemoPki, tmp_path: Path) -> None:
    policy = tmp_path / "allow.yaml"
    policy.write_text("mtlsPolicy:\n  clientValidationMode: ALLOW_INVALID_OR_MISSING_CLIENT_CERT\n")
    result = mtlsgate(
        "check",
        "--cert",
        demo_pki.path("revoked_cert"),
        "--trust-config",
        demo_pki.path("trust_config"),
        "--policy",
        policy,
        "-o",
        "json",
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["error"] == "client_cert_revoked"


def test_offline_listener_header_set(demo_pki: DemoPki, tmp_path: Path) -> None:
    listener = tmp_path / "listener.yaml"
    listener.write_text(
        "kind: Listener\nport: 8443\ncustomRequestHeaders:\n- 'X-Who:{client_cert_spiffe_id}'\n"
    )
    result = offline(demo_pki, "client_cert", "--listener", listener, "-o", "json")
    assert json.loads(result.stdout)["headers"] == {"X-Who": "spiffe://demo.mtlsgate/client/valid"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--at", "yesterday"], "--at 'yesterday': not an RFC 3339 time"),
        (["--at", "2030-01-01T00:00:00"], "give a UTC offset"),
    ],
)
def test_offline_usage_errors(demo_pki: DemoPki, args: list[str], message: str) -> None:
    result = offline(demo_pki, "client_cert", *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_policy_file_without_trust_config(demo_pki: DemoPki) -> None:
    result = mtlsgate(
        "check", "--cert", demo_pki.path("client_cert"), "--policy", demo_pki.path("server_tls_policy")
    )
    assert result.returncode == 2 and "offline mode also needs --trust-config FILE" in result.stderr


def test_offline_input_errors(demo_pki: DemoPki, tmp_path: Path) -> None:
    bad_policy = tmp_path / "bad.yaml"
    bad_policy.write_text(
        "mtlsPolicy:\n  clientValidationMode: REJECT_INVALID\n  matchSubjectAltNames:\n  - dns: '(a'\n"
    )
    result = mtlsgate(
        "check",
        "--cert",
        demo_pki.path("client_cert"),
        "--trust-config",
        demo_pki.path("trust_config"),
        "--policy",
        bad_policy,
    )
    assert result.returncode == 2
    assert "mtlsPolicy.matchSubjectAltNames[0].dns: invalid RE2 pattern" in result.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text("mtlsPolicy:\n  clientValidationMod: REJECT_INVALID\n")
    result = mtlsgate(
        "check",
        "--cert",
        demo_pki.path("client_cert"),
        "--trust-config",
        demo_pki.path("trust_config"),
        "--policy",
        typo,
    )
    assert result.returncode == 2
    assert result.stderr == (f"mtlsgate check: {typo} servertlspolicy/x: mtlsPolicy.clientValidationMod: unknown "
                             "field; did you mean clientValidationMode?\n") or result.stderr == (
        f"mtlsgate check: {typo}: mtlsPolicy.clientValidationMod: unknown field; did you mean "
        "clientValidationMode?\n")


def check_chain(pki: DemoPki, chain: Path | str, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return mtlsgate("check", "--cert", chain, "--trust-config", pki.path("trust_config"), "--policy",
                    pki.path("server_tls_policy"), *extra)


def test_chain_file_problems_in_words(demo_pki: DemoPki, tmp_path: Path) -> None:
    """Each was a library message or a silent wrong answer before (see docs/api.md, Input errors)."""
    key = demo_pki.path("client_key")
    # before: cryptography's FAQ URL and MalformedFraming
    result = check_chain(demo_pki, key)
    assert (result.returncode, result.stderr) == (2, f"mtlsgate check: {key}: PEM block 1 (line 1) is a private "
                                                  "key where a certificate was expected; --chain takes "
                                                  "certificates only, the client's first (its key is not "
                                                  "needed)\n")
    assert "PRIVATE" not in result.stderr and "BEGIN" not in result.stderr
    # a chain with the key appended (a common `cat` mistake)
    both = tmp_path / "both.pem"
    both.write_text(demo_pki.path("client_cert").read_text() + key.read_text())
    result = check_chain(demo_pki, both)
    assert result.returncode == 2 and "PEM block 3 (line " in result.stderr and "is a private key" in result.stderr
    # before: silently took the first PEM block of the YAML manifest (the CA) and reported leaf_is_ca
    manifest = tmp_path / "mtlsgate.yaml"
    manifest.write_text("kind: TrustConfig\nname: demo\ntrustStores:\n- trustAnchors:\n  - pemCertificate: |\n"
                        + "".join("      " + line + "\n" for line in demo_pki.path("ca_cert").read_text().splitlines()))
    result = check_chain(demo_pki, manifest)
    assert (result.returncode, result.stderr) == (2, f"mtlsgate check: {manifest}: its PEM blocks are indented "
                                                  "inside other text (from line 6): a YAML manifest? --chain "
                                                  "takes a PEM file: the client's certificate, then its "
                                                  "intermediates\n")
    # a CA first
    ca = demo_pki.path("ca_cert")
    result = check_chain(demo_pki, ca)
    assert (result.returncode, result.stderr) == (2, f"mtlsgate check: {ca}: the first certificate (CN=mtlsgate "
                                                  "demo root CA,O=mtlsgate demo) is a CA, not a client "
                                                  "certificate; put the client's own certificate first, then "
                                                  "its intermediates\n")
    # garbage inside a PEM frame; before: not a PEM certificate (error parsing asn1 value: ParseError …)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nMIIBCgKCAQEA\n-----END CERTIFICATE-----\n")
    result = check_chain(demo_pki, garbage)
    assert (result.returncode, result.stderr) == (2, "mtlsgate check: certificate chain: truncated DER (the PEM "
                                                  "block holds 9 bytes; its DER header announces 270)\n")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    result = check_chain(demo_pki, text)
    assert (result.returncode, result.stderr) == (2, "mtlsgate check: certificate chain: not a PEM block (no "
                                                  "-----BEGIN CERTIFICATE----- line)\n")
    cut = tmp_path / "cut.pem"
    cut.write_text(demo_pki.path("client_cert").read_text()[:300])
    result = check_chain(demo_pki, cut)
    assert (result.returncode, result.stderr) == (2, "mtlsgate check: certificate chain: truncated PEM: -----BEGIN "
                                                  "CERTIFICATE----- has no matching -----END CERTIFICATE----- "
                                                  "line\n")


def test_offline_mode_given_a_resource_name(demo_pki: DemoPki) -> None:
    # before: cannot read policy serverTlsPolicies/strict: No such file or directory
    result = mtlsgate("check", "--cert", demo_pki.path("client_cert"), "--trust-config",
                      demo_pki.path("trust_config"), "--policy", "serverTlsPolicies/strict")
    assert (result.returncode, result.stderr) == (2, "mtlsgate check: --policy serverTlsPolicies/strict: a resource "
                                                  "name, but offline mode (--trust-config FILE) takes a "
                                                  "ServerTlsPolicy YAML file; to check against the "
                                                  "serverTlsPolicies/strict stored in the control plane, drop "
                                                  "--trust-config\n")
    result = mtlsgate("check", "--cert", demo_pki.path("client_cert"), "--trust-config", "nope.yaml",
                      "--policy", demo_pki.path("server_tls_policy"))
    assert (result.returncode, result.stderr) == (2, "mtlsgate check: cannot read --trust-config nope.yaml: No such "
                                                  "file or directory\n")


def test_chain_flag_and_connection_flag_names(demo_pki: DemoPki) -> None:
    chain = demo_pki.path("client_cert")
    assert check_chain(demo_pki, chain).returncode == 0  # --cert CHAIN without --key: the chain (SPEC §4)
    result = mtlsgate("check", "--chain", chain, "--trust-config", demo_pki.path("trust_config"), "--policy",
                      demo_pki.path("server_tls_policy"))
    assert result.returncode == 0, result.stderr
    # --cert with --key is the connection identity, as in every other command: then --chain is required
    result = mtlsgate("check", "--cert", chain, "--key", demo_pki.path("client_key"), "--policy", "strict")
    assert (result.returncode, result.stderr) == (2, "mtlsgate check: --chain CHAIN.pem is required (the client's "
                                                  "certificate chain to check)\n")


# ---------------------------------------------------------------- live: a real control plane


@pytest.fixture
def control_plane(tmp_path: Path, logs_dir: Path, demo_pki: DemoPki) -> Iterator[str]:
    """A real control plane holding the demo trust config and policy, imported the way a user would."""
    proc, address = start_control_plane(tmp_path, logs_dir)
    try:
        for kind, name, source in (
            ("trust-config", "demo", "trust_config"),
            ("server-tls-policy", "strict", "server_tls_policy"),
        ):
            result = mtlsgate("import", kind, name, "--source", demo_pki.path(source), "--server", address)
            assert result.returncode == 0, result.stderr
        plain = tmp_path / "plain.yaml"
        plain.write_text("description: plain TLS\n")
        assert (
            mtlsgate(
                "import", "server-tls-policy", "plain", "--source", plain, "--server", address
            ).returncode
            == 0
        )
        yield address
    finally:
        proc.stop()


@pytest.mark.slow
def test_live_check_against_a_control_plane(control_plane: str, demo_pki: DemoPki) -> None:
    def live(cert: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return mtlsgate(
            "check",
            "--cert",
            demo_pki.path(cert),
            "--policy",
            "serverTlsPolicies/strict",
            "--server",
            control_plane,
            *extra,
        )

    ok = live("client_cert", "-o", "json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["headers"]["X-Client-Cert-SPIFFE"] == "spiffe://demo.mtlsgate/client/valid"
    # The same verdict as offline, for every demo certificate.
    for cert in ("revoked_cert", "expired_cert", "untrusted_cert"):
        result = live(cert, "-o", "json")
        assert result.returncode == 1
        assert json.loads(result.stdout) == json.loads(offline(demo_pki, cert, "-o", "json").stdout)
        # and the same text, `detail:` line included (before: live check printed no detail)
        text = live(cert)
        assert text.stdout == offline(demo_pki, cert).stdout and "\ndetail:" in text.stdout, text.stdout
    full_name = mtlsgate(
        "check",
        "--cert",
        demo_pki.path("client_cert"),
        "--server",
        control_plane,
        "--policy",
        "projects/p/locations/global/serverTlsPolicies/strict",
        "--at",
        "2040-01-01T00:00:00Z",
    )
    assert full_name.returncode == 1 and "expired" in full_name.stdout
    missing = live("client_cert", "--listener", "listeners/nope")
    assert missing.returncode == 2 and "listeners/nope not found" in missing.stderr
    unknown = mtlsgate(
        "check",
        "--cert",
        demo_pki.path("client_cert"),
        "--policy",
        "serverTlsPolicies/nope",
        "--server",
        control_plane,
    )
    assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr
    plain = mtlsgate(
        "check",
        "--cert",
        demo_pki.path("client_cert"),
        "--policy",
        "serverTlsPolicies/plain",
        "--server",
        control_plane,
    )
    assert plain.returncode == 2 and "no mtlsPolicy" in plain.stderr


@pytest.mark.slow
def test_check_service_errors_over_grpc(control_plane: str, demo_pki: DemoPki) -> None:
    with grpc.insecure_channel(control_plane) as channel:
        stub = api_pb2_grpc.CheckServiceStub(channel)
        none = stub.Check(api_pb2.CheckRequest(policy="serverTlsPolicies/strict"), timeout=10)
        assert (none.present, none.error, none.accepted) == (False, "client_cert_not_provided", False)
        assert {h.name: h.value for h in none.headers}["X-Client-Cert-Present"] == "false"
        with pytest.raises(grpc.RpcError) as bad_pem:
            stub.Check(
                api_pb2.CheckRequest(
                    policy="serverTlsPolicies/strict", pem_chain="-----BEGIN CERTIFICATE-----\nx"
                ),
                timeout=10,
            )
        assert bad_pem.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as bad_name:
            stub.Check(api_pb2.CheckRequest(policy="trustConfigs/demo"), timeout=10)
        assert bad_name.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_live_unreachable_server_is_an_input_error(demo_pki: DemoPki) -> None:
    result = mtlsgate(
        "check",
        "--cert",
        demo_pki.path("client_cert"),
        "--policy",
        "serverTlsPolicies/strict",
        "--server",
        f"127.0.0.1:{free_port()}",
    )
    assert result.returncode == 2
    assert "cannot reach the control plane" in result.stderr
