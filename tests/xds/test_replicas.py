"""Control-plane replicas on one PostgreSQL database (SPEC §14): a write on one replica reaches the nodes
of another with the same content-hash version; the CLI side of running on PostgreSQL (--migrate, a
refused newer schema, no password in what the process prints)."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2

from control_plane.pki import DemoPki
from control_plane.store.postgres_schema import MIGRATIONS
from tests.control_plane.harness import control_plane_args, start_control_plane
from tests.postgres import PostgresServer
from tests.support import MTLSGATE, Proc, free_port, wait_until
from tests.xds.conftest import Api
from tests.xds.fleet_config import certificate, listener, rotated_crl_pem, strict_policy, trust_config
from tests.xds.raw_ads import RawAds
from tests.xds.test_failover import start_proxy
from tests.xds.test_fleet import BUNDLE, all_synced
from tests.xds.test_ha_kill9 import Load, client_loop


@pytest.fixture
def replicas(postgres_dsn: str, tmp_path: Path, logs_dir: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Proc, str]]]:
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_QUIET", "0.05")
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_MAX", "0.5")
    started: list[tuple[Proc, str]] = []
    try:  # the first replica is stopped even when the second fails to start
        for _ in range(2):
            started.append(start_control_plane(tmp_path, logs_dir, db=postgres_dsn))
        yield started
    finally:
        for proc, _ in started:
            proc.stop()


def _listener_version(address: str, node_id: str) -> tuple[RawAds, str]:
    channel = grpc.insecure_channel(address)
    ads = RawAds(channel, node_id, {"zone": "a"})
    ads.send(rt.LISTENER)
    return ads, ads.recv().version_info


def test_a_write_on_one_replica_reaches_the_other_replicas_nodes_with_the_same_version(
        replicas: list[tuple[Proc, str]], demo_pki: DemoPki) -> None:
    (_, a), (_, b) = replicas
    api_a = Api(a)
    try:
        for resource in (trust_config(demo_pki), strict_policy(), certificate(demo_pki),
                         listener("listeners/one", 18443)):
            api_a.put(resource)
        on_a, version_a = _listener_version(a, "node-on-a")
        # B follows A within milliseconds (NOTIFY); a node connecting before that gets B's older snapshot
        # first and the new one right after. Compare like with like: once B has the write.
        api_b = Api(b)
        try:
            wait_until(lambda: [lst.name for lst in api_b.listeners.ListListeners(
                api_pb2.ListResourcesRequest(), timeout=5).listeners] == ["listeners/one"], timeout=5,
                message="replica B to have A's writes")
        finally:
            api_b.close()
        on_b, version_b = _listener_version(b, "node-on-b")
        assert version_a and version_a == version_b
        # A change written on A is pushed on B's open stream too, with A's version.
        on_a.send(rt.LISTENER, version=version_a, nonce="1")
        on_b.send(rt.LISTENER, version=version_b, nonce="1")
        api_a.put(listener("listeners/two", 18444))
        pushed_a, pushed_b = on_a.recv(), on_b.recv()
        assert pushed_b.version_info == pushed_a.version_info != version_a
        assert sorted(r.value for r in pushed_b.resources) == sorted(r.value for r in pushed_a.resources)
        assert len(pushed_b.resources) == 2
        on_a.close()
        on_b.close()
    finally:
        api_a.close()


def test_a_write_on_either_replica_is_read_on_the_other(replicas: list[tuple[Proc, str]], demo_pki: DemoPki) -> None:
    (_, a), (_, b) = replicas
    api_a, api_b = Api(a), Api(b)
    try:
        api_a.put(trust_config(demo_pki))
        api_b.put(strict_policy())  # its reference to the trust config is checked against the database

        def policies_on_a() -> list[str]:
            listed = api_a.policies.ListServerTlsPolicies(api_pb2.ListResourcesRequest(), timeout=5)
            return [p.name for p in listed.server_tls_policies]

        assert wait_until(policies_on_a, timeout=5, message="replica A to serve B's write") == [
            "serverTlsPolicies/strict"]
    finally:
        api_a.close()
        api_b.close()


def test_the_password_is_not_printed_and_migrate_and_a_newer_schema(postgres_dsn: str, tmp_path: Path,
                                                                  logs_dir: Path) -> None:
    password = postgres_dsn.split(":")[2].split("@")[0]
    run = subprocess.run([*MTLSGATE, "control-plane", "--db", postgres_dsn, "--migrate"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    latest = len(MIGRATIONS)
    assert f"from schema version 0 to {latest}" in run.stdout and password not in run.stdout + run.stderr
    again = subprocess.run([*MTLSGATE, "control-plane", "--db", postgres_dsn, "--migrate"], capture_output=True,
                           text=True, timeout=60)
    assert f"is at schema version {latest}; nothing to migrate" in again.stdout

    proc, _ = start_control_plane(tmp_path, logs_dir, db=postgres_dsn)
    proc.stop()
    assert "serving on" in proc.log() and ":***@" in proc.log() and password not in proc.log()

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO mtlsgate_schema (version) VALUES (99)")
    refused = subprocess.run([*MTLSGATE, *control_plane_args("127.0.0.1:0", postgres_dsn)], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0
    assert "schema is at version 99, newer than this mtlsgate knows" in refused.stderr
    assert "Traceback" not in refused.stderr and password not in refused.stderr


def test_postgresql_restarted_under_load(postgres_server: PostgresServer, replicas: list[tuple[Proc, str]],
                                         demo_pki: DemoPki, echo_backend: str, tmp_path: Path, logs_dir: Path) -> None:
    """The database goes away and comes back while a node serves valid clients: writes fail whole with a
    retryable error naming the database, the replicas keep answering xDS and status meanwhile, reconnect by
    themselves, and the next write reaches the node through the other replica."""
    (_, a), (_, b) = replicas
    port = free_port()
    api_a = Api(a)
    try:
        for resource in (trust_config(demo_pki), strict_policy(), certificate(demo_pki),
                         listener("listeners/edge", port, backend=echo_backend)):
            api_a.put(resource)
        node = start_proxy("node-1", b, tmp_path, logs_dir)
        load = Load()
        loop = threading.Thread(target=client_loop, args=("127.0.0.1", port, load, demo_pki), daemon=True)
        try:
            before = wait_until(lambda: all_synced(b, ["node-1"]), timeout=30, message="node-1 SYNCED on B")
            wait_until(node.ready, timeout=10, message="node-1 ready")
            loop.start()
            postgres_server.stop()
            rotated = trust_config(demo_pki)
            rotated.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(demo_pki, [777])
            with pytest.raises(grpc.RpcError) as refused:
                api_a.put(rotated)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "store unavailable: PostgreSQL at" in refused.value.details()  # type: ignore[attr-defined]
            assert postgres_server.password not in refused.value.details()  # type: ignore[attr-defined]
            cli = subprocess.run([*MTLSGATE, "delete", "listeners", "edge", "--server", a], capture_output=True,
                                 text=True, timeout=60)
            assert cli.returncode != 0 and "Traceback" not in cli.stderr
            assert f"the control plane at {a} answered, but its PostgreSQL at" in cli.stderr, cli.stderr
            assert "nothing was written" in cli.stderr and postgres_server.password not in cli.stderr
            # Meanwhile both replicas still answer: status from memory, xDS streams untouched.
            assert all_synced(b, ["node-1"])
            postgres_server.restart()
            wait_until(lambda: api_a.put(rotated), timeout=30, message="writes to succeed after the restart")

            def rolled_out() -> bool:
                now = all_synced(b, ["node-1"])
                return bool(now) and now["node-1"]["types"][BUNDLE]["version"] != \
                    before["node-1"]["types"][BUNDLE]["version"]

            wait_until(rolled_out, timeout=15, message="the write on A to reach node-1 through B")
        finally:
            if postgres_server.popen.poll() is not None:  # failed during the outage: the next tests need it
                postgres_server.restart()
            load.stop.set()
            if loop.is_alive():
                loop.join(30)
            node.stop()
        assert load.failed_requests == [], load.failed_requests[:5]
        assert load.ok_requests > 10
    finally:
        api_a.close()
