"""End to end on loopback: a real control plane, three real proxy nodes in two groups, `mtlsgate status`.

One scenario walks the issue's "Show" list in order (each step builds on the state the previous one left):
group isolation, CRL rotation re-sending only the TrustBundle, a node-side NACK (port in use) shown as
ERROR and never re-sent, then control-plane and node restarts with nothing re-applied.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from typing import Any

import pytest

from tests.support import MTLSGATE, free_port, wait_until
from tests.xds.fleet_config import certificate, listener, rotated_crl_pem, strict_policy, trust_config

LISTENER = "type.googleapis.com/mtlsgate.v1.Listener"
BUNDLE = "type.googleapis.com/mtlsgate.v1.TrustBundle"
CERT = "type.googleapis.com/mtlsgate.v1.ServerCertificate"


def status(server: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run([*MTLSGATE, "status", "--server", server, "-o", "json"], capture_output=True,
                         text=True, timeout=30)
    document = json.loads(out.stdout)
    nodes = {n["id"]: n for n in document["nodes"]}
    # The exit code scripts gate on: 1 exactly while a connected node is ERROR or STALE, a node is moving
    # off a dead replica, or a CRL source has a problem.
    gating = any(n["moving"] or (n["connected"] and n["state"] in ("ERROR", "STALE")) for n in nodes.values()) or bool(
        document.get("crlSourceProblems"))
    assert out.returncode == (1 if gating else 0), (out.returncode, out.stderr, nodes)
    return nodes


def all_synced(server: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    nodes = status(server)
    ok = all(i in nodes and nodes[i]["connected"] and nodes[i]["state"] == "SYNCED" for i in ids)
    return nodes if ok else {}


def metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
def test_fleet_distribution_end_to_end(control_plane, api, start_node, demo_pki):
    import urllib.request

    server = control_plane.address
    port_a, port_b = free_port("127.0.0.2"), free_port()
    api.put(trust_config(demo_pki))
    api.put(strict_policy())
    api.put(certificate(demo_pki))
    api.put(certificate(demo_pki, "certificates/edge-b"))
    api.put(listener("listeners/a", port_a, selector={"zone": "a"}))
    api.put(listener("listeners/b", port_b, selector={"zone": "b"}, policy="", cert="certificates/edge-b"))

    a1 = start_node("node-a1", "edge-a", {"zone": "a"}, "127.0.0.2")
    a2 = start_node("node-a2", "edge-a", {"zone": "a"}, "127.0.0.3")
    b1 = start_node("node-b1", "edge-b", {"zone": "b"}, "127.0.0.1")
    ids = ["node-a1", "node-a2", "node-b1"]

    # ---- 1. each node gets exactly its group's resources; identical versions inside a group
    nodes = wait_until(lambda: all_synced(server, ids), timeout=30, message="three nodes SYNCED")
    for node in (a1, a2):
        dump = wait_until(node.dump, message="config dump")
        assert [lst["name"] for lst in dump["listeners"]] == ["listeners/a"]
        assert [c["name"] for c in dump["certificates"]] == ["certificates/edge"]
        assert [b["name"] for b in dump["bundles"]] == ["trustConfigs/demo"]
        assert "PRIVATE KEY" not in json.dumps(dump)
    dump_b = b1.dump()
    assert [lst["name"] for lst in dump_b["listeners"]] == ["listeners/b"]
    assert [c["name"] for c in dump_b["certificates"]] == ["certificates/edge-b"]
    assert dump_b["bundles"] == []
    for t in (LISTENER, BUNDLE, CERT):
        assert nodes["node-a1"]["types"][t]["version"] == nodes["node-a2"]["types"][t]["version"] != ""
    assert nodes["node-a1"]["types"][LISTENER]["version"] != nodes["node-b1"]["types"][LISTENER]["version"]
    assert nodes["node-a1"]["cluster"] == "edge-a" and nodes["node-b1"]["cluster"] == "edge-b"
    table = subprocess.run([*MTLSGATE, "status", "--server", server], capture_output=True, text=True,
                           check=True, timeout=30).stdout
    assert re.search(r"^node-a1\s+edge-a\s+yes\s+SYNCED", table, re.M), table

    # ---- 2. a CRL rotation reaches both nodes of the group; only the TrustBundle is re-sent
    before = nodes
    tc = trust_config(demo_pki)
    tc.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(demo_pki, [4242, 4343])
    api.put(tc)

    def rotated() -> dict[str, dict[str, Any]]:
        now = all_synced(server, ids)
        return now if now and all(
            now[i]["types"][BUNDLE]["version"] != before[i]["types"][BUNDLE]["version"]
            for i in ("node-a1", "node-a2")) else {}

    after = wait_until(rotated, timeout=15, message="new TrustBundle ACKed by both zone-a nodes")
    for i in ("node-a1", "node-a2"):
        for t in (LISTENER, CERT):
            assert after[i]["types"][t] == before[i]["types"][t], f"{i} {t} was re-sent"
        assert 0 < after[i]["types"][BUNDLE]["convergenceSeconds"] < 5
        assert after[i]["convergenceSeconds"] == after[i]["types"][BUNDLE]["convergenceSeconds"]
    assert after["node-b1"]["types"] == before["node-b1"]["types"]
    node_metrics = a1.get("/metrics")[1]
    new_bundle = after["node-a1"]["types"][BUNDLE]["version"]
    assert metric(node_metrics, "mtlsgate_config_info", f'type="TrustBundle",version="{new_bundle}"') == 1.0
    old_bundle = before["node-a1"]["types"][BUNDLE]["version"]
    assert f'version="{old_bundle}"' not in node_metrics
    crls = {json.dumps(n.dump()["bundles"][0]["trustStores"][0]["crls"]) for n in (a1, a2)}
    assert len(crls) == 1 and crls != {json.dumps(dump["bundles"][0]["trustStores"][0]["crls"])}

    # ---- 3. a node-side NACK: the new port is taken on node-a1's address only
    metrics_url = f"http://{control_plane.metrics}/metrics"
    rejects_before = metric(urllib.request.urlopen(metrics_url, timeout=5).read().decode(),
                            "mtlsgate_xds_rejects_total", 'type="Listener"')
    blocker = socket.socket()
    blocker.bind(("127.0.0.2", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        api.put(listener("listeners/a", taken, selector={"zone": "a"}))

        def a1_error() -> dict[str, dict[str, Any]]:
            now = status(server)
            ok = (now["node-a1"]["state"] == "ERROR" and now["node-a2"]["state"] == "SYNCED"
                  and now["node-a2"]["types"][LISTENER]["version"] != after["node-a2"]["types"][LISTENER]["version"])
            return now if ok else {}

        nacked = wait_until(a1_error, timeout=15, message="node-a1 ERROR, node-a2 SYNCED")
        err = nacked["node-a1"]["types"][LISTENER]["error"]
        assert f"port {taken} is already in use" in err and "listeners/a" in err
        assert nacked["node-a1"]["types"][LISTENER]["version"] == after["node-a1"]["types"][LISTENER]["version"]
        assert a1.ready() and [lst["port"] for lst in a1.dump()["listeners"]] == [port_a]
        assert a1.dump()["lastError"] == err
        shown = subprocess.run([*MTLSGATE, "status", "--server", server], capture_output=True, text=True,
                               timeout=30)
        table = shown.stdout
        assert shown.returncode == 1 and shown.stderr == "mtlsgate status: not synced: node-a1 ERROR\n"
        assert re.search(rf"^node-a1\s+edge-a\s+yes\s+ERROR.*port {taken} is already in use", table, re.M), table
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        assert metric(text, "mtlsgate_xds_rejects_total", 'type="Listener"') >= rejects_before + 1

        # Another group's change is pushed (proof the snapshot moved on) but node-a1 gets nothing more.
        a1_types = status(server)["node-a1"]["types"]  # includes sent nonces/versions
        api.put(listener("listeners/b", port_b, selector={"zone": "b"}, policy="", cert="certificates/edge-b",
                         backend="127.0.0.1:10"))
        wait_until(lambda: all_synced(server, ["node-b1"]) and all_synced(server, ["node-b1"])["node-b1"]["types"]
                   [LISTENER]["version"] != after["node-b1"]["types"][LISTENER]["version"],
                   timeout=15, message="node-b1 ACKs its new listener")
        quiet = status(server)["node-a1"]
        assert quiet["state"] == "ERROR" and quiet["types"] == a1_types
    finally:
        blocker.close()

    # The configuration changes again (port moved back): node-a1 receives it and ends SYNCED.
    api.put(listener("listeners/a", port_a, selector={"zone": "a"}))
    final = wait_until(lambda: all_synced(server, ids), timeout=15, message="all SYNCED after the fix")
    assert final["node-a1"]["types"][LISTENER]["version"] == after["node-a1"]["types"][LISTENER]["version"]

    # ---- 4. control plane killed: nodes keep serving; a node restarted meanwhile starts from its cache
    applied = {n.node_id: n.dump()["appliedCount"] for n in (a1, a2, b1)}
    versions = {i: {t: final[i]["types"][t]["version"] for t in (LISTENER, BUNDLE, CERT)} for i in ids}
    control_plane.proc.kill9()
    control_plane.proc = None
    wait_until(lambda: not a1.dump()["connected"], timeout=10, message="node-a1 notices the control plane is gone")
    assert all(n.ready() for n in (a1, a2, b1))
    a2.stop()
    a2.start()
    wait_until(a2.ready, timeout=15, message="node-a2 ready from its cache")
    restarted = a2.dump()
    assert restarted["source"] == "cache" and not restarted["connected"]
    assert restarted["versions"] == versions["node-a2"]

    control_plane.start()
    resynced = wait_until(lambda: all_synced(server, ids), timeout=30, message="all SYNCED after restart")
    for i in ids:
        assert {t: resynced[i]["types"][t]["version"] for t in (LISTENER, BUNDLE, CERT)} == versions[i]
    assert a1.dump()["appliedCount"] == applied["node-a1"]
    assert b1.dump()["appliedCount"] == applied["node-b1"]
    assert a2.dump()["appliedCount"] == 1 and a2.dump()["source"] == "cache"  # nothing re-applied
