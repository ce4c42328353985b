"""Staged roll-outs end to end (SPEC §12): a real control plane, four real nodes in two label groups,
valid clients requesting through every node the whole time, the CLI as a user runs it."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from control_plane.pki import DemoPki
from tests.rollouts.fleet import (
    ADDRESSES,
    ClientLoop,
    base_manifest,
    cli,
    node_listener_version,
    ok,
    policy_manifest,
    rollout_status,
    status_versions,
    wait_state,
)
from tests.support import free_port, wait_until
from tests.xds.conftest import ControlPlane, Node

pytestmark = pytest.mark.slow


def _time(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _serving(fleet: dict[str, Node], port: int, pki: DemoPki) -> None:
    from tests.rollouts.fleet import request_ok

    for node_id in fleet:
        wait_until(lambda node_id=node_id: request_ok(ADDRESSES[node_id], port, pki)[0], timeout=20,
                   message=f"{node_id} serves valid clients")


def _setup(tmp_path: Path, control_plane: ControlPlane, fleet: dict[str, Node], pki: DemoPki, backend: str
           ) -> tuple[int, dict[str, str]]:
    port = free_port()
    (tmp_path / "base.yaml").write_text(base_manifest(pki, port, backend))
    ok(cli(control_plane.address, "apply", "-f", str(tmp_path / "base.yaml")))
    _serving(fleet, port, pki)
    return port, {n: node_listener_version(node) for n, node in fleet.items()}


def _clients(fleet: dict[str, Node], port: int, pki: DemoPki) -> dict[str, ClientLoop]:
    return {n: ClientLoop(n, ADDRESSES[n], port, pki).start() for n in fleet}


def _stop(clients: dict[str, ClientLoop]) -> None:
    for loop in clients.values():
        loop.stop()


def test_one_node_first_then_the_rest_after_the_bake_and_undo_restores_every_version(
        tmp_path: Path, control_plane: ControlPlane, fleet: dict[str, Node], demo_pki: DemoPki,
        echo_backend: str) -> None:
    server = control_plane.address
    port, before = _setup(tmp_path, control_plane, fleet, demo_pki, echo_backend)
    assert len(set(before.values())) == 2  # two label groups, two Listener versions
    (tmp_path / "policy.yaml").write_text(policy_manifest("canary", "[{nodes: 1}, {percent: 100, bake: 1s}]", "10s"))
    ok(cli(server, "apply", "-f", str(tmp_path / "policy.yaml")))
    clients = _clients(fleet, port, demo_pki)
    try:
        # A real change every node's clients keep passing: SAN matching the valid client satisfies.
        (tmp_path / "change.yaml").write_text(base_manifest(demo_pki, port, echo_backend,
                                                            san="spiffe://demo\\.mtlsgate/client/.*"))
        started = ok(cli(server, "apply", "-f", str(tmp_path / "change.yaml"), "--rollout", "canary"))
        assert "servertlspolicy/strict configured" in started and "wave 1: edge-1 (bake 10s)" in started, started
        assert "wave 2: edge-2, edge-3, edge-4 (bake 1s)" in started, started
        wait_until(lambda: node_listener_version(fleet["edge-1"]) != before["edge-1"], timeout=10,
                   message="edge-1 gets the new version first")
        new_edge1 = node_listener_version(fleet["edge-1"])
        run = rollout_status(server)
        wave1 = _time(run["waves"][0]["started"])
        # During the bake the other nodes serve, and `status` shows, exactly the previous version (a check
        # counts only if it finished inside the bake: the CLI takes a while on a loaded machine).
        checked = 0
        import grpc
        from mtlsgate.v1 import api_pb2, api_pb2_grpc, rollouts_pb2, rollouts_pb2_grpc

        with grpc.insecure_channel(server) as channel:  # gRPC here: the CLI takes seconds on a loaded machine
            fleet_api = api_pb2_grpc.FleetServiceStub(channel)
            rollouts_api = rollouts_pb2_grpc.RolloutServiceStub(channel)
            while time.time() < wave1 + 8.0:
                dumps = {n: node_listener_version(fleet[n]) for n in ("edge-2", "edge-3", "edge-4")}
                nodes = fleet_api.ListNodes(api_pb2.ListNodesRequest(), timeout=10).nodes
                shown = {n.id: next(t.acked_version for t in n.types if t.type_url.endswith(".Listener"))
                         for n in nodes}
                got = rollouts_api.GetRollout(rollouts_pb2.RolloutRequest(), timeout=10)
                if time.time() >= wave1 + 9.8:
                    break
                assert dumps == {n: before[n] for n in dumps}, "a node of wave 2 changed during wave 1's bake"
                assert {n: shown[n] for n in before} == {**before, "edge-1": new_edge1}, shown
                assert got.state == rollouts_pb2.RolloutRun.RUNNING and list(got.reached) == ["edge-1"], got.events
                checked += 1
                time.sleep(0.2)
        assert checked >= 1
        text = ok(cli(server, "rollout", "status"))
        if time.time() < wave1 + 9.8:
            assert "RUNNING" in text and "baking" in text and "previous" in text, text
        wait_until(lambda: all(node_listener_version(fleet[n]) != before[n] for n in fleet), timeout=15,
                   interval=0.05, message="every node has the new version after the bake")
        assert time.time() - wave1 >= 9.9, "the rest got the change before wave 1's 10 s bake ended"
        done = wait_state(server, "COMPLETED", timeout=15)
        assert done["reached"] == ["edge-1", "edge-2", "edge-3", "edge-4"]
        after = {n: node_listener_version(node) for n, node in fleet.items()}

        # undo: every node back to exactly the versions it had before (versions are content hashes).
        undone = ok(cli(server, "rollout", "undo", "--reason", "test undo"))
        assert "UNDONE" in undone, undone
        wait_until(lambda: {n: node_listener_version(node) for n, node in fleet.items()} == before, timeout=10,
                   message="every node back on its previous version")
        assert all(after[n] != before[n] for n in fleet)
        wait_until(lambda: {n: status_versions(server)[n] for n in fleet} == before, timeout=10,
                   message="status shows the previous versions")
        audit = ok(cli(server, "audit", "serverTlsPolicies/strict"))
        assert "undo of rollouts/" in audit and "test undo" in audit, audit
    finally:
        _stop(clients)
    for loop in clients.values():
        assert loop.ok_count > 20 and not loop.failures, (loop.node_id, loop.failures[:3])


def test_a_nack_on_wave_one_halts_and_no_later_wave_gets_the_change(
        tmp_path: Path, control_plane: ControlPlane, fleet: dict[str, Node], demo_pki: DemoPki,
        echo_backend: str) -> None:
    import socket

    server = control_plane.address
    port, before = _setup(tmp_path, control_plane, fleet, demo_pki, echo_backend)
    (tmp_path / "policy.yaml").write_text(policy_manifest("canary", "[{nodes: 1}, {percent: 100}]", "3s"))
    ok(cli(server, "apply", "-f", str(tmp_path / "policy.yaml")))
    # edge-1 (wave 1) cannot take the new port: something else already listens there on its address.
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    new_port = free_port()
    blocker.bind((ADDRESSES["edge-1"], new_port))
    blocker.listen()
    clients = _clients(fleet, port, demo_pki)
    try:
        (tmp_path / "move.yaml").write_text(base_manifest(demo_pki, new_port, echo_backend))
        ok(cli(server, "apply", "-f", str(tmp_path / "move.yaml"), "--rollout", "canary"))
        halted = wait_state(server, "HALTED", timeout=20)
        assert "gate noNack: node edge-1 rejected Listener version" in halted["reason"], halted["reason"]
        assert "already in use" in halted["reason"] and halted.get("reached", []) == [], halted
        # Well past wave 1's bake: no later wave ever got the new port; edge-1 keeps its last good config.
        time.sleep(4)
        assert {n: node_listener_version(node) for n, node in fleet.items()} == before
        assert all(lst["port"] == port for node in fleet.values() for lst in node.dump()["listeners"])
        text = ok(cli(server, "rollout", "status"))
        assert "HALTED" in text and "noNack" in text, text
        audit = ok(cli(server, "audit"))
        assert "halted in wave 1: gate noNack: node edge-1 rejected" in audit, audit
        # A second roll-out waits for this one to be dealt with; undo puts the store back.
        refused = cli(server, "apply", "-f", str(tmp_path / "move.yaml"), "--rollout", "canary")
        assert refused.returncode != 0 and "one roll-out at a time" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        ok(cli(server, "rollout", "undo"))
        listed = ok(cli(server, "get", "listeners", "zone-a", "-o", "json"))
        assert f'"port": {port}' in listed, listed
    finally:
        _stop(clients)
        blocker.close()
    for loop in clients.values():
        assert loop.ok_count > 20 and not loop.failures, (loop.node_id, loop.failures[:3])


def test_a_reject_rate_rise_on_wave_one_halts_and_wave_one_goes_back_by_itself(
        tmp_path: Path, control_plane: ControlPlane, fleet: dict[str, Node], demo_pki: DemoPki,
        echo_backend: str) -> None:
    """maxRejectIncrease on node reports (SPEC §12): a SAN rule that matches nobody makes edge-1's valid
    clients fail; the gate sees the reported reject rate rise, halts, and edge-1 is back on the previous
    revision by itself; the valid clients of the other nodes never saw a failure."""
    from tests.rollouts.fleet import request_ok

    server = control_plane.address
    port, before = _setup(tmp_path, control_plane, fleet, demo_pki, echo_backend)
    (tmp_path / "policy.yaml").write_text(policy_manifest(
        "canary", "[{nodes: 1}, {percent: 100}]", "30s", "gates: {maxRejectIncrease: 0.05}\n"))
    ok(cli(server, "apply", "-f", str(tmp_path / "policy.yaml")))
    clients = _clients(fleet, port, demo_pki)
    try:
        wait_until(lambda: all(loop.ok_count >= 10 for loop in clients.values()), timeout=30,
                   message="valid clients passing on every node before the change")
        (tmp_path / "typo.yaml").write_text(base_manifest(demo_pki, port, echo_backend,
                                                          san="spiffe://demo\\.mtlsgate/clinet/.*"))
        ok(cli(server, "apply", "-f", str(tmp_path / "typo.yaml"), "--rollout", "canary"))
        # Halted on the reported rate during the 30 s bake, not for want of reports at its end.
        halted = wait_state(server, "HALTED", timeout=25)
        assert "gate maxRejectIncrease: reject rate" in halted["reason"], halted["reason"]
        # wave 1's node went back and no later wave started (halted in wave 1, index 0)
        assert halted.get("reached", []) == [] and halted.get("currentWave", 0) == 0, halted
        wait_until(lambda: node_listener_version(fleet["edge-1"]) == before["edge-1"], timeout=15,
                   message="edge-1 back on the previous revision")
        wait_until(lambda: request_ok(ADDRESSES["edge-1"], port, demo_pki)[0], timeout=15,
                   message="edge-1 serves valid clients again")
        assert {n: node_listener_version(node) for n, node in fleet.items()} == before
        audit = ok(cli(server, "audit"))
        assert "halted in wave 1: gate maxRejectIncrease" in audit, audit
    finally:
        _stop(clients)
    assert clients["edge-1"].failures, "the bad change never reached edge-1's clients"
    for node_id in ("edge-2", "edge-3", "edge-4"):
        assert clients[node_id].ok_count > 20 and not clients[node_id].failures, (node_id, clients[node_id].failures[:3])


def test_a_revocation_during_a_paused_rollout_reaches_every_node_at_once(
        tmp_path: Path, control_plane: ControlPlane, fleet: dict[str, Node], demo_pki: DemoPki,
        echo_backend: str) -> None:
    from tests.rollouts.fleet import request_ok
    from tests.xds.fleet_config import rotated_crl_pem

    server = control_plane.address
    port, before = _setup(tmp_path, control_plane, fleet, demo_pki, echo_backend)
    second = _second_client(tmp_path, demo_pki)
    for n in fleet:
        assert request_ok(ADDRESSES[n], port, demo_pki, *second)[0], f"{n} refuses the second client at first"
    (tmp_path / "policy.yaml").write_text(policy_manifest("slow", "[{nodes: 1}, {percent: 100}]", "600s"))
    ok(cli(server, "apply", "-f", str(tmp_path / "policy.yaml")))
    (tmp_path / "change.yaml").write_text(base_manifest(demo_pki, port, echo_backend,
                                                        san="spiffe://demo\\.mtlsgate/client/.*"))
    ok(cli(server, "apply", "-f", str(tmp_path / "change.yaml"), "--rollout", "slow"))
    wait_until(lambda: node_listener_version(fleet["edge-1"]) != before["edge-1"], timeout=10,
               message="edge-1 gets wave 1")
    ok(cli(server, "rollout", "pause", "--reason", "investigating"))
    wait_state(server, "PAUSED", timeout=5)
    # Revoke the second client (the CRL keeps revoking what it did): a revocation-only change.
    import cryptography.x509 as x509

    serial = x509.load_pem_x509_certificate(Path(second[0]).read_bytes()).serial_number
    revoked_before = x509.load_pem_x509_crl(demo_pki.path("crl").read_bytes())
    crl = rotated_crl_pem(demo_pki, [*(e.serial_number for e in revoked_before), serial])
    (tmp_path / "revoke.yaml").write_text(base_manifest(demo_pki, port, echo_backend, crl=crl,
                                                        san="spiffe://demo\\.mtlsgate/client/.*"))
    started = time.monotonic()
    ok(cli(server, "apply", "-f", str(tmp_path / "revoke.yaml")))
    refused_at: dict[str, float] = {}

    def all_refuse() -> bool:
        for n in fleet:
            if n not in refused_at and not request_ok(ADDRESSES[n], port, demo_pki, *second, timeout=1)[0]:
                refused_at[n] = time.monotonic() - started
        return len(refused_at) == len(fleet)

    wait_until(all_refuse, timeout=10, interval=0.02, message="every node refuses the revoked client")
    print("revocation during a paused roll-out, apply → refused per node (s):",
          {n: round(t, 2) for n, t in sorted(refused_at.items())})
    # At once: the same few seconds on every node (CLI start-up included), against a 600 s wave bake.
    assert max(refused_at.values()) < 15.0, refused_at
    assert max(refused_at.values()) - min(refused_at.values()) < 3.0, refused_at
    # B6: the held-back nodes' ACKs of the base snapshot (revocation merged in) count as ACKs of it too.
    from mtlsgate.v1 import reports_pb2, reports_pb2_grpc

    def acked_by_all() -> bool:
        with grpc.insecure_channel(server) as channel:
            reply = reports_pb2_grpc.RevocationServiceStub(channel).ListRevocations(
                reports_pb2.ListRevocationsRequest(), timeout=10)
        record = next((r for r in reply.revocations if format(serial, "x") in r.serials), None)
        return record is not None and sorted(n.node_id for n in record.nodes if n.HasField("ack_time")) == sorted(fleet)

    wait_until(acked_by_all, timeout=10, message="every node's ACK of the revocation in status --revocations")
    # The held-back nodes still serve the base revision's policy (with the revocation merged in); the
    # run is still paused and the valid client still passes everywhere.
    run = rollout_status(server)
    assert run["state"] == "PAUSED" and run["reached"] == ["edge-1"], run
    for n in fleet:
        assert request_ok(ADDRESSES[n], port, demo_pki)[0], f"{n} refuses the valid client"
    ok(cli(server, "rollout", "abort"))
    wait_state(server, "ABORTED", timeout=10)


def _second_client(tmp_path: Path, pki: DemoPki) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from control_plane.pki import Issued, issue

    inter = Issued(x509.load_pem_x509_certificate(pki.path("intermediate_cert").read_bytes()),
                   serialization.load_pem_private_key(pki.path("intermediate_key").read_bytes(), None))  # type: ignore[arg-type]
    leaf = issue("client-second", issuer=inter, uris=("spiffe://demo.mtlsgate/client/second",))
    cert, key = tmp_path / "second.pem", tmp_path / "second-key.pem"
    cert.write_text(leaf.cert_pem + inter.cert_pem)
    key.write_text(leaf.key_pem)
    return str(cert), str(key)
