"""The `mtlsgate` entry point itself: one-line failures, no tracebacks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import MTLSGATE


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`mtlsgate … | head` must not print a BrokenPipeError traceback when the reader has gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything
    try:
        done = subprocess.run([*MTLSGATE, "pki", "init", str(tmp_path / "pki")], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""
    assert (tmp_path / "pki" / "ca.pem").exists()  # the work itself was done


def test_unknown_command_is_a_usage_error() -> None:
    done = subprocess.run([*MTLSGATE, "no-such-command"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid choice" in done.stderr and "Traceback" not in done.stderr


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTLSGATE, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_version() -> None:
    from importlib.metadata import version

    done = run("--version")
    assert (done.returncode, done.stdout) == (0, f"mtlsgate {version('mtlsgate')}\n")


def test_argument_errors_are_one_line() -> None:
    """Before: argparse's multi-line usage dump, then the error."""
    done = run("apply")
    assert (done.returncode, done.stderr) == (
        2, "mtlsgate apply: the following arguments are required: -f/--filename (see mtlsgate apply --help)\n")
    done = run("status", "-o", "xml")
    assert (done.returncode, done.stderr) == (
        2, "mtlsgate status: argument -o/--output: invalid choice: 'xml' (choose from 'table', 'json') "
        "(see mtlsgate status --help)\n")


def test_file_and_flag_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    """Every place a user hands us a file or a flag: one line naming it, exit 2, no traceback, and (apply,
    import) before any connection is attempted: the server here does not exist."""
    occupied = tmp_path / "a-file"
    occupied.write_text("x")
    typo = tmp_path / "typo.yaml"
    typo.write_text("kind: Listener\nname: public\nport: 8443\nbackendd: 127.0.0.1:9000\n")
    gcp = tmp_path / "tc.yaml"
    gcp.write_text("trustStores:\n- trustAnchors:\n  - pemCertificate: hello\n")
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
    cases = [
        (["pki", "revoke", key, "--dir", tmp_path], f"mtlsgate pki: {key}: a private key where a certificate "
         "was expected"),
        (["pki", "init", occupied], f"mtlsgate pki: cannot write the demo PKI to {occupied}: File exists"),
        (["demo", "--node-addresses", "a,b"], "mtlsgate demo: --node-addresses: 'a' is not an IP address "
         "(e.g. 127.0.0.2)"),
        (["demo", "--dir", occupied / "sub", "--prepare-only"], f"mtlsgate demo: --dir {occupied}/sub: Not a "
         "directory"),
        (["apply", "-f", typo, "--server", "127.0.0.1:1"], f"mtlsgate apply: {typo} (document 1) "
         "listener/public: backendd: unknown field; did you mean backend?"),
        (["apply", "-f", tmp_path / "missing.yaml"], f"mtlsgate apply: cannot read {tmp_path}/missing.yaml: "
         "No such file or directory"),
        (["import", "trust-config", "t", "--source", gcp, "--server", "127.0.0.1:1"],
         f"mtlsgate import: {gcp} trustconfig/t: trustStores[0].trustAnchors[0].pemCertificate: not a PEM "
         "block (no -----BEGIN CERTIFICATE----- line)"),
    ]
    for args, message in cases:
        done = run(*args)
        assert (done.returncode, done.stderr) == (2, message + "\n"), args


def test_tls_flag_files_in_words(tmp_path: Path) -> None:
    """A key given as a certificate, a CRL as a CA, a key that does not match: said before any TLS library
    sees them (before: "Failed to bind to address" with gRPC's C-core log lines, or "cannot reach the
    control plane" once the handshake failed)."""
    assert run("pki", "init", tmp_path).returncode == 0
    key, cert, ca, crl = (tmp_path / n for n in ("server-key.pem", "server.pem", "ca.pem", "crl.pem"))
    other_key = tmp_path / "client-key.pem"
    done = run("control-plane", "--listen", "127.0.0.1:1", "--db", tmp_path / "x.db", "--tls-cert", key,
               "--tls-key", key, "--client-ca", ca)
    assert (done.returncode, done.stderr) == (
        1, f"mtlsgate control-plane: --tls-cert {key}: a private key where a certificate was expected\n")
    done = run("control-plane", "--listen", "127.0.0.1:1", "--db", tmp_path / "x.db", "--tls-cert", cert,
               "--tls-key", other_key, "--client-ca", ca)
    assert (done.returncode, done.stderr) == (
        1, f"mtlsgate control-plane: --tls-key {other_key}: does not match the certificate's public key\n")
    done = run("get", "listeners", "--server", "127.0.0.1:1", "--ca-cert", crl)
    assert (done.returncode, done.stderr) == (
        2, f"mtlsgate get: --ca-cert {crl}: a CRL where a CA certificate was expected\n")
    done = run("proxy", "--server", "127.0.0.1:1", "--node-id", "n", "--xds-ca", ca, "--xds-cert", key,
               "--xds-key", key)
    assert (done.returncode, done.stderr) == (
        2, f"mtlsgate proxy: --xds-cert {key}: a private key where a certificate was expected\n")


def test_proxy_bounds_errors_are_one_line() -> None:
    done = subprocess.run([*MTLSGATE, "proxy", "--server", "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "MTLSGATE_PROXY_BOUNDS": "head_timeout=soon"})
    assert (done.returncode, done.stderr.strip()) == (
        2, "mtlsgate proxy: MTLSGATE_PROXY_BOUNDS: head_timeout='soon' is not a number")
    done = run("proxy", "--server", "127.0.0.1:1", "--max-connections-per-ip", "0")
    assert (done.returncode, done.stderr.strip()) == (2, "mtlsgate proxy: --max-connections-per-ip must be at least 1")
