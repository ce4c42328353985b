"""Fixtures for the worker suite: NodeConfigs built from the demo PKI, a real echo backend, and a real
WorkerPool (worker processes) driven from a background event loop, plus TLS clients."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from mtlsgate.v1 import resources_pb2, xds_pb2

from control_plane.pki import DemoPki
from data_plane import echo_backend
from data_plane.node.config import NodeConfig
from data_plane.validation.bundle import trust_bundle_from_trust_config
from data_plane.workers.pool import WorkerPool
from tests.support import free_port

MTLS = resources_pb2.MTLSPolicy


def trust_config(pki: DemoPki, *, with_crl: bool = True, crl_pem: str | None = None) -> resources_pb2.TrustConfig:
    data = yaml.safe_load(pki.path("trust_config").read_text())
    if not with_crl:
        data["trustStores"][0].pop("crls", None)
    elif crl_pem is not None:
        data["trustStores"][0]["crls"] = [{"pemCrl": crl_pem}]
    tc = json_format.ParseDict(data, resources_pb2.TrustConfig())
    tc.name = "trustConfigs/demo"
    return tc


def policy(mode: str = "REJECT_INVALID", **extensions: Any) -> resources_pb2.ServerTlsPolicy:
    p = resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/p")
    p.mtls_policy.client_validation_mode = MTLS.ClientValidationMode.Value(mode)
    p.mtls_policy.client_validation_trust_config = "trustConfigs/demo"
    for key, value in extensions.items():
        setattr(p.mtls_policy, key, value)
    return p


def listener(name: str, port: int, backend: str, tls_policy: resources_pb2.ServerTlsPolicy | None,
             **fields: Any) -> resources_pb2.Listener:
    lst = resources_pb2.Listener(name=f"listeners/{name}", port=port, backend=backend,
                                 certificate="certificates/edge", **fields)
    if tls_policy is not None:
        lst.server_tls_policy = tls_policy.name
        lst.resolved_server_tls_policy.CopyFrom(tls_policy)
    return lst


def node_config(pki: DemoPki, listeners: Sequence[resources_pb2.Listener],
                tc: resources_pb2.TrustConfig | None = None) -> NodeConfig:
    tc = tc or trust_config(pki)
    cert = xds_pb2.ServerCertificate(name="certificates/edge",
                                     pem_certificate_chain=pki.path("server_cert").read_text(),
                                     pem_private_key=pki.path("server_key").read_text())
    return NodeConfig(
        versions={"listeners": str(len(listeners))},
        listeners={lst.name: lst for lst in listeners},
        bundles={"trustConfigs/demo": trust_bundle_from_trust_config(tc)},
        certificates={cert.name: cert},
    )


class PoolHarness:
    """A WorkerPool on an event loop in a background thread, so tests can stay synchronous."""

    def __init__(self, workers: int, listen_address: str = "127.0.0.1") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = self.call(self._make(workers, listen_address))

    @staticmethod
    async def _make(workers: int, listen_address: str) -> WorkerPool:
        pool = WorkerPool(workers, listen_address)
        await pool.start()
        return pool

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def apply(self, config: NodeConfig) -> None:
        self.call(self.pool.apply(config))

    def in_loop(self, fn: Any) -> Any:
        async def run() -> Any:
            return fn()
        return self.call(run())

    def close(self) -> None:
        self.call(self.pool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class _RecordingHandler(echo_backend.EchoHandler):
    def _answer(self) -> None:
        self.server.seen.append({k.lower(): v for k, v in self.headers.items()})  # type: ignore[attr-defined]
        super()._answer()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer


class RecordingBackend:
    """The demo echo backend, also remembering the headers of every request it received."""

    def __init__(self) -> None:
        port = free_port()
        self.server = echo_backend.EchoServer(("127.0.0.1", port), _RecordingHandler)
        self.server.seen = []  # type: ignore[attr-defined]
        self.address = f"127.0.0.1:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def seen(self) -> list[dict[str, str]]:
        return self.server.seen  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    b = RecordingBackend()
    yield b
    b.server.shutdown()


@pytest.fixture(scope="module")
def harness() -> Iterator[PoolHarness]:
    h = PoolHarness(workers=2)
    yield h
    h.close()


def client_context(pki: DemoPki | None, who: str | None = "client", *, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.path("ca_cert")) if pki else None)
    if pki is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if pki is not None and who is not None:
        ctx.load_cert_chain(str(pki.path(f"{who}_cert")), str(pki.path(f"{who}_key")))
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def https_get(port: int, ctx: ssl.SSLContext, path: str = "/", headers: dict[str, str] | None = None,
              host: str = "127.0.0.1", timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a new TLS connection; raises ssl.SSLError when the handshake or first read fails."""
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        return http_roundtrip(tls, path, headers)


def http_roundtrip(sock: Any, path: str = "/", headers: dict[str, str] | None = None,
                   ) -> tuple[int, dict[str, str], bytes]:
    """Send one GET on an open (TLS) socket and read a Content-Length response (the proxy's or echo's)."""
    lines = [f"GET {path} HTTP/1.1", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} bytes")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    resp_headers = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        resp_headers[k.strip().lower()] = v.strip()
    length = int(resp_headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        body += chunk
    return int(status_line.split()[1]), resp_headers, body


def echoed_headers(body: bytes) -> dict[str, str]:
    return json.loads(body)["headers"]


def tmp_pem(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path
