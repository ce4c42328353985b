"""CLI contexts (SPEC §8) against a control plane started the secure way: a context supplies server, CA,
client certificate/key and token; flags override it; --context and MTLSGATE_CONTEXT choose another; the
file is private to its owner and never the real ~/.config in tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from control_plane.cli.contexts import config_path
from tests.control_plane.secure_harness import ADMIN, CaPki, SecureControlPlane
from tests.support import MTLSGATE

TOKEN = "context-token-0123456789abcdef"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("MTLSGATE_SERVER", "MTLSGATE_TOKEN")}
    return subprocess.run([*MTLSGATE, *args], capture_output=True, text=True, timeout=60, env={**full, **(env or {})})


def test_config_path_follows_mtlsgate_config_then_home() -> None:
    assert config_path({"MTLSGATE_CONFIG": "/x/c.yaml", "HOME": "/h"}) == Path("/x/c.yaml")
    assert config_path({"HOME": "/h"}) == Path("/h/.config/mtlsgate/config.yaml")


def test_contexts_supply_credentials_and_flags_override(tmp_path: Path, logs_dir: Path) -> None:
    pki = CaPki(tmp_path / "pki")
    cp = SecureControlPlane.start(pki, tmp_path, logs_dir, tokens={TOKEN: "ci"},
                                  authz=f'bindings: [{{identity: "{ADMIN}", role: admin}}, {{identity: ci, role: viewer}}]')
    try:
        cert, key = pki.client(ADMIN)
        viewer_cert, viewer_key = pki.client("spiffe://test.mtlsgate/ops/nobody")
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        made = _cli("config", "set-context", "lab", "--server", cp.address, "--ca-cert", str(pki.ca_path),
                    "--cert", str(cert), "--key", str(key), "--use")
        assert made.returncode == 0 and made.stdout.strip() == 'Context "lab" created and made current.'
        assert _cli("config", "set-context", "ci", "--server", cp.address, "--ca-cert", str(pki.ca_path),
                    "--cert", str(viewer_cert), "--key", str(viewer_key), "--token-file",
                    str(token_file)).returncode == 0
        config = Path(os.environ["MTLSGATE_CONFIG"])
        assert config.stat().st_mode & 0o777 == 0o600
        assert yaml.safe_load(config.read_text())["currentContext"] == "lab"

        manifest = tmp_path / "tc.yaml"
        manifest.write_text("kind: TrustConfig\nname: t\n")
        assert _cli("apply", "-f", str(manifest)).stdout.strip() == "trustconfig/t created"  # no flags at all
        assert "t" in _cli("get", "trust-configs").stdout
        # The ci context authenticates with its token (viewer): reads yes, writes no.
        assert _cli("status", "--context", "ci").returncode == 0
        denied = _cli("delete", "trust-configs", "t", env={"MTLSGATE_CONTEXT": "ci"})
        assert denied.returncode == 1 and "ci has role viewer" in denied.stderr
        # Flags override the context: a wrong --server is used, not the context's.
        moved = _cli("get", "trust-configs", "--server", "127.0.0.1:1")
        assert moved.returncode == 1 and "127.0.0.1:1" in moved.stderr
        unknown = _cli("get", "trust-configs", "--context", "nope")
        assert unknown.returncode == 2 and "context 'nope' (--context) is not in" in unknown.stderr

        listing = _cli("config", "get-contexts").stdout.splitlines()
        assert listing[0].split() == ["CURRENT", "NAME", "SERVER", "CLIENT", "CERT", "TOKEN"]
        assert listing[1].split()[:2] == ["ci", cp.address] and listing[2].split()[:2] == ["*", "lab"]
        assert _cli("config", "use-context", "ci").stdout.strip() == 'Switched to context "ci".'
        assert _cli("config", "delete-context", "ci").returncode == 0
        assert "currentContext" not in yaml.safe_load(config.read_text())
        plain = _cli("get", "trust-configs")  # no context left: the default server, no TLS
        assert plain.returncode == 1
    finally:
        cp.stop()


def test_a_context_with_several_replicas_fails_over_to_the_one_that_answers(tmp_path: Path, logs_dir: Path) -> None:
    """SPEC §14: a context lists several control-plane replicas; the CLI uses the first that accepts a
    (TLS) connection. A refused port and a port that accepts TCP but closes every connection are skipped
    at once, not after the 3 s connect timeout."""
    import socket
    import threading
    import time

    from tests.support import free_port

    pki = CaPki(tmp_path / "pki")
    cp = SecureControlPlane.start(pki, tmp_path, logs_dir)
    closer = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def close_everything() -> None:
        closer.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = closer.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=close_everything, daemon=True)
    thread.start()
    try:
        cert, key = pki.client(ADMIN)
        refused, slammed = f"127.0.0.1:{free_port()}", f"127.0.0.1:{closer.getsockname()[1]}"
        made = _cli("config", "set-context", "ha", "--server", f"{refused}, {slammed},{cp.address}", "--ca-cert",
                    str(pki.ca_path), "--cert", str(cert), "--key", str(key), "--use")
        assert made.returncode == 0, made.stderr
        config = Path(os.environ["MTLSGATE_CONFIG"])
        assert yaml.safe_load(config.read_text())["contexts"]["ha"]["server"] == [refused, slammed, cp.address]
        listing = _cli("config", "get-contexts").stdout
        assert f"{refused},{slammed},{cp.address}" in listing
        started = time.monotonic()
        direct = _cli("status", "-o", "json", "--server", cp.address)
        baseline = time.monotonic() - started
        started = time.monotonic()
        status = _cli("status", "-o", "json")
        took = time.monotonic() - started
        assert direct.returncode == 0 and status.returncode == 0, status.stderr
        # Waiting out the connect timeout would cost 3 s per dead replica: they are skipped at once.
        assert took < baseline + 2.5, f"status took {took:.1f}s, {baseline:.1f}s straight to the live replica"
        # A list written by hand works the same; a bad entry is named, in one line.
        document = yaml.safe_load(config.read_text())
        document["contexts"]["ha"]["server"] = [refused, cp.address]
        config.write_text(yaml.safe_dump(document))
        assert _cli("get", "trust-configs").returncode == 0
        document["contexts"]["ha"]["server"] = [cp.address, "no-port"]
        config.write_text(yaml.safe_dump(document))
        bad = _cli("get", "trust-configs")
        assert bad.returncode == 2 and "contexts.ha.server: " in bad.stderr and "'no-port'" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
        refused_set = _cli("config", "set-context", "x", "--server", "a:1,,b:2")
        assert refused_set.returncode == 2 and "expected HOST:PORT" in refused_set.stderr
    finally:
        stop.set()
        thread.join(5)
        closer.close()
        cp.stop()
