"""Fixtures for xDS suites: a real `mtlsgate control-plane` process with a SQLite file, management API stubs,
and real `mtlsgate proxy` processes with their admin endpoints."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from mtlsgate.v1 import api_pb2, api_pb2_grpc, resources_pb2

from tests.control_plane.harness import start_control_plane
from tests.support import Proc, free_port, port_open, wait_until


@dataclass
class ControlPlane:
    """E2's harness process, restartable on the same port and database (the restart scenarios)."""

    address: str
    db: Path
    metrics: str
    tmp_path: Path
    logs_dir: Path
    proc: Proc | None = None

    def start(self) -> None:
        port = int(self.address.rpartition(":")[2])
        self.proc, _ = start_control_plane(self.tmp_path, self.logs_dir, ["--metrics", self.metrics],
                                           db=self.db, port=port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


class Api:
    """The management API over a real channel."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.trust_configs = api_pb2_grpc.TrustConfigServiceStub(self.channel)
        self.policies = api_pb2_grpc.ServerTlsPolicyServiceStub(self.channel)
        self.certificates = api_pb2_grpc.CertificateServiceStub(self.channel)
        self.listeners = api_pb2_grpc.ListenerServiceStub(self.channel)
        self.fleet = api_pb2_grpc.FleetServiceStub(self.channel)

    def put(self, resource: Any) -> Any:
        """Upsert any resource (the `apply` path: UpdateX with allow_missing)."""
        if isinstance(resource, resources_pb2.TrustConfig):
            return self.trust_configs.UpdateTrustConfig(
                api_pb2.UpdateTrustConfigRequest(trust_config=resource, allow_missing=True), timeout=10)
        if isinstance(resource, resources_pb2.ServerTlsPolicy):
            return self.policies.UpdateServerTlsPolicy(
                api_pb2.UpdateServerTlsPolicyRequest(server_tls_policy=resource, allow_missing=True), timeout=10)
        if isinstance(resource, resources_pb2.Certificate):
            return self.certificates.UpdateCertificate(
                api_pb2.UpdateCertificateRequest(certificate=resource, allow_missing=True), timeout=10)
        return self.listeners.UpdateListener(
            api_pb2.UpdateListenerRequest(listener=resource, allow_missing=True), timeout=10)

    def nodes(self) -> dict[str, api_pb2.NodeStatus]:
        return {n.id: n for n in self.fleet.ListNodes(api_pb2.ListNodesRequest(), timeout=10).nodes}

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def control_plane(tmp_path: Path, logs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlPlane]:
    # Shorter debounce than the default 100 ms / 1 s keeps the suites quick; the rules are the same.
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_QUIET", "0.05")
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_MAX", "0.5")
    cp = ControlPlane(f"127.0.0.1:{free_port()}", tmp_path / "store.db", f"127.0.0.1:{free_port()}",
                      tmp_path, logs_dir)
    cp.start()
    yield cp
    cp.stop()


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[Api]:
    client = Api(control_plane.address)
    yield client
    client.close()


@dataclass
class Node:
    node_id: str
    admin: str
    cache_dir: Path
    args: list[str]
    log_path: Path
    proc: Proc | None = None

    def start(self) -> None:
        self.proc = Proc(self.args, self.log_path)
        host, _, port = self.admin.rpartition(":")
        try:
            wait_until(lambda: port_open(host, int(port)), timeout=20, message=f"admin of {self.node_id}")
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def dump(self) -> dict[str, Any]:
        return json.loads(self.get("/config_dump")[1])

    def ready(self) -> bool:
        return self.get("/ready")[0] == 200


@pytest.fixture
def start_node(control_plane: ControlPlane, tmp_path: Path, logs_dir: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(node_id: str, cluster: str, labels: dict[str, str], listen_address: str = "127.0.0.1",
              extra: Sequence[str] = ()) -> Node:
        admin = f"127.0.0.1:{free_port()}"
        cache = tmp_path / f"cache-{node_id}"
        args = ["proxy", "--server", control_plane.address, "--node-id", node_id, "--cluster", cluster,
                "--admin", admin, "--cache-dir", str(cache), "--listen-address", listen_address,
                "--workers", "1", "--backoff-max", "1.0",
                *[a for k, v in labels.items() for a in ("--label", f"{k}={v}")], *extra]
        node = Node(node_id, admin, cache, args, logs_dir / f"proxy-{node_id}.log")
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def echo_backend() -> Iterator[str]:
    """The demo echo backend in a thread; its HOST:PORT."""
    import threading

    from data_plane import echo_backend as echo

    server = echo.EchoServer(("127.0.0.1", free_port()), echo.EchoHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
