"""The HA compose variant (compose.ha.yaml: PostgreSQL and two control-plane replicas behind both proxies)
brought up for real and driven from the host (SPEC §14): both proxies SYNCED, one on each replica, and
`status` from either replica shows both; then, under a writer loop and a valid-client loop through both
proxies, replica A is killed (SIGKILL): every node is SYNCED on replica B within 10 s, no valid request
fails, every acknowledged write is there, and the CLI, given a context listing both replicas, answers
from B.

In CI (`COMPOSE_FILE` names compose.ci.yaml) compose.ha.ci.yaml is added too: PostgreSQL is built from
Debian's package on the debootstrap base image, as no registry is reachable. Elsewhere the official
`postgres` image is used. Skipped without an engine, a failure with CI=true (like test_compose.py).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from mtlsgate.v1 import api_pb2, api_pb2_grpc, resources_pb2

from tests.e2e.scenario import ClientIdentity, accepted_and_verified, distinct_free_ports, mtlsgate, request
from tests.e2e.test_compose import PORT_VARIABLES, Stack, compose_cli, docker_client  # noqa: F401 - fixture
from tests.support import wait_until

LONG_RUNNING = ("postgres", "control-plane", "control-plane-b", "backend", "proxy-a", "proxy-b")
HA_PORTS = ("MTLSGATE_CONTROL_PLANE_B_PORT", "MTLSGATE_CONTROL_PLANE_B_METRICS_PORT")

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(900)]


def ha_files(environ: dict[str, str], ci_style: bool) -> str:
    """The caller's compose files (CI: compose.yaml:compose.ci.yaml) plus the HA override(s)."""
    base = environ.get("COMPOSE_FILE", "").split(os.pathsep) if environ.get("COMPOSE_FILE") else (
        ["compose.yaml", "compose.ci.yaml"] if ci_style else ["compose.yaml"])
    ci = "compose.ci.yaml" in base
    return os.pathsep.join([*base, "compose.ha.yaml", *(["compose.ha.ci.yaml"] if ci else [])])


@pytest.fixture
def ha_stack(docker_client, tmp_path: Path) -> Iterator[Stack]:  # type: ignore[no-untyped-def]  # noqa: F811
    cli = compose_cli()
    assert cli is not None
    names = (*PORT_VARIABLES, *HA_PORTS)
    env = {**os.environ, **dict(zip(names, map(str, distinct_free_ports("127.0.0.1", len(names))), strict=True))}
    ci_style = any("mtlsgate-base:ci" in image.tags for image in docker_client.images.list("mtlsgate-base"))
    env["COMPOSE_FILE"] = ha_files(env, ci_style)
    project = f"mtlsgate-ha-{os.getpid()}"
    running = Stack(cli, env, docker_client, project, tmp_path / "pki")
    try:
        up = running.compose("up", "-d", "--build", timeout=900)
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}\n{up.stderr}"
        for service in LONG_RUNNING:
            wait_until(lambda s=service: running.health(s) == "healthy", timeout=180, interval=0.5,
                       message=f"{service} healthy")
        configure = running.container("configure")
        wait_until(lambda: (configure.reload(), configure.status)[1] == "exited", timeout=60,
                   message="configure to finish")
        assert configure.attrs["State"]["ExitCode"] == 0, configure.logs().decode()
        stream, _ = running.container("control-plane-b").get_archive("/pki")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractall(tmp_path, filter="data")
        yield running
    finally:
        logs = running.compose("logs", "--no-color", timeout=60)
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
        print("\n".join((logs.stdout + logs.stderr).splitlines()[-80:]))  # shown by pytest on failure
        running.compose("down", "-v", "--remove-orphans", timeout=120)


def fleet(channel: grpc.Channel) -> tuple[dict[str, api_pb2.NodeStatus], dict[str, str]]:
    """ListNodes from one replica: nodes by id, and replica id → name."""
    response = api_pb2_grpc.FleetServiceStub(channel).ListNodes(api_pb2.ListNodesRequest(), timeout=5)
    return {n.id: n for n in response.nodes}, {r.id: r.name for r in response.replicas}


def placed(channel: grpc.Channel, where: dict[str, str]) -> bool:
    """Every node in `where` connected, SYNCED and held by the replica named there."""
    try:
        nodes, names = fleet(channel)
    except grpc.RpcError:
        return False
    return all(n in nodes and nodes[n].connected and nodes[n].state == api_pb2.SYNCED
               and names.get(nodes[n].replica) == replica for n, replica in where.items())


@dataclass
class Load:
    acked: list[str] = field(default_factory=list)
    unanswered: int = 0
    ok_requests: int = 0
    failed_requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def writer(channels: list[grpc.Channel], load: Load) -> None:
    """New TrustConfigs one after the other, to replica A and, once A fails, to B."""
    preferred, i = 0, 0
    while not load.stop.is_set():
        stub = api_pb2_grpc.TrustConfigServiceStub(channels[preferred])
        name = f"trustConfigs/ha-{i}"
        try:
            stub.UpdateTrustConfig(api_pb2.UpdateTrustConfigRequest(
                trust_config=resources_pb2.TrustConfig(name=name, description=str(i)), allow_missing=True),
                timeout=5)
        except grpc.RpcError:
            with load.lock:
                load.unanswered += 1  # may or may not have committed: counted neither way
            preferred = 1 - preferred
            time.sleep(0.05)
        else:
            with load.lock:
                load.acked.append(name)
        i += 1
        time.sleep(0.02)


def clients(urls: list[str], ca: Path, valid: ClientIdentity, load: Load) -> None:
    while not load.stop.is_set():
        for url in urls:
            answer = request(url, ca, valid)
            with load.lock:
                if accepted_and_verified(answer):
                    load.ok_requests += 1
                else:
                    load.failed_requests.append(f"{url}: {answer}")


def test_kill_a_replica_of_the_ha_compose_stack(ha_stack: Stack) -> None:
    pki = ha_stack.pki
    ca, valid = pki / "ca.pem", ClientIdentity(pki / "client.pem", pki / "client-key.pem")
    a = f"127.0.0.1:{ha_stack.port('MTLSGATE_CONTROL_PLANE_PORT')}"
    b = f"127.0.0.1:{ha_stack.port('MTLSGATE_CONTROL_PLANE_B_PORT')}"
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "admin-key.pem").read_bytes(),
                                               (pki / "admin.pem").read_bytes())
    channels = [grpc.secure_channel(a, credentials), grpc.secure_channel(b, credentials)]
    # The CLI from the host, as a user sets it up: one context listing both replicas.
    made = mtlsgate("config", "set-context", "compose-ha", "--server", f"{a},{b}", "--ca-cert", str(ca),
                    "--cert", str(pki / "admin.pem"), "--key", str(pki / "admin-key.pem"),
                    "--token-file", str(pki / "admin-token"), "--use")
    assert made.returncode == 0, made.stderr
    load = Load()
    threads = [threading.Thread(target=writer, args=(channels, load), daemon=True),
               threading.Thread(target=clients, args=([ha_stack.url("MTLSGATE_PROXY_A_STRICT_PORT"),
                                                      ha_stack.url("MTLSGATE_PROXY_B_STRICT_PORT")], ca, valid, load),
                                daemon=True)]
    try:
        # Each proxy starts on the first replica it lists; both replicas show the whole fleet.
        where = {"proxy-a": "control-plane", "proxy-b": "control-plane-b"}
        for channel in channels:
            wait_until(lambda c=channel: placed(c, where), timeout=30, interval=0.2,
                       message="proxy-a SYNCED on control-plane and proxy-b on control-plane-b, from each replica")
        for t in threads:
            t.start()
        wait_until(lambda: len(load.acked) >= 10 and load.ok_requests >= 10, timeout=30,
                   message="the writer and the clients to be under way")

        ha_stack.container("control-plane").kill()  # SIGKILL: no clean shutdown, no retire
        killed = time.monotonic()
        both_on_b = {"proxy-a": "control-plane-b", "proxy-b": "control-plane-b"}
        wait_until(lambda: placed(channels[1], both_on_b), timeout=10, interval=0.1,
                   message="every proxy SYNCED on control-plane-b within 10 s of the kill")
        moved_after = time.monotonic() - killed
        acked_at_kill = len(load.acked)
        wait_until(lambda: len(load.acked) >= acked_at_kill + 10, timeout=20,
                   message="writes to go on through control-plane-b")
        load.stop.set()
        for t in threads:
            t.join(30)

        assert load.failed_requests == [], f"{len(load.failed_requests)} failed: {load.failed_requests[:3]}"
        stored = set()
        token = ""
        stub = api_pb2_grpc.TrustConfigServiceStub(channels[1])
        while True:
            page = stub.ListTrustConfigs(api_pb2.ListResourcesRequest(page_size=500, page_token=token), timeout=10)
            stored |= {tc.name for tc in page.trust_configs}
            token = page.next_page_token
            if not token:
                break
        lost = [name for name in load.acked if name not in stored]
        assert not lost, f"{len(lost)} acknowledged writes are missing: {lost[:5]}"
        # The context lists A first; A is gone, so the CLI answers from B, showing both proxies there.
        status = mtlsgate("status", "-o", "json")
        assert status.returncode == 0, status.stderr
        document = json.loads(status.stdout)
        shown = {n["id"]: (n["replica"], n["state"], n["connected"]) for n in document["nodes"]}
        assert {n: shown.get(n) for n in ("proxy-a", "proxy-b")} == {
            "proxy-a": ("control-plane-b", "SYNCED", True), "proxy-b": ("control-plane-b", "SYNCED", True)}
        print(f"HA compose: every proxy SYNCED on control-plane-b {moved_after:.2f}s after the kill; "
              f"{len(load.acked)} acked writes all present ({load.unanswered} unanswered); "
              f"{load.ok_requests} valid requests, 0 failed")
    finally:
        load.stop.set()
        for channel in channels:
            channel.close()
