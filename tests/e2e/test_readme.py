"""The README's demo section, driven as written: its command blocks are parsed out of README.md and run
one by one in a fresh directory, and what each line's `# comment` promises is checked — so the README
cannot drift from the product. A comment this test does not understand fails it (teach it here)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import Proc, wait_until

REPO = Path(__file__).resolve().parents[2]
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -q . && "


def section(markdown: str, title_prefix: str) -> str:
    match = re.search(rf"^## {re.escape(title_prefix)}.*?$(.*?)(?=^## )", markdown, re.M | re.S)
    assert match, f"README.md has no section starting with '## {title_prefix}'"
    return match.group(1)


def sh_blocks(text: str) -> list[list[str]]:
    return [[line for line in block.splitlines() if line.strip()]
            for block in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)]


def split_comment(line: str) -> tuple[str, str]:
    match = re.match(r"(.*?)\s+#\s*(.*)$", line)
    return (match[1].strip(), match[2].strip()) if match else (line.strip(), "")


def echo_headers(stdout: str) -> dict[str, str]:
    return json.loads(stdout)["headers"]


def check_promise(command: str, comment: str, done: subprocess.CompletedProcess[str]) -> None:
    """What the README's comment says this line does, checked on what it did."""
    said = f"`{command}`  # {comment}\nexit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}"
    if comment.startswith("200"):
        assert done.returncode == 0, said
        headers = echo_headers(done.stdout)
        assert headers["x-client-cert-chain-verified"] == "true" and headers["x-client-cert-present"] == "true", said
    elif comment.startswith("TLS alert"):
        assert done.returncode in (35, 56), said  # curl: handshake failed / connection reset by the alert
    elif comment.startswith("forwarded, X-Client-Cert-Error"):
        assert done.returncode == 0, said
        assert echo_headers(done.stdout)["x-client-cert-error"], said
    elif comment.startswith("rotate the CRL"):
        assert done.returncode == 0, said
        assert "node demo-a acked" in done.stdout and "node demo-b acked" in done.stdout, said
    elif comment.startswith("403: this route requires a verified client certificate"):
        assert done.returncode == 0 and "403 Forbidden: this route requires a verified client certificate: " \
            "client_cert_revoked" in done.stdout, said
    elif comment.startswith("answered by backend b"):
        assert done.returncode == 0, said
        answer = json.loads(done.stdout)
        assert answer["backend"] == "b" and answer["path"] == "/b/", said
    elif comment.startswith("both endpoints of backendServices/echo healthy"):
        rows = [line.split() for line in done.stdout.splitlines() if line.startswith("demo-")]
        assert done.returncode == 0 and len(rows) == 4, said  # 2 nodes x 2 endpoints
        assert all(row[1] == "backendServices/echo" and row[3] == "healthy" for row in rows), said
    elif comment.startswith("every node SYNCED"):
        assert done.returncode == 0, said
        rows = [line.split() for line in done.stdout.splitlines() if line.startswith("demo-")]
        assert len(rows) == 2 and all(row[3] == "SYNCED" for row in rows), said
    else:
        pytest.fail(f"the README promises something this test does not check; teach check_promise: {said}")


def demo_ports_free() -> list[str]:
    taken = []
    for host, port in (("127.0.0.1", 18000), ("127.0.0.1", 9000), ("127.0.0.1", 9001), ("127.0.0.1", 9901), ("127.0.0.1", 9902),
                       ("127.0.0.1", 9900), ("127.0.0.1", 9080),
                       ("127.0.0.2", 8443), ("127.0.0.2", 8444), ("127.0.0.3", 8443), ("127.0.0.3", 8444)):
        with socket.socket() as probe:
            # As the demo's servers do: a connection in TIME_WAIT (e.g. a health check the backend closed)
            # does not keep them from listening, only a listener does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                taken.append(f"{host}:{port}")
    return taken


@pytest.mark.slow
def test_readme_demo_section_as_written(tmp_path: Path) -> None:
    blocks = sh_blocks(section((REPO / "README.md").read_text(), "Try it"))
    assert len(blocks) == 2, blocks
    [start], tries = blocks
    # The install part is what test_newcomer.py runs from a clean clone (it needs a package index); here
    # `.venv` is this test's own environment, so the rest runs exactly as written.
    assert start.startswith(INSTALL), start
    taken = demo_ports_free()
    if taken:
        reason = f"the README's demo uses fixed ports and these are taken: {', '.join(taken)}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    env = {k: v for k, v in os.environ.items() if k != "MTLSGATE_SERVER"}
    demo = Proc(["bash", "-c", start[len(INSTALL):]], tmp_path / "demo.log", cwd=tmp_path, env=env,
                mtlsgate=False)
    try:
        wait_until(lambda: (tmp_path / "demo" / "endpoints.json").exists() or not demo.alive(), timeout=120,
                   interval=0.2, message="the demo to be ready")
        assert demo.alive(), demo.log()
        for line in tries:
            command, comment = split_comment(line)
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=60)
            if comment.startswith("both endpoints"):  # from the nodes' reports: as a user would, look again
                deadline = time.monotonic() + 20
                while len(re.findall(r"\shealthy\s", done.stdout)) < 4 and time.monotonic() < deadline:
                    time.sleep(1)
                    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                                          text=True, timeout=60)
            check_promise(command, comment, done)
    finally:
        demo.stop(timeout=30)
