"""A newcomer's path from a clean clone: `pip install .` into a fresh venv, `mtlsgate --help`, start the
control plane, import the example files that ship in `examples/`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Proc, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_clean_clone_install_and_first_steps(tmp_path: Path, logs_dir: Path) -> None:
    clone = tmp_path / "mtlsgate"
    _run(["git", "clone", "--quiet", str(REPO), str(clone)])
    assert not list((clone / "proto").rglob("*_pb2.py")), "generated code must not be committed"
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([str(venv / "bin" / "pip"), "install", "-q", str(clone)], env=env, cwd=tmp_path)
    mtlsgate = str(venv / "bin" / "mtlsgate")

    help_text = _run([mtlsgate, "--help"], env=env, cwd=tmp_path).stdout
    for command in ("control-plane", "apply", "import", "get", "delete", "audit", "pki"):
        assert command in help_text

    address = f"127.0.0.1:{free_port()}"
    proc = Proc([mtlsgate, "control-plane", "--listen", address, "--db", str(tmp_path / "cp.db"), "--insecure"],
                logs_dir / "newcomer-control-plane.log", env=env, cwd=tmp_path, mtlsgate=False)
    try:
        wait_until(lambda: "serving on" in proc.log(), timeout=60, message="the control plane's ready line")
        client_env = {**env, "MTLSGATE_SERVER": address}
        examples = clone / "examples" / "pki"
        out = _run([mtlsgate, "import", "trust-config", "demo", "--source", str(examples / "trust-config.yaml")],
                   env=client_env, cwd=tmp_path).stdout
        assert out.strip() == "trustconfig/demo created"
        out = _run([mtlsgate, "import", "server-tls-policy", "strict", "--source",
                    str(examples / "server-tls-policy.yaml")], env=client_env, cwd=tmp_path).stdout
        assert out.strip() == "servertlspolicy/strict created"
        table = _run([mtlsgate, "get", "server-tls-policies"], env=client_env, cwd=tmp_path).stdout
        assert "strict  REJECT_INVALID  demo" in table
    finally:
        proc.stop()
