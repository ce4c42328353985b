"""Nodes with several control-plane replicas: the `--server` list, the failover rotation (pure), and a real
node failing over from a `kill -9`ed replica to the other one without being sent again what it holds."""

from __future__ import annotations

import random
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.pki import DemoPki
from data_plane.node.servers import (
    Endpoint,
    Rotation,
    ServerAddress,
    ServerListError,
    endpoints_for,
    parse_servers,
)
from tests.control_plane.harness import start_control_plane
from tests.support import Proc, free_port, wait_until
from tests.xds.conftest import Api, Node
from tests.xds.fleet_config import certificate, listener, strict_policy, trust_config
from tests.xds.test_fleet import all_synced, status


def test_server_lists_parse_in_order_and_bad_ones_are_named() -> None:
    assert parse_servers("a:18000, 10.0.0.2:18001,[::1]:18002") == [
        ServerAddress("a", 18000), ServerAddress("10.0.0.2", 18001), ServerAddress("::1", 18002)]
    assert str(ServerAddress("::1", 5)) == "[::1]:5"
    for bad, message in [("", "expected HOST:PORT"), ("a:1,", "expected HOST:PORT"), ("a", "'a': expected"),
                         ("a:0", "port from 1 to 65535"), ("a:x", "'a:x'"), ("::1:5", "[ADDRESS]:PORT"),
                         (",".join(["a:1"] * 33), "at most 32")]:
        with pytest.raises(ServerListError, match=re.escape(message)):
            parse_servers(bad)


def test_a_name_with_several_addresses_is_several_endpoints_that_keep_the_name_for_tls() -> None:
    name = ServerAddress("cp.internal", 18000)
    assert endpoints_for(name, ["10.0.0.1", "10.0.0.2", "10.0.0.1", "fd00::3"]) == [
        Endpoint("ipv4:10.0.0.1:18000", "cp.internal:18000 (10.0.0.1)", tls_name="cp.internal"),
        Endpoint("ipv4:10.0.0.2:18000", "cp.internal:18000 (10.0.0.2)", tls_name="cp.internal"),
        Endpoint("ipv6:[fd00::3]:18000", "cp.internal:18000 (fd00::3)", tls_name="cp.internal"),
    ]
    assert endpoints_for(name, []) == []  # did not resolve: skipped, the other servers are still tried
    assert endpoints_for(ServerAddress("::1", 5), ["ignored"]) == [Endpoint("ipv6:[::1]:5", "[::1]:5")]


def test_rotation_moves_on_at_once_after_a_working_stream_and_backs_off_after_failures() -> None:
    a, b = Endpoint("ipv4:10.0.0.1:1", "a"), Endpoint("ipv4:10.0.0.2:1", "b")
    rng = random.Random(7)
    rotation = Rotation(base=0.25, cap=5.0)
    assert rotation.needs_resolving()
    rotation.resolved([a, b])
    assert rotation.current() == a
    # A working stream to a ended (replica killed): next is b, after at most the base jitter.
    delays = [rotation.ended(True, rng)]
    assert rotation.current() == b and 0 <= delays[0] <= 0.25
    # b refuses, then a refuses (everything down): backoff grows, with jitter, up to the cap.
    failures = [rotation.ended(False, rng) for _ in range(12)]
    assert all(0 <= d <= min(5.0, 0.25 * 2 ** (i + 1)) for i, d in enumerate(failures))
    assert max(failures) > 1.0 and len(set(failures)) == len(failures)  # jittered, not a fixed schedule
    assert rotation.needs_resolving()  # wrapped: the names are resolved again (DNS may have changed)
    rotation.resolved([a, b])
    assert rotation.ended(True, rng) <= 0.25 and rotation.failures == 0  # admitted again: backoff reset


# ---------------------------------------------------------------- real processes


@pytest.fixture
def two_replicas(postgres_dsn: str, tmp_path: Path, logs_dir: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Proc, str, str]]]:
    """Two control planes on one PostgreSQL database: (process, xDS/API address, metrics address)."""
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_QUIET", "0.05")
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_MAX", "0.5")
    started = []
    try:  # the first replica is stopped even when the second fails to start
        for _ in range(2):
            metrics = f"127.0.0.1:{free_port()}"
            proc, address = start_control_plane(tmp_path, logs_dir, ["--metrics", metrics], db=postgres_dsn)
            started.append((proc, address, metrics))
        yield started
    finally:
        for proc, _, _ in started:
            proc.stop()


def start_proxy(node_id: str, servers: str, tmp_path: Path, logs_dir: Path) -> Node:
    admin = f"127.0.0.1:{free_port()}"
    args = ["proxy", "--server", servers, "--node-id", node_id, "--cluster", "edge", "--admin", admin,
            "--cache-dir", str(tmp_path / f"cache-{node_id}"), "--workers", "1", "--backoff-max", "1.0"]
    node = Node(node_id, admin, tmp_path / f"cache-{node_id}", args, logs_dir / f"proxy-{node_id}.log")
    node.start()
    return node


def metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def test_a_node_fails_over_from_a_killed_replica_and_is_sent_nothing_again(
        two_replicas: list[tuple[Proc, str, str]], demo_pki: DemoPki, tmp_path: Path, logs_dir: Path) -> None:
    (proc_a, a, _), (_, b, metrics_b) = two_replicas
    api = Api(a)
    try:
        for resource in (trust_config(demo_pki), strict_policy(), certificate(demo_pki),
                         listener("listeners/edge", free_port())):
            api.put(resource)
    finally:
        api.close()
    node = start_proxy("node-1", f"{a},{b}", tmp_path, logs_dir)
    try:
        synced = wait_until(lambda: all_synced(a, ["node-1"]), timeout=30, message="node-1 SYNCED on A")
        versions = {t: s["version"] for t, s in synced["node-1"]["types"].items()}
        applies = metric_sum(node.get("/metrics")[1], "mtlsgate_node_config_applies_total")
        assert applies == 1 and node.dump()["controlPlane"] == a

        proc_a.kill9()
        killed = time.monotonic()
        # SYNCED as B shows it, held by B: until A's heartbeat goes stale B also shows A's row for the node.
        moved = wait_until(lambda: node.dump()["controlPlane"] == b and status(b)["node-1"]["replica"] == b
                           and all_synced(b, ["node-1"]), timeout=5, message="node-1 SYNCED on replica B")
        took = time.monotonic() - killed
        assert {t: s["version"] for t, s in moved["node-1"]["types"].items()} == versions
        assert node.dump()["controlPlane"] == b and node.ready()
        # B sent it nothing (it re-sent the versions it holds, which are B's too) and it applied nothing.
        b_metrics = urllib.request.urlopen(f"http://{metrics_b}/metrics", timeout=5).read().decode()
        assert metric_sum(b_metrics, "mtlsgate_xds_pushes_total") == 0
        assert metric_sum(node.get("/metrics")[1], "mtlsgate_node_config_applies_total") == applies
        assert status(b)["node-1"]["connected"] and took < 5
        # Status from B shows the node moved to B (B's name defaults to its listen address).
        assert status(b)["node-1"]["replica"] == b
    finally:
        node.stop()


def test_the_cli_with_several_servers_uses_the_first_replica_that_answers(
        two_replicas: list[tuple[Proc, str, str]], demo_pki: DemoPki) -> None:
    import json
    import subprocess

    from tests.support import MTLSGATE

    (proc_a, a, _), (_, b, _) = two_replicas
    api = Api(b)
    try:
        api.put(trust_config(demo_pki))
    finally:
        api.close()
    proc_a.kill9()
    got = subprocess.run([*MTLSGATE, "get", "trust-configs", "-o", "json", "--server", f"{a},{b}"],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert "trustConfigs/demo" in got.stdout
    dead = f"127.0.0.1:{free_port()}"
    refused = subprocess.run([*MTLSGATE, "status", "-o", "json", "--server", f"{a},{dead}"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and a in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads(subprocess.run([*MTLSGATE, "status", "-o", "json", "--server", f"{dead},{b}"],
                                     capture_output=True, text=True, timeout=60, check=True).stdout)["nodes"] == []


def _private_hosts_file_works() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"],
                           capture_output=True, timeout=10)
    return probe.returncode == 0


def test_a_name_resolving_to_two_replicas_fails_over_between_its_addresses(
        postgres_dsn: str, demo_pki: DemoPki, tmp_path: Path, logs_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Real name resolution: the node runs in its own mount namespace whose /etc/hosts gives
    `cp.mtlsgate.test` two addresses, 127.0.0.1 (replica A) and 127.0.0.2 (replica B), on one port."""
    import sys

    from tests.control_plane.harness import control_plane_args, health_serving

    if not _private_hosts_file_works():
        pytest.skip("needs `unshare -m` and mount (root) to give the node its own /etc/hosts")
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_QUIET", "0.05")
    port = free_port("127.0.0.2")
    replicas = []
    for host in ("127.0.0.1", "127.0.0.2"):
        address = f"{host}:{port}"
        proc = Proc(control_plane_args(address, postgres_dsn), logs_dir / f"control-plane-{host}.log")
        replicas.append((proc, address))
    node: Node | None = None
    try:
        for _, address in replicas:
            wait_until(lambda a=address: health_serving(a), timeout=30, message=f"replica on {address}")
        api = Api(replicas[0][1])
        try:
            for resource in (trust_config(demo_pki), strict_policy(), certificate(demo_pki),
                             listener("listeners/edge", free_port(), backend="127.0.0.1:9")):
                api.put(resource)
        finally:
            api.close()
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 localhost\n127.0.0.1 cp.mtlsgate.test\n127.0.0.2 cp.mtlsgate.test\n")
        admin = f"127.0.0.1:{free_port()}"
        proxy = " ".join([sys.executable, "-m", "control_plane.cli.main", "proxy", "--server",
                          f"cp.mtlsgate.test:{port}", "--node-id", "node-dns", "--cluster", "edge", "--admin", admin,
                          "--cache-dir", str(tmp_path / "cache"), "--workers", "1", "--backoff-max", "1.0"])
        node = Node("node-dns", admin, tmp_path / "cache",
                    ["unshare", "-m", "sh", "-c", f"mount --bind {hosts} /etc/hosts && exec {proxy}"],
                    logs_dir / "proxy-node-dns.log")
        node.proc = Proc(node.args, node.log_path, mtlsgate=False)
        wait_until(lambda: all_synced(replicas[0][1], ["node-dns"]), timeout=30, message="node SYNCED on A")
        assert node.dump()["controlPlane"] == f"cp.mtlsgate.test:{port} (127.0.0.1)"
        replicas[0][0].kill9()
        # On B and SYNCED there (B also shows A's row for the node until A's heartbeat goes stale).
        wait_until(lambda: node.dump()["controlPlane"] == f"cp.mtlsgate.test:{port} (127.0.0.2)"
                   and all_synced(replicas[1][1], ["node-dns"]), timeout=5, message="node SYNCED on B")
    finally:
        if node is not None:
            node.stop()
        for proc, _ in replicas:
            proc.stop()
