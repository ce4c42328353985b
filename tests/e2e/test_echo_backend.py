"""The demo echo backend, as a real process: it reports the headers it received and stays bounded."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_plane.echo_backend import echo_document
from tests.support import Proc, free_port, wait_until


def test_echo_document_lowercases_and_joins_repeated_headers() -> None:
    doc = echo_document("GET", "/x", [("X-Client-Cert-Present", "true"), ("x-a", "1"), ("X-A", "2")], 0)
    assert doc["headers"] == {"x-client-cert-present": "true", "x-a": "1, 2"}
    assert doc["method"] == "GET" and doc["path"] == "/x"


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = Proc(["echo-backend", "--listen", f"127.0.0.1:{port}"], tmp_path / "echo.log")
    try:
        wait_until(lambda: _status(port, "/healthz") == 200, message="echo backend healthy")
        yield port
    finally:
        assert proc.stop() == 0, proc.log()


def _status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_echo_backend_returns_request_headers_on_a_kept_alive_connection(backend: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", backend, timeout=5)
    for i in range(3):
        conn.request("POST", f"/hello/{i}", body=b"abc", headers={"X-Client-Cert-Chain-Verified": "true"})
        reply = conn.getresponse()
        doc = json.loads(reply.read())
        assert reply.status == 200
        assert doc["path"] == f"/hello/{i}"
        assert doc["headers"]["x-client-cert-chain-verified"] == "true"
        assert doc["body_bytes"] == 3
    conn.close()


def test_echo_backend_refuses_oversized_bodies(backend: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", backend, timeout=5)
    conn.putrequest("POST", "/big")
    conn.putheader("Content-Length", str(10 << 20))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def test_echo_backend_reports_a_bad_listen_address(tmp_path: Path) -> None:
    proc = Proc(["echo-backend", "--listen", "nonsense"], tmp_path / "bad.log")
    wait_until(lambda: not proc.alive(), message="echo-backend to exit")
    assert proc.stop() == 2
    assert "expected HOST:PORT" in proc.log()
