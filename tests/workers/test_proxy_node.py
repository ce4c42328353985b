"""`mtlsgate proxy` with its WorkerPool as a real process (started from its cache dir, the control plane
unreachable), exercised with `curl --cert` and `openssl s_client`; SIGTERM drains and stops the workers."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from control_plane.pki import DemoPki
from data_plane.node.agent import save_cached
from tests.support import Proc, free_port, port_open, wait_until
from tests.workers.conftest import RecordingBackend, listener, node_config, policy

pytestmark = pytest.mark.skipif(not shutil.which("curl") or not shutil.which("openssl"),
                                reason="needs curl and openssl (apt-get install curl openssl)")


def _admin(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return resp.read().decode()


def _curl(pki: DemoPki, port: int, who: str | None) -> subprocess.CompletedProcess[str]:
    args = ["curl", "-sS", "--max-time", "5", "--cacert", str(pki.path("ca_cert")),
            f"https://localhost:{port}/hello", "--resolve", f"localhost:{port}:127.0.0.1"]
    if who:
        args += ["--cert", str(pki.path(f"{who}_cert")), "--key", str(pki.path(f"{who}_key"))]
    return subprocess.run(args, capture_output=True, text=True, timeout=20)


def test_proxy_node_serves_rejects_reports_and_drains(demo_pki: DemoPki, backend: RecordingBackend,
                                                       tmp_path: Path, logs_dir: Path) -> None:
    port, admin = free_port(), free_port()
    save_cached(tmp_path / "cache", node_config(demo_pki, [
        listener("strict", port, backend.address, policy("REJECT_INVALID"))]))
    proxy = Proc(["proxy", "--server", f"127.0.0.1:{free_port()}", "--node-id", "n1", "--workers", "2",
                  "--admin", f"127.0.0.1:{admin}", "--cache-dir", str(tmp_path / "cache"),
                  "--listen-address", "127.0.0.1"], logs_dir / "proxy.log")
    try:
        wait_until(lambda: _admin(admin, "/ready").startswith("LIVE"), timeout=30, message="node ready")
        ok = _curl(demo_pki, port, "client")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["headers"]["x-client-cert-chain-verified"] == "true"

        refused = _curl(demo_pki, port, "revoked")
        assert refused.returncode != 0 and "revoked" in refused.stderr.lower()
        s_client = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(demo_pki.path("ca_cert")),
             "-cert", str(demo_pki.path("expired_cert")), "-key", str(demo_pki.path("expired_key")), "-ign_eof"],
            input="GET / HTTP/1.1\r\nHost: x\r\n\r\n", capture_output=True, text=True, timeout=20)
        assert "certificate expired" in (s_client.stdout + s_client.stderr)

        expected = ['mtlsgate_handshakes_total{error="client_cert_revoked",listener="listeners/strict",result="rejected"}',
                    'mtlsgate_requests_total{code="200",listener="listeners/strict"}']
        wait_until(lambda: all(line in _admin(admin, "/metrics") for line in expected),
                   message="worker counters (pushed every second) on the node's /metrics")
        dump = json.loads(_admin(admin, "/config_dump"))
        assert [w["worker"] for w in dump["workers"]] == [0, 1]
        assert all(w["alive"] and "listeners/strict" in w["listeners"] for w in dump["workers"])
        assert "PRIVATE KEY" not in json.dumps(dump)
        assert '"client_rejected"' in proxy.log() and "client_cert_revoked" in proxy.log()
    finally:
        code = proxy.stop(timeout=20)
    assert code == 0, proxy.log()[-2000:]
    assert not port_open("127.0.0.1", port)
