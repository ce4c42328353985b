"""Node admission and secrets (SPEC §8) as an attacker would probe them: a raw ADS client built on
xds-protos (not our node code) with real certificates against a real control plane started the secure
way. A node's group comes from its registered Node, never from what it declares; another group's keys
never reach it; certificates that are not the registered node's are refused; node certificates have no
management API; a relabel moves a running proxy process at once."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from mtlsgate.v1 import api_pb2, api_pb2_grpc, resources_pb2, xds_pb2

from control_plane.authz.admission import NodeRefused, admit, validate_node
from control_plane.pki import issue
from tests.control_plane.secure_harness import ADMIN, CaPki, SecureControlPlane
from tests.support import Proc, free_port, wait_until
from tests.xds.raw_ads import RawAds

LISTENER = "type.googleapis.com/mtlsgate.v1.Listener"
CERT = "type.googleapis.com/mtlsgate.v1.ServerCertificate"
NODE_A = "spiffe://test.mtlsgate/node/a"
NODE_B = "spiffe://test.mtlsgate/node/b"
OPERATOR = "spiffe://test.mtlsgate/ops/bob"


def test_admission_rules_pure() -> None:
    nodes = {"nodes/a": resources_pb2.Node(name="nodes/a", identity=NODE_A, cluster="edge", labels={"zone": "a"})}
    with pytest.raises(NodeRefused, match="requires a client certificate"):
        admit("a", "", {}, set(), nodes, insecure=False)  # never keys to an unauthenticated stream
    anonymous = admit("a", "mine", {"zone": "b"}, set(), nodes, insecure=True)
    assert dict(anonymous.labels) == {"zone": "a"} and anonymous.cluster == "edge"  # the resource wins
    assert anonymous.identity == ""
    unregistered = admit("x", "mine", {"zone": "b"}, set(), nodes, insecure=True)
    assert dict(unregistered.labels) == {"zone": "b"} and not unregistered.registered
    admitted = admit("a", "", {}, {NODE_A, "cn:a"}, nodes, insecure=False)
    assert admitted.identity == NODE_A and admitted.mismatch == ""
    assert [v.field for v in validate_node(resources_pb2.Node(identity="a b"))] == ["identity"]
    assert [v.field for v in validate_node(resources_pb2.Node(identity=""))] == ["identity"]
    assert validate_node(resources_pb2.Node(identity="cn:edge-1", labels={"zone": "a"})) == []


@dataclass
class Fleet:
    cp: SecureControlPlane
    admin: grpc.Channel
    ports: dict[str, int]
    keys: dict[str, str]  # certificate name -> its private key PEM

    def put_node(self, node_id: str, identity: str, labels: dict[str, str], cluster: str = "edge") -> None:
        node = resources_pb2.Node(name=f"nodes/{node_id}", identity=identity, cluster=cluster, labels=labels)
        api_pb2_grpc.NodeServiceStub(self.admin).UpdateNode(
            api_pb2.UpdateNodeRequest(node=node, allow_missing=True), timeout=10)

    def status(self) -> dict[str, api_pb2.NodeStatus]:
        reply = api_pb2_grpc.FleetServiceStub(self.admin).ListNodes(api_pb2.ListNodesRequest(), timeout=10)
        return {n.id: n for n in reply.nodes}

    def ads(self, identity: str | None, node_id: str, labels: dict[str, str]) -> RawAds:
        return RawAds(self.cp.channel(identity), node_id, labels)


def _listener_ports(response: object) -> set[int]:
    out = set()
    for any_ in response.resources:  # type: ignore[attr-defined]
        listener = resources_pb2.Listener()
        any_.Unpack(listener)
        out.add(listener.port)
    return out


@pytest.fixture
def fleet(tmp_path: Path, logs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_QUIET", "0.05")
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_MAX", "0.5")
    pki = CaPki(tmp_path / "pki")
    cp = SecureControlPlane.start(pki, tmp_path, logs_dir)
    admin = cp.channel(ADMIN)
    keys = {}
    ports = {"a": free_port(), "b": free_port()}
    certificates = api_pb2_grpc.CertificateServiceStub(admin)
    listeners = api_pb2_grpc.ListenerServiceStub(admin)
    for group in ("a", "b"):
        server = issue(f"edge-{group}", issuer=pki.ca, eku=(ExtendedKeyUsageOID.SERVER_AUTH,), dns=("localhost",),
                       ips=("127.0.0.1",))
        keys[f"edge-{group}"] = server.key_pem
        certificates.UpdateCertificate(api_pb2.UpdateCertificateRequest(certificate=resources_pb2.Certificate(
            name=f"certificates/edge-{group}", pem_certificate=server.cert_pem, pem_private_key=server.key_pem),
            allow_missing=True), timeout=10)
        listeners.UpdateListener(api_pb2.UpdateListenerRequest(listener=resources_pb2.Listener(
            name=f"listeners/{group}", port=ports[group], node_selector={"zone": group},
            certificate=f"certificates/edge-{group}", backend="127.0.0.1:9"), allow_missing=True), timeout=10)
    result = Fleet(cp, admin, ports, keys)
    result.put_node("a", NODE_A, {"zone": "a"})
    result.put_node("b", NODE_B, {"zone": "b"})
    yield result
    admin.close()
    cp.stop()


def test_metadata_cannot_move_a_node_into_another_group_or_fetch_its_key(fleet: Fleet) -> None:
    a = fleet.ads(NODE_A, "a", {"zone": "b"})  # node a's certificate, declaring group b
    try:
        a.send(LISTENER)
        listeners = a.recv()
        assert _listener_ports(listeners) == {fleet.ports["a"]}
        a.send(LISTENER, version=listeners.version_info, nonce=listeners.nonce)
        a.send(CERT, names=("edge-b", "certificates/edge-b", "edge-a", "certificates/edge-a"))
        certs = a.recv()
        got = []
        for any_ in certs.resources:
            cert = xds_pb2.ServerCertificate()
            any_.Unpack(cert)
            got.append((cert.name, cert.pem_private_key))
        assert got and all(key == fleet.keys["edge-a"] for _, key in got)
        assert fleet.keys["edge-b"].encode() not in certs.SerializeToString()
        # Asking for group b's certificate alone gets nothing at all.
        b_only = fleet.ads(NODE_A, "a", {"zone": "b"})
        b_only.send(CERT, names=("edge-b", "certificates/edge-b"))
        reply = b_only.recv()
        assert list(reply.resources) == []
        b_only.close()
        status = fleet.status()["a"]
        assert dict(status.labels) == {"zone": "a"} and status.registered and status.identity == NODE_A
        assert "zone=b" in status.metadata_mismatch and "registered: zone=a" in status.metadata_mismatch
        assert "cluster 'raw' (registered: 'edge')" in status.metadata_mismatch  # RawAds declares cluster raw
        assert f"node a: {status.metadata_mismatch}; the Node resource wins" in fleet.cp.proc.log()
    finally:
        a.close()


@pytest.mark.parametrize(("identity", "node_id", "expected"), [
    (NODE_A, "b", f"node 'b' is registered to {NODE_B}; this certificate is cn:"),
    ("spiffe://test.mtlsgate/node/stranger", "stranger", "is not a registered node: no Node nodes/stranger"),
    (OPERATOR, "a", f"node 'a' is registered to {NODE_A}"),
    (OPERATOR, "ops", "is not a registered node"),
    (NODE_A, "", "node.id is required"),
])
def test_streams_not_matching_a_registration_are_refused(fleet: Fleet, identity: str, node_id: str,
                                                         expected: str) -> None:
    ads = fleet.ads(identity, node_id, {"zone": "a"})
    try:
        ads.send(LISTENER)
        with pytest.raises(grpc.RpcError) as caught:
            ads.recv()
        code = grpc.StatusCode.INVALID_ARGUMENT if not node_id else grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.code() == code
        assert expected in caught.value.details()
    finally:
        ads.close()


def test_an_operator_certificate_is_a_node_only_once_registered_as_one(fleet: Fleet) -> None:
    fleet.put_node("ops", OPERATOR, {"zone": "b"})
    ads = fleet.ads(OPERATOR, "ops", {})
    try:
        ads.send(LISTENER)
        assert _listener_ports(ads.recv()) == {fleet.ports["b"]}
    finally:
        ads.close()
    # … and from then on that identity has no management API role at all.
    with fleet.cp.channel(OPERATOR) as channel, pytest.raises(grpc.RpcError) as caught:
        api_pb2_grpc.ListenerServiceStub(channel).ListListeners(api_pb2.ListResourcesRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_node_certificates_are_refused_on_every_management_rpc(fleet: Fleet) -> None:
    with fleet.cp.channel(NODE_A) as channel:
        for service in api_pb2.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(path)
                with pytest.raises(grpc.RpcError) as caught:
                    result = call(b"", timeout=10)
                    if method.server_streaming:
                        next(iter(result))
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, path
                assert f"{NODE_A} is a node identity" in caught.value.details(), path


def test_deregistering_a_node_ends_its_stream(fleet: Fleet) -> None:
    ads = fleet.ads(NODE_A, "a", {})
    try:
        ads.send(LISTENER)
        first = ads.recv()
        ads.send(LISTENER, version=first.version_info, nonce=first.nonce)
        api_pb2_grpc.NodeServiceStub(fleet.admin).DeleteNode(api_pb2.DeleteResourceRequest(name="nodes/a"),
                                                              timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            while True:
                ads.recv()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "node 'a' was deregistered" in caught.value.details()
    finally:
        ads.close()


def test_relabelling_a_node_moves_the_running_proxy_without_a_restart(fleet: Fleet, tmp_path: Path,
                                                                      logs_dir: Path) -> None:
    cert, key = fleet.cp.pki.client(NODE_A)
    admin = f"127.0.0.1:{free_port()}"
    proxy = Proc(["proxy", "--server", fleet.cp.address, "--node-id", "a", "--cluster", "declared",
                  "--label", "zone=b", "--admin", admin, "--workers", "1", "--listen-address", "127.0.0.1",
                  "--cache-dir", str(tmp_path / "cache"), "--xds-ca", str(fleet.cp.pki.ca_path),
                  "--xds-cert", str(cert), "--xds-key", str(key)], logs_dir / "proxy-a.log")

    def ports() -> set[int]:
        with urllib.request.urlopen(f"http://{admin}/config_dump", timeout=5) as reply:
            return {listener["port"] for listener in json.loads(reply.read())["listeners"]}

    try:
        wait_until(lambda: ports() == {fleet.ports["a"]}, timeout=20, message="node a on group a's listener")
        pid = proxy.pid
        fleet.put_node("a", NODE_A, {"zone": "b"})
        wait_until(lambda: ports() == {fleet.ports["b"]}, timeout=10, message="node a moved to group b's listener")
        wait_until(lambda: fleet.status()["a"].state == api_pb2.SYNCED, timeout=10, message="a SYNCED")
        assert proxy.alive() and proxy.pid == pid
        assert dict(fleet.status()["a"].labels) == {"zone": "b"}
        table = fleet.cp.cli("get", "nodes").stdout
        row = next(line for line in table.splitlines() if line.startswith("a "))
        assert NODE_A in row and "zone=b" in row and "yes" in row and "SYNCED" in row
    finally:
        proxy.stop()


def test_nodes_through_the_cli(fleet: Fleet, tmp_path: Path) -> None:
    manifest = tmp_path / "nodes.yaml"
    manifest.write_text(f"kind: Node\nname: c\nidentity: spiffe://test.mtlsgate/node/c\ncluster: edge\n"
                        f"labels: {{zone: a}}\n---\nkind: Node\nname: d\nidentity: {NODE_A}\n")
    result = fleet.cp.cli("apply", "-f", str(manifest))
    assert result.returncode == 1 and f"{NODE_A} is already the identity of nodes/a" in result.stderr
    manifest.write_text("kind: Node\nname: c\nidentity: spiffe://test.mtlsgate/node/c\ncluster: edge\n"
                        "labels: {zone: a}\n")
    # (the refusal is the server's, after node c was written: documents before it stay applied)
    assert fleet.cp.cli("apply", "-f", str(manifest)).stdout.strip() == "node/c unchanged"
    table = fleet.cp.cli("get", "nodes").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "IDENTITY", "CLUSTER", "LABELS", "CONNECTED"]
    assert any(line.split()[:5] == ["c", "spiffe://test.mtlsgate/node/c", "edge", "zone=a", "no"]
               for line in table)
    assert "c" in fleet.status() and fleet.status()["c"].registered and not fleet.status()["c"].connected
    assert fleet.cp.cli("delete", "nodes", "c").returncode == 0
    assert "c" not in fleet.status()


# ---------------------------------------------------------------- node reports (SPEC §12)


class _ReportStream:
    """A raw NodeReportService/Report stream: send reports one by one, read each ack."""

    def __init__(self, channel: grpc.Channel) -> None:
        import queue

        from mtlsgate.v1 import reports_pb2_grpc

        self._out: queue.Queue = queue.Queue()
        self._acks = reports_pb2_grpc.NodeReportServiceStub(channel).Report(iter(self._out.get, None), timeout=60)

    def send(self, report: object) -> object:
        self._out.put(report)
        return next(self._acks)

    def close(self) -> None:
        self._out.put(None)


def _report(node_id: str, sequence: int, fingerprint: str = "", subject_size: int = 10) -> object:
    from mtlsgate.v1 import reports_pb2

    report = reports_pb2.NodeReport(node_id=node_id, sequence=sequence, interval_seconds=5)
    entry = report.listeners.add(listener="listeners/a", config_version="v")
    entry.handshakes.add(present=True, verified=True, accepted=True, count=3)
    if fingerprint:
        entry.clients.add(fingerprint_sha256=fingerprint, subject="CN=" + "x" * subject_size, verified=True,
                          accepted=True, count=3)
    return report


def _inventory(fleet: Fleet) -> dict[str, object]:
    from mtlsgate.v1 import reports_pb2, reports_pb2_grpc

    reply = reports_pb2_grpc.ClientServiceStub(fleet.admin).ListClients(reports_pb2.ListClientsRequest(), timeout=10)
    return {c.fingerprint_sha256: c for c in reply.clients}


def test_a_node_can_only_report_about_itself(fleet: Fleet) -> None:
    # Node a's certificate opening a report stream as node b: refused outright, nothing kept.
    spoof = _ReportStream(fleet.cp.channel(NODE_A))
    with pytest.raises(grpc.RpcError) as err:
        spoof.send(_report("b", 1, fingerprint="f00d" * 16))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "registered to" in err.value.details()
    # Admitted as a, then a report about b on the same stream: that report refused, the stream goes on.
    honest = _ReportStream(fleet.cp.channel(NODE_A))
    try:
        assert honest.send(_report("a", 1, fingerprint="a" * 64)).error == ""
        refused = honest.send(_report("b", 2, fingerprint="b" * 64))
        assert "this stream reports for node 'a' only" in refused.error
        assert honest.send(_report("a", 3, fingerprint="c" * 64)).error == ""
    finally:
        honest.close()
    seen = wait_until(lambda: (inv := _inventory(fleet)) and "c" * 64 in inv and inv, timeout=10,
                      message="node a's reports in the inventory")
    assert "a" * 64 in seen and "b" * 64 not in seen and "f00d" * 16 not in seen
    assert list(seen["a" * 64].nodes) == ["a"]  # type: ignore[attr-defined]
    # Neither an operator's certificate nor an unregistered one may report at all.
    for identity in (OPERATOR, "spiffe://test.mtlsgate/node/stranger"):
        stranger = _ReportStream(fleet.cp.channel(identity))
        with pytest.raises(grpc.RpcError) as err:
            stranger.send(_report("a", 1))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_an_oversized_report_or_a_flood_is_refused_without_hurting_another_nodes_stream(fleet: Fleet) -> None:
    a, b = _ReportStream(fleet.cp.channel(NODE_A)), _ReportStream(fleet.cp.channel(NODE_B))
    try:
        assert a.send(_report("a", 1)).error == ""
        assert b.send(_report("b", 1)).error == ""
        big = a.send(_report("a", 2, fingerprint="d" * 64, subject_size=600_000))  # one string of 600 kB
        assert "over the 524288-byte bound" in big.error  # type: ignore[attr-defined]
        assert b.send(_report("b", 2)).error == ""  # the well-behaved node's stream is untouched
        errors = [a.send(_report("a", 3 + i)).error for i in range(10)]  # a flood from a
        assert any("too many reports" in e for e in errors)
        assert b.send(_report("b", 3, fingerprint="e" * 64)).error == ""
    finally:
        a.close()
        b.close()
    seen = wait_until(lambda: (inv := _inventory(fleet)) and "e" * 64 in inv and inv, timeout=10,
                      message="node b's report in the inventory")
    assert "d" * 64 not in seen
