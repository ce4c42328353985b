"""`mtlsgate demo` as a user runs it: one command brings up control plane, echo backend and two proxy nodes;
mTLS through both nodes, a CRL rotation with `mtlsgate apply` enforced without restarts, `status` SYNCED,
Ctrl-C stops everything."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.scenario import (
    ClientIdentity,
    accepted_and_verified,
    acked_versions,
    all_synced,
    apply,
    distinct_free_ports,
    forwarded_with_error,
    mtlsgate,
    rejected,
    request,
)
from tests.support import Proc, port_open, wait_until


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (a proxy supervisor's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


@dataclass(frozen=True)
class DemoPorts:
    """Free ports for one `mtlsgate demo` run (nodes listen on 127.0.0.2 and 127.0.0.3)."""

    control_plane: int
    backend: int
    admin_a: int
    admin_b: int
    strict: int
    permissive: int
    metrics: int
    crl_publisher: int

    @classmethod
    def free(cls) -> DemoPorts:
        control_plane, backend, admin_a, admin_b, metrics, crl_publisher = distinct_free_ports("127.0.0.1", 6)
        strict, permissive = distinct_free_ports("127.0.0.2", 2)
        return cls(control_plane, backend, admin_a, admin_b, strict, permissive, metrics, crl_publisher)

    def args(self, directory: Path) -> list[str]:
        return [
            "demo", "--dir", str(directory),
            "--control-plane", f"127.0.0.1:{self.control_plane}",
            "--backend", f"127.0.0.1:{self.backend}",
            "--strict-port", str(self.strict),
            "--permissive-port", str(self.permissive),
            "--admin-ports", f"{self.admin_a},{self.admin_b}",
            "--control-plane-metrics", f"127.0.0.1:{self.metrics}",
            "--crl-publisher", f"127.0.0.1:{self.crl_publisher}",
        ]


@dataclass
class RunningDemo:
    proc: Proc
    directory: Path
    endpoints: dict
    pids: dict[str, int]

    def identity(self, who: str) -> ClientIdentity:
        return ClientIdentity(Path(self.endpoints[f"{who}_cert"]), Path(self.endpoints[f"{who}_key"]))

    @property
    def ca(self) -> Path:
        return Path(self.endpoints["ca_cert"])


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[RunningDemo]:
    directory = tmp_path / "demo"
    args = [*DemoPorts.free().args(directory), "--timeout", "60"]
    proc = Proc(args, tmp_path / "demo.log")
    try:
        endpoints_file = directory / "endpoints.json"
        wait_until(
            lambda: endpoints_file.exists() or not proc.alive(),
            timeout=90,
            interval=0.2,
            message="the demo to write endpoints.json",
        )
        assert proc.alive(), f"demo exited early:\n{proc.log()}"
        yield RunningDemo(
            proc,
            directory,
            json.loads(endpoints_file.read_text()),
            json.loads((directory / "pids.json").read_text()),
        )
    finally:
        proc.stop(timeout=30)
        for log in sorted((directory / "logs").glob("*.log")):  # shown by pytest on failure
            print(f"--- {log.name}", *log.read_text(errors="replace").splitlines()[-20:], sep="\n")


@pytest.mark.slow
def test_demo_end_to_end(demo: RunningDemo) -> None:
    endpoints = demo.endpoints
    assert set(endpoints) == {
        "control_plane",
        "listeners",
        "ca_cert",
        "client_cert",
        "client_key",
        "revoked_cert",
        "revoked_key",
    }
    strict, permissive = endpoints["listeners"]["strict"], endpoints["listeners"]["permissive"]
    assert len(strict) == len(permissive) == 2, "one URL per proxy node"
    valid, revoked = demo.identity("client"), demo.identity("revoked")
    server = endpoints["control_plane"]

    # Through both nodes: valid accepted with verified headers, revoked and missing refused by strict,
    # forwarded with the error by permissive.
    for url in strict:
        assert accepted_and_verified(answer := request(url, demo.ca, valid)), (url, answer)
        assert rejected(answer := request(url, demo.ca, revoked)), (url, answer)
        assert rejected(answer := request(url, demo.ca, ClientIdentity(None, None))), (url, answer)
    for url in permissive:
        assert accepted_and_verified(answer := request(url, demo.ca, valid)), (url, answer)
        assert forwarded_with_error(answer := request(url, demo.ca, revoked), "client_cert_revoked"), answer
        no_cert = request(url, demo.ca, ClientIdentity(None, None))
        assert no_cert.status == 200 and no_cert.backend_headers["x-client-cert-present"] == "false", no_cert

    assert all_synced(server, {"demo-a", "demo-b"})
    # The control plane's /metrics is on in the demo (the port is in the printed instructions).
    metrics_url = re.search(r"metrics (http://\S+/metrics)", demo.proc.log())
    assert metrics_url, demo.proc.log()
    import urllib.request

    metrics = urllib.request.urlopen(metrics_url[1], timeout=5).read().decode()
    assert re.search(r"^mtlsgate_xds_connected_nodes 2\.0$", metrics, re.M), metrics
    versions_before = acked_versions(server)
    proxies = {name: demo.pids[name] for name in ("demo-a", "demo-b")}
    workers_before = {name: descendants(pid) for name, pid in proxies.items()}

    # CRL rotation with the CLI: the new CRL revokes client-valid too. Both running nodes enforce it.
    apply(demo.directory / "trust-config-rotated.yaml", server)
    for url in strict:
        wait_until(
            lambda u=url: rejected(request(u, demo.ca, valid)),
            timeout=10,
            message=f"{url} to refuse the newly revoked client",
        )
    for url in permissive:
        assert forwarded_with_error(answer := request(url, demo.ca, valid), "client_cert_revoked"), answer
    wait_until(lambda: all_synced(server, {"demo-a", "demo-b"}), timeout=10, message="status all SYNCED")
    # Only the TrustBundle changed version: listeners and the server certificate were not re-sent.
    versions_after = acked_versions(server)
    for node in ("demo-a", "demo-b"):
        before, after = versions_before[node], versions_after[node]
        assert after["TrustBundle"] != before["TrustBundle"], (node, before, after)
        assert (
            after["Listener"] == before["Listener"]
            and after["ServerCertificate"] == before["ServerCertificate"]
        )

    # No restart: same supervisors, same workers.
    for name, pid in proxies.items():
        assert pid_alive(pid), f"{name} supervisor (pid {pid}) is gone"
        assert descendants(pid) == workers_before[name], f"{name}'s worker processes changed"

    # And back: the original CRL makes client-valid valid again, still without restarts.
    apply(demo.directory / "mtlsgate.yaml", server)
    for url in strict:
        wait_until(
            lambda u=url: accepted_and_verified(request(u, demo.ca, valid)),
            timeout=10,
            message=f"{url} to accept client-valid again",
        )

    # Revoke at the CA: `pki revoke` re-signs the CRL its publisher serves; the control plane fetches it
    # (crlSources, refreshInterval 2s) and both nodes refuse the client, and the strict listener's
    # revalidateOnUpdate closes a connection the client already had open. Nobody writes the TrustConfig.
    parts = urlsplit(strict[0])
    context = ssl.create_default_context(cafile=str(demo.ca))
    context.load_cert_chain(str(valid.cert), str(valid.key))
    kept = context.wrap_socket(socket.create_connection((parts.hostname, parts.port), timeout=10),
                               server_hostname=parts.hostname)
    kept.sendall(b"GET /kept HTTP/1.1\r\nHost: demo\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:  # the whole response, so that what is read later is only the close
        answer += kept.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += kept.recv(65536)
    revision = len(mtlsgate("audit", "trustConfigs/demo", "-o", "json", "--server", server).stdout)
    result = mtlsgate("pki", "revoke", str(valid.cert), "--dir", str(demo.directory))
    assert result.returncode == 0, result.stderr
    revoked_at = time.monotonic()
    for url in strict:
        wait_until(lambda u=url: rejected(request(u, demo.ca, valid)), timeout=10,
                   message=f"{url} to refuse the client revoked at the CA")
    print(f"pki revoke → both nodes refuse: {time.monotonic() - revoked_at:.2f}s (refreshInterval 2s)")
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        assert kept.recv(1) == b""  # closed by the node (revalidateOnUpdate), not left open
    kept.close()
    audit = mtlsgate("audit", "trustConfigs/demo", "-o", "json", "--server", server).stdout
    assert len(audit) > revision and "system:crl-fetcher" in audit

    # Ctrl-C: everything stops, ports are released.
    everything = set(demo.pids.values()) | set().union(*workers_before.values())
    demo.proc.popen.send_signal(signal.SIGINT)
    assert demo.proc.popen.wait(30) == 0, demo.proc.log()
    wait_until(
        lambda: not any(pid_alive(p) for p in everything), timeout=10, message="every demo process to exit"
    )
    host, port = server.rsplit(":", 1)
    assert not port_open(host, int(port))
    assert "everything stopped" in demo.proc.log()


@pytest.mark.slow
def test_apply_wait_and_status_gate_on_the_fleet(demo: RunningDemo) -> None:
    """`apply --wait` returns only once both nodes enforce the change: 20 CRL rotations back and forth,
    each followed at once by real mTLS requests through both nodes, never see the previous verdict
    (before --wait, a request right after `apply` got the old one). A node that cannot take a change
    (its port is taken) makes --wait and `status` exit 1 naming it, with its NACK; once it recovers,
    `status --wait-synced` exits 0 and the JSON holds no stale error text."""
    from urllib.parse import urlsplit

    import yaml

    from tests.e2e.scenario import mtlsgate

    server = demo.endpoints["control_plane"]
    strict = demo.endpoints["listeners"]["strict"]
    valid = demo.identity("client")
    original = demo.directory / "trust-config-original.yaml"
    original.write_text(yaml.safe_dump(next(yaml.safe_load_all((demo.directory / "mtlsgate.yaml").read_text()))))
    rotated = demo.directory / "trust-config-rotated.yaml"
    stale = []
    for round_ in range(20):
        revoke = round_ % 2 == 0
        done = mtlsgate("apply", "--wait=30s", "-f", str(rotated if revoke else original), "--server", server)
        assert done.returncode == 0, done.stderr
        assert "node demo-a acked after" in done.stdout and "node demo-b acked after" in done.stdout, done.stdout
        for url in strict:
            answer = request(url, demo.ca, valid)
            if (rejected(answer) if revoke else accepted_and_verified(answer)) is False:
                stale.append((round_, url, answer))
    assert stale == []

    node_b_host = urlsplit(strict[1]).hostname
    with socket.socket() as squatter:
        squatter.bind((node_b_host, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        extra = demo.directory / "extra-listener.yaml"
        extra.write_text(f"kind: Listener\nname: extra\nport: {taken}\ncertificate: certificates/edge\n"
                         f"backend: {demo.endpoints['control_plane'].rsplit(':', 1)[0]}:9\n")
        done = mtlsgate("apply", "--wait=30s", "-f", str(extra), "--server", server)
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "node demo-a acked after" in done.stdout
        assert done.stderr == (f"mtlsgate apply: --wait: rejected by demo-b (Listener: listeners/extra: port {taken} "
                               f"is already in use on this node (listen address {node_b_host}))\n")
        shown = mtlsgate("status", "--server", server)
        assert (shown.returncode, shown.stderr) == (1, "mtlsgate status: not synced: demo-b ERROR\n")
        assert f"port {taken} is already in use" in shown.stdout
        waited = mtlsgate("status", "--wait-synced", "1s", "--server", server)
        assert waited.returncode == 1 and "not synced after 1s: demo-b ERROR: Listener: listeners/extra" in \
            waited.stderr, waited.stderr
        assert mtlsgate("delete", "listener", "extra", "--server", server).returncode == 0
    recovered = mtlsgate("status", "--wait-synced", "30s", "-o", "json", "--server", server)
    assert recovered.returncode == 0, recovered.stderr
    node_b = {n["id"]: n for n in json.loads(recovered.stdout)["nodes"]}["demo-b"]
    listener_type = node_b["types"]["type.googleapis.com/mtlsgate.v1.Listener"]
    assert (node_b["state"], listener_type["error"]) == ("SYNCED", "")
    assert [n["error"] for n in listener_type["nacks"]] == [
        f"listeners/extra: port {taken} is already in use on this node (listen address {node_b_host})"]
    assert mtlsgate("status", "--server", server).returncode == 0


@pytest.mark.slow
def test_demo_with_other_node_addresses(tmp_path: Path) -> None:
    """Any pair of node addresses works (before: the server certificate named only 127.0.0.1-3, so the
    demo's own readiness probe failed with "IP address mismatch" and it never got ready), also on a PKI
    kept from an earlier run with the default addresses: same CA, a server certificate for the new ones."""
    directory = tmp_path / "d"
    first = Proc(["demo", "--dir", str(directory), "--prepare-only"], tmp_path / "prepare.log")
    wait_until(lambda: not first.alive(), message="demo --prepare-only to exit")
    assert first.stop() == 0, first.log()
    ca_before = (directory / "ca.pem").read_bytes()
    ports = DemoPorts.free()
    strict = distinct_free_ports("127.0.0.23", 1)[0]
    args = [*ports.args(directory), "--node-addresses", "127.0.0.22,127.0.0.23", "--strict-port", str(strict),
            "--timeout", "60"]
    proc = Proc(args, tmp_path / "demo.log")
    try:
        wait_until(lambda: (directory / "endpoints.json").exists() or not proc.alive(), timeout=90, interval=0.2,
                   message="the demo to be ready")
        assert proc.alive(), proc.log()
        endpoints = json.loads((directory / "endpoints.json").read_text())
        assert endpoints["listeners"]["strict"] == [f"https://127.0.0.22:{strict}/", f"https://127.0.0.23:{strict}/"]
        valid = ClientIdentity(directory / "client.pem", directory / "client-key.pem")
        for url in endpoints["listeners"]["strict"]:
            assert accepted_and_verified(answer := request(url, directory / "ca.pem", valid)), (url, answer)
        assert (directory / "ca.pem").read_bytes() == ca_before
    finally:
        proc.stop(timeout=30)


def test_demo_refuses_bad_arguments(tmp_path: Path) -> None:
    proc = Proc(["demo", "--dir", str(tmp_path / "d"), "--admin-ports", "9901"], tmp_path / "demo.log")
    wait_until(lambda: not proc.alive(), message="demo to exit")
    assert proc.stop() == 2
    assert "--admin-ports" in proc.log()
    assert not (tmp_path / "d").exists(), "a refused command must not leave files behind"


def test_demo_prepare_only_writes_apply_ready_manifests(tmp_path: Path) -> None:
    import yaml
    from cryptography.x509 import SubjectAlternativeName, UniformResourceIdentifier
    from cryptography.x509 import load_pem_x509_certificate as x509_load

    proc = Proc(
        ["demo", "--dir", str(tmp_path), "--prepare-only", "--backend", "backend:9000", "--extra-node-ids",
         "proxy-a,proxy-b"], tmp_path / "log"
    )
    wait_until(lambda: not proc.alive(), message="demo --prepare-only to exit")
    assert proc.stop() == 0, proc.log()
    documents = list(yaml.safe_load_all((tmp_path / "mtlsgate.yaml").read_text()))
    kinds = [(d["kind"], d["name"]) for d in documents]
    assert kinds == [
        ("TrustConfig", "demo"),
        ("ServerTlsPolicy", "strict"),
        ("ServerTlsPolicy", "permissive"),
        ("Certificate", "edge"),
        ("BackendService", "echo"),  # --backend-b's default 127.0.0.1:9001 with --backend
        ("Listener", "strict"),
        ("Listener", "permissive"),
        ("Node", "demo-a"),
        ("Node", "demo-b"),
        ("Node", "proxy-a"),
        ("Node", "proxy-b"),
    ]
    # The secure setup (SPEC §8): one certificate per node carrying its SPIFFE ID, admin credentials.
    nodes = {d["name"]: d for d in documents if d["kind"] == "Node"}
    for node_id, node in nodes.items():
        assert node["identity"] == f"spiffe://demo.mtlsgate/node/{node_id}"
        leaf = x509_load((tmp_path / f"node-{node_id}.pem").read_bytes())
        sans = leaf.extensions.get_extension_for_class(SubjectAlternativeName).value
        assert sans.get_values_for_type(UniformResourceIdentifier) == [node["identity"]]
        assert (tmp_path / f"node-{node_id}-key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "admin-token").stat().st_mode & 0o777 == 0o600
    assert "spiffe://demo.mtlsgate/admin" in (tmp_path / "authz.yaml").read_text()
    modes = {
        d["name"]: d["mtlsPolicy"]["clientValidationMode"]
        for d in documents
        if d["kind"] == "ServerTlsPolicy"
    }
    assert modes == {"strict": "REJECT_INVALID", "permissive": "ALLOW_INVALID_OR_MISSING_CLIENT_CERT"}
    listeners = {d["name"]: d for d in documents if d["kind"] == "Listener"}
    assert listeners["strict"]["backend"] == "backend:9000"
    assert listeners["permissive"]["defaultBackendService"] == "backendServices/echo"
    [service] = [d for d in documents if d["kind"] == "BackendService"]
    assert [e["address"] for e in service["endpoints"]] == ["backend:9000", "127.0.0.1:9001"]

    from cryptography import x509

    rotated = yaml.safe_load((tmp_path / "trust-config-rotated.yaml").read_text())
    crl = x509.load_pem_x509_crl(rotated["trustStores"][0]["crls"][0]["pemCrl"].encode())
    for holder in ("client.pem", "revoked.pem"):
        serial = x509.load_pem_x509_certificate((tmp_path / holder).read_bytes()).serial_number
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None, holder
    # A second run keeps the PKI (the store may already trust this CA).
    ca_before = (tmp_path / "ca.pem").read_bytes()
    again = Proc(["demo", "--dir", str(tmp_path), "--prepare-only"], tmp_path / "log2")
    wait_until(lambda: not again.alive(), message="second prepare to exit")
    assert again.stop() == 0
    assert (tmp_path / "ca.pem").read_bytes() == ca_before


def test_demo_fails_fast_with_the_nodes_reason_when_a_listener_port_is_taken(tmp_path: Path) -> None:
    ports = DemoPorts.free()
    strict = ports.strict
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.2", strict))
        squatter.listen()
        proc = Proc(ports.args(tmp_path / "d"), tmp_path / "demo.log")
        wait_until(lambda: not proc.alive(), timeout=45, message="the demo to give up")
    assert proc.stop() == 1
    log = proc.log()
    assert f"port {strict} is already in use" in log, log
    assert "everything stopped" in log
    assert not (tmp_path / "d" / "endpoints.json").exists()


@pytest.mark.slow
def test_the_demo_runs_the_secure_setup(demo: RunningDemo) -> None:
    """SPEC §8: no xDS stream without a registered node's certificate, no API call without the admin's
    credentials, and the plain README commands reach it through the `demo` context it registered."""
    import grpc
    from mtlsgate.v1 import api_pb2, api_pb2_grpc

    from tests.xds.raw_ads import RawAds

    server = demo.endpoints["control_plane"]
    assert 'registered the CLI context "demo"' in demo.proc.log()
    ca = demo.ca.read_bytes()
    client = demo.identity("client")

    def channel(cert: Path | None, key: Path | None) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(ca, key.read_bytes() if key else None,
                                             cert.read_bytes() if cert else None)
        return grpc.secure_channel(server, creds)

    # xDS: a client certificate of the same CA that is no registered node, a node's certificate as the
    # other node, and a plaintext stream are all refused.
    for cert, key, node_id, expected in (
        (client.cert, client.key, "demo-a", grpc.StatusCode.PERMISSION_DENIED),
        (demo.directory / "node-demo-a.pem", demo.directory / "node-demo-a-key.pem", "demo-b",
         grpc.StatusCode.PERMISSION_DENIED),
    ):
        ads = RawAds(channel(cert, key), node_id, {"node": node_id})
        ads.send("type.googleapis.com/mtlsgate.v1.ServerCertificate", names=("edge",))
        with pytest.raises(grpc.RpcError) as caught:
            ads.recv()
        assert caught.value.code() == expected, (node_id, caught.value)
        ads.close()
    plaintext = RawAds(grpc.insecure_channel(server), "demo-a", {})
    plaintext.send("type.googleapis.com/mtlsgate.v1.ServerCertificate", names=("edge",))
    with pytest.raises(grpc.RpcError) as caught:
        plaintext.recv()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    plaintext.close()

    # API: the listeners' client certificate is no admin; a wrong token is refused outright.
    with channel(client.cert, client.key) as ch:
        listeners = api_pb2_grpc.ListenerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as caught:
            listeners.ListListeners(api_pb2.ListResourcesRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "spiffe://demo.mtlsgate/client/valid has no role" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            listeners.ListListeners(api_pb2.ListResourcesRequest(), timeout=10,
                                    metadata=(("authorization", "Bearer not-the-demo-token-000"),))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The README's commands, as written: no --server, no credentials on the command line.
    status = mtlsgate("status")
    assert status.returncode == 0, status.stderr
    assert "demo-a" in status.stdout and "demo-b" in status.stdout
    assert mtlsgate("apply", "-f", str(demo.directory / "trust-config-rotated.yaml")).returncode == 0
    nodes = mtlsgate("get", "nodes")
    assert nodes.returncode == 0 and "spiffe://demo.mtlsgate/node/demo-a" in nodes.stdout
