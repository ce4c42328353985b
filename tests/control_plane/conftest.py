"""Fixtures for the control-plane suite: a running control plane process and the CLI against it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.control_plane.harness import start_control_plane
from tests.support import MTLSGATE, Proc


@dataclass
class ControlPlane:
    proc: Proc
    address: str
    db: Path

    def cli(self, *args: str, check: bool = False, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `mtlsgate ARGS --server ADDRESS`; returns the completed process (text)."""
        import os

        full_env = {**os.environ, "MTLSGATE_SERVER": self.address, **(env or {})}
        result = subprocess.run([*MTLSGATE, *args], capture_output=True, text=True, env=full_env, timeout=60,
                                input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"mtlsgate {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture
def control_plane(tmp_path: Path, logs_dir: Path) -> Iterator[ControlPlane]:
    db = tmp_path / "control-plane.db"
    proc, address = start_control_plane(tmp_path, logs_dir, db=db)
    try:
        yield ControlPlane(proc, address, db)
    finally:
        proc.stop()


class Api:
    """gRPC stubs of the management API on one channel."""

    def __init__(self, address: str, **channel_kwargs: object) -> None:
        import grpc
        from mtlsgate.v1 import api_pb2_grpc

        self.channel = grpc.insecure_channel(address)
        self.trust_configs = api_pb2_grpc.TrustConfigServiceStub(self.channel)
        self.policies = api_pb2_grpc.ServerTlsPolicyServiceStub(self.channel)
        self.certificates = api_pb2_grpc.CertificateServiceStub(self.channel)
        self.listeners = api_pb2_grpc.ListenerServiceStub(self.channel)
        self.audit = api_pb2_grpc.AuditServiceStub(self.channel)

    def revision(self) -> int:
        from mtlsgate.v1 import api_pb2

        entries = self.audit.ListAuditEntries(api_pb2.ListAuditEntriesRequest(page_size=1000), timeout=10).entries
        return entries[-1].revision if entries else 0

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[Api]:
    client = Api(control_plane.address)
    try:
        yield client
    finally:
        client.close()
