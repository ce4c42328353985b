"""The control plane process: health, reflection, clean shutdown, bad options."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.control_plane.conftest import ControlPlane
from tests.control_plane.harness import control_plane_args
from tests.support import MTLSGATE, free_port


def test_ready_line_reflection_and_clean_sigterm(control_plane: ControlPlane) -> None:
    assert f"mtlsgate control-plane: serving on {control_plane.address} (db {control_plane.db})" in \
        control_plane.proc.log()
    with grpc.insecure_channel(control_plane.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=5))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"mtlsgate.v1.TrustConfigService", "mtlsgate.v1.ServerTlsPolicyService",
            "mtlsgate.v1.CertificateService", "mtlsgate.v1.ListenerService", "mtlsgate.v1.AuditService",
            "grpc.health.v1.Health"} <= names
    control_plane.proc.popen.send_signal(signal.SIGTERM)
    assert control_plane.proc.popen.wait(15) == 0


def test_listen_address_in_use_is_a_one_line_error(control_plane: ControlPlane, tmp_path: Path) -> None:
    result = subprocess.run([*MTLSGATE, *control_plane_args(control_plane.address, tmp_path / "other.db")], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "cannot listen on" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreadable_tls_file_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([*MTLSGATE, *control_plane_args(
        f"127.0.0.1:{free_port()}", tmp_path / "x.db",
        ["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "missing-key.pem")])], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot read TLS" in result.stderr


def test_a_second_control_plane_on_the_same_database_is_refused(control_plane: ControlPlane) -> None:
    result = subprocess.run([*MTLSGATE, *control_plane_args(f"127.0.0.1:{free_port()}", control_plane.db)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"mtlsgate control-plane: store {control_plane.db} is in use by another "
                                     "control plane process")


def test_reflection_serves_the_api_descriptors(control_plane: ControlPlane) -> None:
    from google.protobuf import descriptor_pb2

    with grpc.insecure_channel(control_plane.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="mtlsgate.v1.TrustConfigService")
        [response] = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    assert "mtlsgate/v1/api.proto" in {f.name for f in files}
