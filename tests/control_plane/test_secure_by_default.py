"""Secure by default (SPEC §8): a control plane that cannot authenticate nodes and API callers refuses to
start and names the missing flags; `--insecure` is the only way around it, only on loopback, and loud."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.control_plane.harness import control_plane_args, start_control_plane
from tests.support import MTLSGATE, free_port

TOKEN = "s3cr3t-token-for-alice-0123456789"


def _start(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTLSGATE, *args], capture_output=True, text=True, timeout=30)


def test_token_file_alone_is_refused_naming_client_ca(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} alice\n")
    db = tmp_path / "cp.db"
    result = _start(control_plane_args(f"127.0.0.1:{free_port()}", db, ["--token-file", str(tokens)],
                                       insecure=False))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("mtlsgate control-plane: refusing to start without authentication: missing --client-ca")
    assert "--tls-cert and --tls-key" in line and "--insecure" in line
    assert not db.exists()  # refused before anything was created


def test_no_flags_at_all_is_refused(tmp_path: Path) -> None:
    result = _start(["control-plane", "--listen", f"127.0.0.1:{free_port()}", "--db", str(tmp_path / "cp.db")])
    assert result.returncode == 1
    assert "missing --client-ca" in result.stderr


def test_insecure_is_refused_on_a_non_loopback_address(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "[::]", "example.org"):
        result = _start(control_plane_args(f"{host}:{free_port()}", tmp_path / "cp.db"))
        assert result.returncode == 1, host
        assert "--insecure is refused on a non-loopback listen address" in result.stderr, host


def test_insecure_on_loopback_warns_loudly(tmp_path: Path, logs_dir: Path) -> None:
    proc, address = start_control_plane(tmp_path, logs_dir)
    try:
        log = proc.log()
        assert f"WARNING: --insecure: authentication is OFF on {address}" in log
        assert "private key" in log
    finally:
        proc.stop()
