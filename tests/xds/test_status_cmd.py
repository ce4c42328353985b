"""`mtlsgate status`: table rendering, and the real command against a token-protected control plane."""

from __future__ import annotations

import json
import subprocess

import grpc
from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2

from control_plane.cli.status_cmd import render_table
from tests.control_plane.harness import start_control_plane
from tests.support import MTLSGATE
from tests.xds.raw_ads import RawAds


def test_table_shows_states_versions_and_one_copy_of_each_error():
    node = api_pb2.NodeStatus(id="edge-1", cluster="edge", connected=True, state=api_pb2.ERROR,
                              convergence_seconds=0.123)
    for t in rt.ALL_TYPES:
        node.types.add(type_url=t, state=api_pb2.ERROR, acked_version="0123456789abcdef",
                       error="listeners/a: port 8443 is already in use on this node")
    table = render_table(api_pb2.ListNodesResponse(nodes=[node], revision=7))
    header, row, footer = table.splitlines()
    assert header.split() == ["NODE", "CLUSTER", "CONNECTED", "STATE", "LISTENER", "TRUSTBUNDLE",
                              "SERVERCERTIFICATE", "BACKENDSERVICE", "CONVERGENCE", "ERROR"]
    assert row.startswith("edge-1") and "ERROR 01234567" in row and "123ms" in row
    assert row.count("port 8443 is already in use") == 1
    assert footer == "(snapshot revision 7; 1 node(s))"


def test_status_uses_the_clients_token(tmp_path, logs_dir):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-0123456789abcdef operator\n")
    proc, address = start_control_plane(tmp_path, logs_dir, ["--token-file", str(tokens)])
    try:
        denied = subprocess.run([*MTLSGATE, "status", "--server", address], capture_output=True, text=True,
                                timeout=30)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        assert len(denied.stderr.strip().splitlines()) == 1
        ok = subprocess.run([*MTLSGATE, "status", "--server", address, "--token", "s3cret-0123456789abcdef", "-o", "json"],
                            capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(ok.stdout)["nodes"] == []
    finally:
        proc.stop()


def test_status_watch_prints_one_json_object_per_change(tmp_path, logs_dir):
    from tests.support import Proc, wait_until

    proc, address = start_control_plane(tmp_path, logs_dir)
    watcher = Proc(["status", "--server", address, "--watch", "-o", "json"], logs_dir / "watch.log")
    try:
        first = wait_until(lambda: watcher.log().splitlines(), timeout=20, message="first watch line")
        report = json.loads(first[0])
        assert (report["revision"], report["nodes"]) == (0, [])
        assert [(r["name"], r["alive"], r["answered"]) for r in report["replicas"]] == [(address, True, True)]
        channel = grpc.insecure_channel(address)
        node = RawAds(channel, "watched", {})
        node.send("type.googleapis.com/mtlsgate.v1.Listener")
        response = node.recv()
        node.send(response.type_url, version=response.version_info, nonce=response.nonce)

        def synced_line() -> bool:
            reports = [json.loads(line) for line in watcher.log().splitlines()]
            return any(n["id"] == "watched" and n["state"] == "SYNCED" for r in reports for n in r["nodes"])

        wait_until(synced_line, timeout=20, message="a watch line with the node SYNCED")
        node.close()
        channel.close()
        assert watcher.alive()
    finally:
        watcher.stop()
        proc.stop()
