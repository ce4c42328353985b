"""One control plane holds 10,000 nodes that connect at once (SPEC §10 B4, issue 17).

Before the fix only ~2,500 of 3,000 streams ever reached the ADS handler: gRPC core queues calls that
arrive faster than the server asks for them and refuses the queue's overflow (random refusals above 1,000
queued, all above 3,000, the client seeing INTERNAL "Internal error from Core"), and cancels a call left
queued for 30 s. Simulated nodes in several processes (tests/xds/sim_fleet.py), each process with its own
TCP connections, so the simulator is not what limits the figure."""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.support import free_port, wait_until
from tests.xds.fleet_config import certificate, listener, rotated_crl_pem, strict_policy, trust_config
from tests.xds.sim_fleet import SimFleet

NODES = 10_000


def connected_nodes(metrics: str) -> int:
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    found = re.search(r"^mtlsgate_xds_connected_nodes (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else -1


@pytest.mark.slow
def test_ten_thousand_nodes_connecting_at_once_all_get_their_configuration(control_plane, api, demo_pki) -> None:
    api.put(trust_config(demo_pki))
    api.put(certificate(demo_pki))
    api.put(strict_policy())
    api.put(listener("listeners/a", free_port()))  # references the TrustConfig: its bundle is every node's

    with SimFleet(control_plane.address, NODES, procs=4) as fleet:
        state = fleet.wait(lambda s: s["acked"] >= NODES or s["errors"], 240, f"{NODES} nodes to ACK")
        assert state["errors"] == {}, "streams refused or cancelled by the control plane"
        assert state["acked"] == NODES
        wait_until(lambda: connected_nodes(control_plane.metrics) == NODES, timeout=30,
                   message=f"the control plane to count {NODES} connected nodes")

        # And a change still reaches every one of them over the streams they hold.
        before = set(state["bundles"])
        rotated = trust_config(demo_pki)
        rotated.trust_stores[0].crls[0].pem_crl = rotated_crl_pem(demo_pki, [0x5CA1E])
        api.put(rotated)
        state = fleet.wait(lambda s: sum(n for v, n in s["bundles"].items() if v not in before) >= NODES
                           or s["errors"], 120, "the rotated TrustBundle to reach every node")
        assert state["errors"] == {}
        assert sum(n for v, n in state["bundles"].items() if v not in before) == NODES
