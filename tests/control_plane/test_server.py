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
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    control_plane.proc.popen.send_signal(signal.SIGTERM)
    assert control_plane.proc.popen.wait(15) == 0


def _field(data: bytes, number: int) -> list[bytes]:
    """The length-delimited values of field `number` in a protobuf message (enough to read reflection)."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 2:
            size, i = _varint(data, i)
            if key >> 3 == number:
                out.append(data[i:i + size])
            i += size
        elif wire == 0:
            _, i = _varint(data, i)
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def test_reflection_v1_with_a_raw_client(control_plane: ControlPlane) -> None:
    """grpcurl and newer clients ask `grpc.reflection.v1` first (before: UNIMPLEMENTED). A raw client: the
    request bytes written by hand (field 7 list_services = ""; field 4 file_containing_symbol), the
    answer decoded from the wire, no generated reflection classes."""
    with grpc.insecure_channel(control_plane.address) as channel:
        call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=None, response_deserializer=None)
        symbol = b"mtlsgate.v1.TrustConfigService"
        answers = list(call(iter([b"\x3a\x00", b"\x22" + bytes([len(symbol)]) + symbol]), timeout=5))
    services = {_field(s, 1)[0].decode() for s in _field(_field(answers[0], 6)[0], 1)}
    assert {"mtlsgate.v1.TrustConfigService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "envoy.service.discovery.v3.AggregatedDiscoveryService"} <= services
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in _field(_field(answers[1], 4)[0], 1)]
    assert any(f.package == "mtlsgate.v1" and "TrustConfigService" in [s.name for s in f.service] for f in files)


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
