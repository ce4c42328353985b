"""The compose stack (compose.yaml) brought up for real on a Docker engine and driven from the host: mTLS
through both proxy containers, a CRL rotation with `mtlsgate apply` that both running containers enforce
(the docker SDK proves none restarted), `mtlsgate status` all SYNCED, and a clean `down`.

Skipped with the reason when no engine is reachable; with CI=true that is a failure instead (.ci/run starts
an engine). `COMPOSE_FILE` (colon-separated, as compose itself reads it) selects override files such as
compose.ci.yaml; unset, compose.ci.yaml is added when the engine has .ci/run's `mtlsgate-base:ci` image.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.scenario import (
    ClientIdentity,
    accepted_and_verified,
    acked_versions,
    all_synced,
    apply,
    distinct_free_ports,
    forwarded_with_error,
    rejected,
    request,
)
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
LONG_RUNNING = ("control-plane", "backend", "backend-b", "proxy-a", "proxy-b")
PORT_VARIABLES = (
    "MTLSGATE_CONTROL_PLANE_PORT",
    "MTLSGATE_CONTROL_PLANE_METRICS_PORT",
    "MTLSGATE_PROXY_A_STRICT_PORT",
    "MTLSGATE_PROXY_A_PERMISSIVE_PORT",
    "MTLSGATE_PROXY_A_ADMIN_PORT",
    "MTLSGATE_PROXY_B_STRICT_PORT",
    "MTLSGATE_PROXY_B_PERMISSIVE_PORT",
    "MTLSGATE_PROXY_B_ADMIN_PORT",
)

# A cold CI run builds the image (pip downloads every dependency) inside this test's setup.
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(900)]


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the compose suite must run; .ci/run starts an engine)")
    pytest.skip(reason)


def compose_cli() -> list[str] | None:
    """`docker compose` (v2) when the plugin is there, else Debian's `docker-compose` (v1)."""
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def docker_client():  # type: ignore[no-untyped-def]
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:
        skip_or_fail(f"no Docker engine reachable: {exc}")
    if compose_cli() is None:
        skip_or_fail("neither `docker compose` nor `docker-compose` is installed")
    yield client
    client.close()


@dataclass
class Stack:
    cli: list[str]
    env: dict[str, str]
    client: object  # docker.DockerClient
    project: str
    pki: Path

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        files = [
            arg for f in self.env.get("COMPOSE_FILE", "compose.yaml").split(os.pathsep) for arg in ("-f", f)
        ]
        return subprocess.run(
            [*self.cli, "-p", self.project, *files, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def container(self, service: str):  # type: ignore[no-untyped-def]
        found = self.client.containers.list(
            all=True,
            filters={  # type: ignore[attr-defined]
                "label": [
                    f"com.docker.compose.project={self.project}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )
        assert len(found) == 1, f"{service}: {len(found)} containers"
        return found[0]

    def health(self, service: str) -> str:
        container = self.container(service)
        container.reload()
        return container.attrs["State"].get("Health", {}).get("Status", container.status)

    def port(self, variable: str) -> int:
        return int(self.env[variable])

    def url(self, variable: str) -> str:
        return f"https://127.0.0.1:{self.port(variable)}/"


@pytest.fixture
def stack(docker_client, tmp_path: Path) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    cli = compose_cli()
    assert cli is not None
    env = {
        **os.environ,
        **dict(
            zip(PORT_VARIABLES, map(str, distinct_free_ports("127.0.0.1", len(PORT_VARIABLES))), strict=True)
        ),
    }
    if "COMPOSE_FILE" not in env:
        # An engine holding .ci/run's registry-less base image is a CI-style engine: build like CI does.
        ci_style = any(
            "mtlsgate-base:ci" in image.tags for image in docker_client.images.list("mtlsgate-base")
        )
        env["COMPOSE_FILE"] = os.pathsep.join(
            ["compose.yaml", "compose.ci.yaml"] if ci_style else ["compose.yaml"]
        )
    project = f"mtlsgate-e2e-{os.getpid()}"
    running = Stack(cli, env, docker_client, project, tmp_path / "pki")
    try:
        up = running.compose("up", "-d", "--build", timeout=900)
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}\n{up.stderr}"
        for service in LONG_RUNNING:
            wait_until(
                lambda s=service: running.health(s) == "healthy",
                timeout=120,
                interval=0.5,
                message=f"{service} healthy",
            )
        configure = running.container("configure")
        wait_until(
            lambda: (configure.reload(), configure.status)[1] == "exited",
            timeout=60,
            message="configure to finish",
        )
        assert configure.attrs["State"]["ExitCode"] == 0, configure.logs().decode()
        # The PKI lives in the stack's `pki` volume: copy it out as a user would (`docker cp`).
        stream, _ = running.container("control-plane").get_archive("/pki")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractall(tmp_path, filter="data")
        yield running
    finally:
        logs = running.compose("logs", "--no-color", timeout=60)
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
        print("\n".join((logs.stdout + logs.stderr).splitlines()[-80:]))  # shown by pytest on failure
        running.compose("down", "-v", "--remove-orphans", timeout=120)


def test_compose_stack_end_to_end(stack: Stack) -> None:
    ca = stack.pki / "ca.pem"
    valid = ClientIdentity(stack.pki / "client.pem", stack.pki / "client-key.pem")
    revoked = ClientIdentity(stack.pki / "revoked.pem", stack.pki / "revoked-key.pem")
    strict = [stack.url("MTLSGATE_PROXY_A_STRICT_PORT"), stack.url("MTLSGATE_PROXY_B_STRICT_PORT")]
    permissive = [
        stack.url("MTLSGATE_PROXY_A_PERMISSIVE_PORT"),
        stack.url("MTLSGATE_PROXY_B_PERMISSIVE_PORT"),
    ]
    server = f"127.0.0.1:{stack.port('MTLSGATE_CONTROL_PLANE_PORT')}"
    # The stack is secure (SPEC §8): from the host the CLI needs the admin credentials, as a context.
    from tests.e2e.scenario import mtlsgate

    unauthenticated = mtlsgate("status", "--server", server, "--ca-cert", str(ca))
    assert unauthenticated.returncode == 1
    made = mtlsgate("config", "set-context", "compose-host", "--server", server, "--ca-cert", str(ca),
                    "--cert", str(stack.pki / "admin.pem"), "--key", str(stack.pki / "admin-key.pem"),
                    "--token-file", str(stack.pki / "admin-token"), "--use")
    assert made.returncode == 0, made.stderr

    for url in strict:
        assert accepted_and_verified(answer := request(url, ca, valid)), (url, answer)
        assert rejected(answer := request(url, ca, revoked)), (url, answer)
    for url in permissive:
        assert forwarded_with_error(answer := request(url, ca, revoked), "client_cert_revoked"), (url, answer)
    wait_until(lambda: all_synced(server, {"proxy-a", "proxy-b"}), timeout=20, message="status all SYNCED")
    import urllib.request

    metrics_url = f"http://127.0.0.1:{stack.port('MTLSGATE_CONTROL_PLANE_METRICS_PORT')}/metrics"
    metrics = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    assert "mtlsgate_xds_connected_nodes 2.0" in metrics, metrics[:2000]

    def incarnations() -> dict[str, tuple[str, int, str]]:
        out = {}
        for service in LONG_RUNNING:
            container = stack.container(service)
            container.reload()
            out[service] = (
                container.id,
                container.attrs["RestartCount"],
                container.attrs["State"]["StartedAt"],
            )
        return out

    before = incarnations()
    versions_before = acked_versions(server)
    # CRL rotation from the host with the CLI: the new CRL also revokes client-valid.
    apply(stack.pki / "trust-config-rotated.yaml", server)
    for url in strict:
        wait_until(
            lambda u=url: rejected(request(u, ca, valid)),
            timeout=15,
            message=f"{url} to refuse the newly revoked client",
        )
    for url in permissive:
        assert forwarded_with_error(answer := request(url, ca, valid), "client_cert_revoked"), (url, answer)
    wait_until(lambda: all_synced(server, {"proxy-a", "proxy-b"}), timeout=15, message="status all SYNCED")
    assert incarnations() == before, "a container restarted during the rotation"
    versions_after = acked_versions(server)
    for node in ("proxy-a", "proxy-b"):  # only the TrustBundle was re-sent
        assert versions_after[node]["TrustBundle"] != versions_before[node]["TrustBundle"]
        assert versions_after[node]["Listener"] == versions_before[node]["Listener"]

    # Clean shutdown: every process honours SIGTERM (no 10 s kill), then `down` removes everything.
    started = time.monotonic()
    stop = stack.compose("stop", timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert time.monotonic() - started < 15, "compose stop waited for the kill timeout"
    for service in LONG_RUNNING:
        container = stack.container(service)
        container.reload()
        exit_code = container.attrs["State"]["ExitCode"]
        assert exit_code == 0, f"{service} exited with {exit_code} on SIGTERM (137: it had to be killed)"
    down = stack.compose("down", "-v", timeout=120)
    assert down.returncode == 0, down.stderr
    leftovers = stack.client.containers.list(  # type: ignore[attr-defined]
        all=True, filters={"label": f"com.docker.compose.project={stack.project}"}
    )
    assert leftovers == []


# ---------------------------------------------------------------- the README's Docker section, as written

README_PORTS = (18000, 9900, 8443, 8444, 9901, 9443, 9444, 9902)


def check_docker_promise(command: str, comment: str, done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    """What the README's comment says this line of its Docker section does, checked on what it did."""
    from tests.e2e.test_readme import echo_headers

    said = f"`{command}`  # {comment}\nexit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    assert done.returncode == 0, said
    if comment.startswith("200"):
        headers = echo_headers(done.stdout)
        assert headers["x-client-cert-chain-verified"] == "true", said
    elif comment.startswith("every node SYNCED"):
        rows = [line.split() for line in done.stdout.splitlines() if line.startswith("proxy-")]
        assert len(rows) == 2 and all(row[3] == "SYNCED" for row in rows), said
    elif comment.startswith("the demo PKI"):
        assert (cwd / "pki" / "ca.pem").is_file() and (cwd / "pki" / "client.pem").is_file(), said
    elif comment.startswith("returns once both proxies enforce"):
        assert "node proxy-a acked" in done.stdout or "no connected node is affected" in done.stdout, said
    elif not comment.startswith(("the stack", "control-plane, backend", "stop and delete")):
        pytest.fail(f"the README promises something this test does not check; teach check_docker_promise: {said}")


def test_readme_docker_section_as_written(docker_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every line of README.md's Docker section, run as written from a directory of its own — twice, so
    `down -v`, a second `up` and the PKI copy over the first one's are covered too. With only Debian's
    docker-compose 1.29 installed, `docker compose` is run as `docker-compose`, as the README says to."""
    from tests.e2e.test_readme import section, sh_blocks, split_comment

    [block, *_] = sh_blocks(section((ROOT / "README.md").read_text(), "Run it with Docker"))
    cli = compose_cli()
    assert cli is not None
    taken = []
    for port in README_PORTS:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                taken.append(port)
    if taken:
        skip_or_fail(f"the README's Docker section publishes fixed ports and these are taken: {taken}")
    if "COMPOSE_FILE" in os.environ:  # override files chosen by the caller, as for the stack fixture
        files = [ROOT / f for f in os.environ["COMPOSE_FILE"].split(os.pathsep)]
    else:
        ci_style = any("mtlsgate-base:ci" in i.tags for i in docker_client.images.list("mtlsgate-base"))
        files = [ROOT / "compose.yaml", *([ROOT / "compose.ci.yaml"] if ci_style else [])]
    env = {**os.environ, "COMPOSE_FILE": os.pathsep.join(map(str, files)),
           "COMPOSE_PROJECT_NAME": f"mtlsgate-readme-{os.getpid()}"}
    for name in PORT_VARIABLES:
        env.pop(name, None)  # the README's ports, not moved ones
    compose_words = " ".join(cli)
    cas = []
    try:
        for _ in range(2):
            for line in block:
                command, comment = split_comment(line)
                command = command.replace("docker compose", compose_words)
                done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                                      text=True, timeout=900)
                check_docker_promise(command, comment, done, tmp_path)
                if "docker cp" in command:
                    cas.append((tmp_path / "pki" / "ca.pem").read_bytes())
        assert len(cas) == 2 and cas[0] != cas[1], "the second up made a new PKI and the copy replaced the old one"
        assert not (tmp_path / "pki" / "pki").exists(), "docker cp nested the PKI inside the old copy"
    finally:
        subprocess.run([*cli, "down", "-v", "--remove-orphans"], cwd=tmp_path, env=env, capture_output=True,
                       timeout=300)
