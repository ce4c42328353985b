"""Etag preconditions under concurrency, and durability across `kill -9`."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
from mtlsgate.v1 import api_pb2, resources_pb2

from control_plane.pki import DemoPki
from tests.control_plane.conftest import Api, ControlPlane
from tests.control_plane.harness import start_control_plane


def test_concurrent_updates_with_the_same_etag_exactly_one_wins(control_plane: ControlPlane) -> None:
    setup = Api(control_plane.address)
    created = setup.trust_configs.CreateTrustConfig(api_pb2.CreateTrustConfigRequest(
        trust_config_id="race", trust_config=resources_pb2.TrustConfig(description="v0")))
    clients = [Api(control_plane.address) for _ in range(2)]
    etag = created.etag
    try:
        for round_number in range(15):
            barrier = threading.Barrier(2)
            outcomes: list[object] = [None, None]

            def write(i: int, etag: str, round_number: int, barrier: threading.Barrier, outcomes: list[object]) -> None:
                request = api_pb2.UpdateTrustConfigRequest(trust_config=resources_pb2.TrustConfig(
                    name="trustConfigs/race", description=f"round {round_number} writer {i}", etag=etag))
                barrier.wait()
                try:
                    outcomes[i] = clients[i].trust_configs.UpdateTrustConfig(request, timeout=10)
                except grpc.RpcError as exc:
                    outcomes[i] = exc

            threads = [threading.Thread(target=write, args=(i, etag, round_number, barrier, outcomes)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            winners = [o for o in outcomes if isinstance(o, resources_pb2.TrustConfig)]
            losers = [o for o in outcomes if isinstance(o, grpc.RpcError)]
            assert len(winners) == 1 and len(losers) == 1, outcomes
            assert losers[0].code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "etag mismatch" in losers[0].details()
            stored = setup.trust_configs.GetTrustConfig(api_pb2.GetResourceRequest(name="trustConfigs/race"))
            assert stored.description == winners[0].description and stored.etag == winners[0].etag
            etag = stored.etag
        audit = setup.audit.ListAuditEntries(api_pb2.ListAuditEntriesRequest(resource_name="trustConfigs/race"))
        assert [e.method for e in audit.entries] == ["CREATE"] + ["UPDATE"] * 15
        assert [e.revision for e in audit.entries] == list(range(1, 17))
        for previous, entry in zip(audit.entries, audit.entries[1:], strict=False):
            assert entry.etag_before == previous.etag_after
    finally:
        for c in [setup, *clients]:
            c.close()


def test_acknowledged_write_survives_kill_9(tmp_path: Path, logs_dir: Path, demo_pki: DemoPki) -> None:
    db = tmp_path / "durable.db"
    proc, address = start_control_plane(tmp_path, logs_dir, db=db)
    api = Api(address)
    try:
        created = api.trust_configs.CreateTrustConfig(api_pb2.CreateTrustConfigRequest(
            trust_config_id="durable", trust_config=resources_pb2.TrustConfig(
                trust_stores=[resources_pb2.TrustStore(trust_anchors=[resources_pb2.TrustAnchor(
                    pem_certificate=demo_pki.path("ca_cert").read_text())])])))
        cert = api.certificates.CreateCertificate(api_pb2.CreateCertificateRequest(
            certificate_id="edge", certificate=resources_pb2.Certificate(
                pem_certificate=demo_pki.path("server_cert").read_text(),
                pem_private_key=demo_pki.path("server_key").read_text())))
    finally:
        api.close()
    proc.kill9()  # no shutdown path runs: only what SQLite made durable before the ACK survives

    proc, address = start_control_plane(tmp_path, logs_dir, db=db)
    api = Api(address)
    try:
        again = api.trust_configs.GetTrustConfig(api_pb2.GetResourceRequest(name="trustConfigs/durable"))
        assert again == created
        assert api.certificates.GetCertificate(api_pb2.GetResourceRequest(name="certificates/edge")) == cert
        entries = api.audit.ListAuditEntries(api_pb2.ListAuditEntriesRequest()).entries
        assert [(e.revision, e.method, e.resource_name, e.etag_after) for e in entries] == [
            (1, "CREATE", "trustConfigs/durable", created.etag), (2, "CREATE", "certificates/edge", cert.etag)]
        # The revision continues where it was.
        updated = api.trust_configs.UpdateTrustConfig(api_pb2.UpdateTrustConfigRequest(
            trust_config=resources_pb2.TrustConfig(name="trustConfigs/durable", description="after restart"),
            update_mask={"paths": ["description"]}))
        assert updated.description == "after restart" and len(updated.trust_stores) == 1
        assert api.revision() == 3
    finally:
        api.close()
        proc.stop()
