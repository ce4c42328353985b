"""SPEC §14's goal with real processes: two control-plane replicas on one PostgreSQL database, two real
proxy nodes, 8 writer threads (one of them rolling a new CRL out to the nodes again and again) and a
valid-client TLS loop through each node. `kill -9` replica A: 0 acknowledged writes lost, every node on
replica B within 5 s and SYNCED there, 0 failed valid requests. Then restart A, kill B: the same."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from mtlsgate.v1 import api_pb2, resources_pb2

from control_plane.pki import DemoPki
from tests.control_plane.harness import start_control_plane
from tests.support import Proc, free_port, wait_until
from tests.workers.conftest import client_context, https_get
from tests.xds.conftest import Api, Node
from tests.xds.fleet_config import certificate, listener, rotated_crl_pem, strict_policy, trust_config
from tests.xds.test_fleet import all_synced

pytestmark = pytest.mark.slow

WRITERS = 8
NODES = {"node-1": "127.0.0.2", "node-2": "127.0.0.3"}


@dataclass
class Replica:
    address: str
    proc: Proc | None = None


@dataclass
class Load:
    """What the loops did: the (name, etag) of every acknowledged write, the last acknowledged counter per
    name, writes with no answer, roll-outs, requests."""

    acked: set[tuple[str, str]] = field(default_factory=set)
    last_acked: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    rollouts: int = 0
    ok_requests: int = 0
    failed_requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def writer(index: int, replicas: list[Replica], load: Load, pki: DemoPki) -> None:
    """Write to replica index % 2; on a failure (the replica died) go to the other one. Writer 0 rolls a
    new CRL out (every node receives it); the others rewrite ten trust configs of their own that no node
    uses, with a counter in the description (so the state stays the same size however long it runs)."""
    preferred = index % 2
    apis = [Api(r.address) for r in replicas]
    serials = itertools.count(10_000 + index * 100_000)
    try:
        for i in itertools.count():
            if load.stop.is_set():
                return
            if index == 0:
                resource = trust_config(pki)
                resource.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(pki, [next(serials)])
                name = ""
            else:
                name = f"trustConfigs/w{index}-{i % 10}"
                resource = trust_config(pki, name=name)
                resource.description = str(i)
            try:
                stored = apis[preferred].put(resource)
            except grpc.RpcError:
                with load.lock:
                    load.unanswered += 1  # may or may not have committed: not counted either way
                preferred = 1 - preferred
                time.sleep(0.05)
                continue
            with load.lock:
                if name:
                    load.acked.add((name, stored.etag))
                    load.last_acked[name] = i
                else:
                    load.rollouts += 1
            if index == 0:
                time.sleep(0.2)
    finally:
        for api in apis:
            api.close()


def client_loop(host: str, port: int, load: Load, pki: DemoPki) -> None:
    ctx = client_context(pki, "client")
    while not load.stop.is_set():
        try:
            status, _, _ = https_get(port, ctx, host=host, timeout=5)
            ok = status == 200
            detail = f"HTTP {status}"
        except OSError as exc:  # ssl.SSLError, refused, reset, timeout
            ok, detail = False, repr(exc)
        with load.lock:
            if ok:
                load.ok_requests += 1
            else:
                load.failed_requests.append(f"{host}: {detail}")


def synced_on(address: str) -> bool:
    """Every node connected, SYNCED and held by the replica at `address` (its name defaults to it)."""
    api = Api(address)
    try:
        response = api.fleet.ListNodes(api_pb2.ListNodesRequest(), timeout=5)
    except grpc.RpcError:
        return False
    finally:
        api.close()
    names = {r.id: r.name for r in response.replicas}
    nodes = {n.id: n for n in response.nodes}
    return all(n in nodes and nodes[n].connected and nodes[n].state == api_pb2.SYNCED
               and names.get(nodes[n].replica) == address for n in NODES)


def test_kill_9_of_either_replica_loses_no_write_and_no_request(
        postgres_dsn: str, demo_pki: DemoPki, echo_backend: str, tmp_path: Path, logs_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_QUIET", "0.05")
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_MAX", "0.5")
    replicas = [Replica(f"127.0.0.1:{free_port()}") for _ in range(2)]

    def start(replica: Replica) -> None:
        replica.proc, _ = start_control_plane(tmp_path, logs_dir, db=postgres_dsn,
                                              port=int(replica.address.rpartition(":")[2]))

    nodes = []
    load = Load()
    threads: list[threading.Thread] = []
    a, b = replicas
    try:  # everything started is stopped, whatever fails on the way
        for replica in replicas:
            start(replica)
        port = free_port("127.0.0.2")
        api = Api(a.address)
        for resource in (trust_config(demo_pki), strict_policy(), certificate(demo_pki),
                         listener("listeners/edge", port, backend=echo_backend)):
            api.put(resource)
        api.close()

        for (node_id, host), servers in zip(NODES.items(), [f"{a.address},{b.address}", f"{b.address},{a.address}"],
                                            strict=True):
            admin = f"127.0.0.1:{free_port()}"
            args = ["proxy", "--server", servers, "--node-id", node_id, "--cluster", "edge", "--admin", admin,
                    "--cache-dir", str(tmp_path / f"cache-{node_id}"), "--listen-address", host, "--workers", "1",
                    "--backoff-max", "1.0"]
            node = Node(node_id, admin, tmp_path / f"cache-{node_id}", args, logs_dir / f"proxy-{node_id}.log")
            node.start()
            nodes.append(node)
        wait_until(lambda: all_synced(a.address, ["node-1"]) and all_synced(b.address, ["node-2"]), timeout=30,
                   message="node-1 SYNCED on A, node-2 on B")
        wait_until(lambda: all(n.ready() for n in nodes), timeout=10, message="both nodes ready")
        threads = [threading.Thread(target=writer, args=(i, replicas, load, demo_pki), daemon=True)
                   for i in range(WRITERS)]
        threads += [threading.Thread(target=client_loop, args=(host, port, load, demo_pki), daemon=True)
                    for host in NODES.values()]
        for t in threads:
            t.start()

        for victim, survivor in ((a, b), (b, a)):
            wait_until(lambda: load.rollouts >= 3 and len(load.acked) >= 20, timeout=30,
                       message="the writers to be under way")
            assert victim.proc is not None
            victim.proc.kill9()
            killed = time.monotonic()
            # Polled over gRPC (milliseconds), not by starting the CLI (seconds on a loaded machine), so the
            # time measured is the fleet's, not the poll's; `mtlsgate status` is checked once the writers stop.
            wait_until(lambda s=survivor: synced_on(s.address), timeout=5, interval=0.05,
                       message=f"every node SYNCED on {survivor.address} within 5 s of the kill")
            moved_after = time.monotonic() - killed
            rollouts = load.rollouts
            # The survivor keeps taking writes and rolling them out to the nodes that moved to it.
            wait_until(lambda r=rollouts: load.rollouts >= r + 3, timeout=15, message="roll-outs to go on")
            wait_until(lambda s=survivor: synced_on(s.address), timeout=10, interval=0.05,
                       message="every node SYNCED after the further roll-outs")
            assert moved_after < 5
            print(f"kill -9 {victim.address}: every node SYNCED on {survivor.address} after {moved_after:.2f}s")
            start(victim)  # back, for the second round (kill the other one)
        load.stop.set()
        for t in threads:
            t.join(30)
        # What an operator sees once the roll-outs stop: every node SYNCED on the last survivor.
        wait_until(lambda: all_synced(a.address, list(NODES)), timeout=30,
                   message=f"`mtlsgate status` on {a.address} to show every node SYNCED")
    finally:
        load.stop.set()
        for t in threads:
            t.join(30)
        for node in nodes:
            node.stop()
        for replica in replicas:
            if replica.proc is not None:
                with contextlib.suppress(Exception):
                    replica.proc.stop()

    with psycopg.connect(postgres_dsn) as conn:
        history = set(conn.execute("SELECT resource_name, etag_after FROM mtlsgate_audit").fetchall())
        rows = conn.execute("SELECT name, data FROM mtlsgate_resources WHERE name LIKE 'trustConfigs/w%'")
        final = {}
        for name, data in rows:
            message = resources_pb2.TrustConfig()
            message.ParseFromString(bytes(data))
            final[name] = int(message.description)
    lost = load.acked - history
    assert not lost, f"{len(lost)} acknowledged writes are not in the database's history: {sorted(lost)[:5]}"
    # Each name has one writer: what is stored is its last acknowledged write, or a later unanswered one.
    behind = {n: (final.get(n), i) for n, i in load.last_acked.items() if final.get(n, -1) < i}
    assert not behind, f"stored values older than acknowledged ones: {behind}"
    assert load.failed_requests == [], f"{len(load.failed_requests)} failed valid requests: {load.failed_requests[:5]}"
    assert load.ok_requests > 50 and len(load.acked) > 100 and load.rollouts >= 12
    print(f"acked writes {len(load.acked)} (all in the database), unanswered {load.unanswered}, roll-outs "
          f"{load.rollouts}, valid requests {load.ok_requests} ok / {len(load.failed_requests)} failed")
