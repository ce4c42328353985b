"""The CRL rotation story end to end (issue 5 "Show"): a real control plane, `mtlsgate apply`, a real
`mtlsgate proxy` node with 2 workers, real clients. The revoked client's open connection is closed
(revalidateOnUpdate), its next handshake fails, a valid client loop sees no failure, no worker restarts."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from control_plane.pki import DemoPki
from tests.control_plane.harness import start_control_plane
from tests.support import MTLSGATE, Proc, free_port, wait_until
from tests.workers.conftest import RecordingBackend, client_context, http_roundtrip, https_get
from tests.workers.test_hot_reload import _ClientLoop, _closed_by_server

pytestmark = pytest.mark.slow


def _block(pem: str, indent: int = 6) -> str:
    return "|\n" + "".join(" " * indent + line + "\n" for line in pem.strip().splitlines())


def _manifest(pki: DemoPki, port: int, backend: str, crl_name: str) -> str:
    return (
        "kind: TrustConfig\nname: demo\ntrustStores:\n- trustAnchors:\n"
        f"  - pemCertificate: {_block(pki.path('ca_cert').read_text())}"
        "  intermediateCas:\n"
        f"  - pemCertificate: {_block(pki.path('intermediate_cert').read_text())}"
        "  crls:\n"
        f"  - pemCrl: {_block(pki.path(crl_name).read_text())}"
        "---\nkind: ServerTlsPolicy\nname: strict\nmtlsPolicy:\n  clientValidationMode: REJECT_INVALID\n"
        "  clientValidationTrustConfig: trustConfigs/demo\n  revalidateOnUpdate: true\n"
        "---\nkind: Certificate\nname: edge\n"
        f"pemCertificate: {_block(pki.path('server_cert').read_text(), 2)}"
        f"pemPrivateKey: {_block(pki.path('server_key').read_text(), 2)}"
        f"---\nkind: Listener\nname: strict\nport: {port}\ncertificate: certificates/edge\n"
        f"serverTlsPolicy: serverTlsPolicies/strict\nbackend: {backend}\n"
    )


def _apply(server: str, path: Path) -> None:
    done = subprocess.run([*MTLSGATE, "apply", "-f", str(path), "--server", server],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _dump(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=2) as resp:
        return json.loads(resp.read())


def test_crl_rotation_through_the_control_plane(demo_pki: DemoPki, backend: RecordingBackend, tmp_path: Path,
                                                logs_dir: Path) -> None:
    cp, server = start_control_plane(tmp_path, logs_dir)
    port, admin = free_port(), free_port()
    manifest = tmp_path / "mtlsgate.yaml"
    manifest.write_text(_manifest(demo_pki, port, backend.address, "empty_crl"))
    _apply(server, manifest)
    node = Proc(["proxy", "--server", server, "--node-id", "node-a", "--workers", "2", "--admin",
                 f"127.0.0.1:{admin}", "--listen-address", "127.0.0.1"], logs_dir / "node-a.log")
    try:
        wait_until(lambda: https_get(port, client_context(demo_pki, "client"))[0] == 200, timeout=30,
                   message="the node serves the listener")
        pids = sorted(w["pid"] for w in _dump(admin)["workers"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        revoked_conn = client_context(demo_pki, "revoked").wrap_socket(raw, server_hostname="localhost")
        assert http_roundtrip(revoked_conn)[0] == 200

        loop = _ClientLoop(port, client_context(demo_pki, "client"))
        loop.start()
        wait_until(lambda: loop.ok >= 5, message="valid client loop running")
        manifest.write_text(_manifest(demo_pki, port, backend.address, "crl"))
        applied = time.monotonic()
        _apply(server, manifest)
        wait_until(lambda: _closed_by_server(revoked_conn), timeout=5, interval=0.01,
                   message="the revoked client's open connection is closed")
        closed_after = time.monotonic() - applied
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
            https_get(port, client_context(demo_pki, "revoked"))
        ok_then = loop.ok
        wait_until(lambda: loop.ok >= ok_then + 5, message="the valid client is still served")
        loop.stop.set()
        loop.join(10)
        revoked_conn.close()
        assert loop.failures == []
        assert sorted(w["pid"] for w in _dump(admin)["workers"]) == pids
        print(f"revoked connection closed {closed_after:.3f}s after `mtlsgate apply` started")
    finally:
        node.stop(timeout=20)
        cp.stop()
