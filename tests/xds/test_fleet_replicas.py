"""Fleet status across replicas (SPEC §14), with real processes: two control planes on one PostgreSQL
database, a real node on each. `status` from either replica shows the whole fleet with the replica holding
each node; a replica that stops heartbeating (SIGSTOP) has its node shown as moving within 10 s, and
connected again once it answers; forged or stale heartbeat rows written straight into the database, and an
unauthenticated stream claiming a node on the other replica, never make `status` lie."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2

from control_plane.pki import DemoPki
from tests.control_plane.harness import start_control_plane
from tests.support import MTLSGATE, Proc, free_port, wait_until
from tests.xds.conftest import Api, Node
from tests.xds.fleet_config import certificate, listener, strict_policy, trust_config
from tests.xds.raw_ads import RawAds
from tests.xds.test_failover import start_proxy


def fleet(server: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any], subprocess.CompletedProcess[str]]:
    """`mtlsgate status -o json` against one replica: nodes by id, replicas by name, the run."""
    run = subprocess.run([*MTLSGATE, "status", "--server", server, "-o", "json"], capture_output=True, text=True,
                         timeout=30)
    document = json.loads(run.stdout)
    return ({n["id"]: n for n in document["nodes"]}, {r["name"]: r for r in document["replicas"]}, run)


def placed(server: str, expected: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The nodes as `server` shows them once each node in `expected` is SYNCED on the named replica."""
    nodes, _, _ = fleet(server)
    ok = all(n in nodes and nodes[n]["connected"] and nodes[n]["state"] == "SYNCED" and nodes[n]["replica"] == r
             for n, r in expected.items())
    return nodes if ok else {}


@pytest.fixture
def named_replicas(postgres_dsn: str, tmp_path: Path, logs_dir: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Proc, str]]]:
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_QUIET", "0.05")
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_MAX", "0.5")
    started: list[tuple[Proc, str]] = []
    try:
        for name in ("cp-a", "cp-b"):
            started.append(start_control_plane(tmp_path, logs_dir, ["--replica-name", name], db=postgres_dsn))
        yield started
    finally:
        for proc, _ in started:
            if proc.alive():
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped process cannot take SIGTERM
            proc.stop()


def test_status_from_any_replica_is_the_whole_fleet_and_a_silent_replicas_node_moves(
        named_replicas: list[tuple[Proc, str]], demo_pki: DemoPki, postgres_dsn: str, tmp_path: Path,
        logs_dir: Path) -> None:
    (proc_a, a), (_, b) = named_replicas
    api = Api(a)
    try:
        for resource in (trust_config(demo_pki), strict_policy(), certificate(demo_pki),
                         listener("listeners/edge", free_port())):
            api.put(resource)
    finally:
        api.close()
    nodes: list[Node] = []
    try:
        nodes.append(start_proxy("node-1", a, tmp_path, logs_dir))
        nodes.append(start_proxy("node-2", b, tmp_path, logs_dir))
        where = {"node-1": "cp-a", "node-2": "cp-b"}
        for server in (a, b):
            shown = wait_until(lambda s=server: placed(s, where), timeout=30,
                               message=f"both nodes SYNCED on their replicas, seen from {server}")
            # The same versions whichever replica holds the node (content hashes) and whoever answers.
            assert {t: v["version"] for t, v in shown["node-1"]["types"].items()} == {
                t: v["version"] for t, v in shown["node-2"]["types"].items()}
        _, replicas, run = fleet(b)
        assert run.returncode == 0, run.stderr
        assert {n: (r["alive"], r["nodes"], r["answered"]) for n, r in replicas.items()} == {
            "cp-a": (True, 1, False), "cp-b": (True, 1, True)}
        table = subprocess.run([*MTLSGATE, "status", "--server", b], capture_output=True, text=True, timeout=30)
        assert "REPLICA" in table.stdout and "replicas: cp-b (answered, 1 node(s)), cp-a (alive, 1 node(s))" \
            in table.stdout, table.stdout

        # Replica A stops heartbeating (frozen, its streams still open): B shows its node as moving
        # within 10 s, and `status` exits 1 naming it.
        os.killpg(proc_a.pid, signal.SIGSTOP)
        frozen = time.monotonic()

        def moving() -> dict[str, Any]:
            shown, _, _ = fleet(b)
            return shown if shown["node-1"]["moving"] else {}

        shown = wait_until(moving, timeout=10, interval=0.2, message="node-1 shown moving by B")
        took = time.monotonic() - frozen
        assert not shown["node-1"]["connected"] and shown["node-1"]["replica"] == "cp-a"
        assert shown["node-2"]["connected"] and not shown["node-2"]["moving"]
        _, replicas, run = fleet(b)
        assert run.returncode == 1 and "node-1 MOVING" in run.stderr, run.stderr
        assert not replicas["cp-a"]["alive"]
        print(f"node of a silent replica shown moving after {took:.1f}s")
        os.killpg(proc_a.pid, signal.SIGCONT)
        wait_until(lambda: placed(b, where), timeout=15, message="node-1 connected on cp-a again, seen from B")
    finally:
        if proc_a.alive():
            os.killpg(proc_a.pid, signal.SIGCONT)
        for node in nodes:
            node.stop()


def test_forged_and_stale_heartbeat_rows_and_a_spoofing_stream_do_not_make_status_lie(
        named_replicas: list[tuple[Proc, str]], demo_pki: DemoPki, postgres_dsn: str, tmp_path: Path,
        logs_dir: Path) -> None:
    (_, a), (_, b) = named_replicas
    api = Api(a)
    try:
        for resource in (trust_config(demo_pki), strict_policy(), certificate(demo_pki),
                         listener("listeners/edge", free_port())):
            api.put(resource)
    finally:
        api.close()
    claimed = api_pb2.NodeStatus(id="node-9", connected=True, state=api_pb2.SYNCED, streams=1,
                                 identity="spiffe://demo.mtlsgate/node/node-9")
    # One transaction, as a replica publishes (a replica reading between a heartbeat row and its node rows
    # would otherwise take that generation as read without them).
    with psycopg.connect(postgres_dsn, autocommit=True) as conn, conn.transaction():
        now = float(conn.execute("SELECT extract(epoch from clock_timestamp())").fetchone()[0])  # type: ignore[index]
        # Heartbeats ten minutes in the future (never alive) and two hours in the future (deleted as forged),
        # one 30 s old (dead: its node is moving), and a row filed under one node that describes another.
        for replica, heartbeat in (("forged", now + 600), ("ancient", now + 7200), ("silent", now - 30),
                                   ("liar", now + 0)):
            conn.execute("INSERT INTO mtlsgate_replicas (id, name, started_at, heartbeat_at, generation) "
                         "VALUES (%s, %s, %s, %s, 1)", (replica, replica, now, heartbeat))
        rows = [("forged", "node-9", claimed), ("ancient", "node-6", claimed), ("silent", "node-8", api_pb2.NodeStatus(
            id="node-8", connected=True, state=api_pb2.SYNCED, streams=1)), ("liar", "node-7", claimed)]
        for replica, node_id, status in rows:
            conn.execute("INSERT INTO mtlsgate_fleet (replica, node_id, seq, status) VALUES (%s, %s, 1, %s)",
                         (replica, node_id, status.SerializeToString()))
    node = start_proxy("node-1", a, tmp_path, logs_dir)
    spoof_channel = grpc.insecure_channel(b)
    try:
        wait_until(lambda: placed(b, {"node-1": "cp-a"}), timeout=30, message="node-1 SYNCED on cp-a, seen from B")
        # Under --insecure anyone may open a stream as node-1: on replica B, never ACKing.
        spoof = RawAds(spoof_channel, "node-1", {})
        spoof.send(rt.LISTENER)
        spoof.recv()
        for server in (a, b):
            def settled(s: str = server) -> dict[str, dict[str, Any]]:
                shown, _, _ = fleet(s)
                return shown if shown.get("node-1", {}).get("streams") == 2 else {}

            shown = wait_until(settled, timeout=10, message=f"{server} to see node-1's two streams")
            assert (shown["node-1"]["connected"], shown["node-1"]["state"], shown["node-1"]["replica"]) == (
                True, "SYNCED", "cp-a")
            assert (shown["node-9"]["connected"], shown["node-9"]["moving"]) == (False, False)
            assert (shown["node-8"]["connected"], shown["node-8"]["moving"]) == (False, True)
            assert "node-7" not in shown
            assert not shown.get("node-6", {}).get("connected")
        spoof.close()

        def forged_forgotten() -> bool:
            with psycopg.connect(postgres_dsn, autocommit=True) as conn:
                return conn.execute("SELECT count(*) FROM mtlsgate_fleet WHERE replica = 'ancient'").fetchone() == (0,)

        wait_until(forged_forgotten, timeout=10, message="the replica two hours in the future to be deleted")
    finally:
        spoof_channel.close()
        node.stop()
