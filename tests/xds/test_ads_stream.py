"""xDS protocol rules checked with a raw gRPC ADS client against a real control-plane process: group
isolation for by-name requests, stale nonces, NACK without re-send, names subscribed later, reconnect
with the current version, and node identity bound to the xDS client certificate."""

from __future__ import annotations

import itertools
import queue

import grpc
import pytest
from mtlsgate.v1 import api_pb2

from tests.support import free_port, wait_until
from tests.xds.fleet_config import certificate, listener, strict_policy, trust_config
from tests.xds.raw_ads import RawAds

LISTENER = "type.googleapis.com/mtlsgate.v1.Listener"
CERT = "type.googleapis.com/mtlsgate.v1.ServerCertificate"


@pytest.fixture
def populated(api, demo_pki):
    api.put(trust_config(demo_pki))
    api.put(strict_policy())
    api.put(certificate(demo_pki))
    api.put(certificate(demo_pki, "certificates/edge-b"))
    api.put(listener("listeners/a", free_port(), selector={"zone": "a"}))
    api.put(listener("listeners/b", free_port(), selector={"zone": "b"}, policy="", cert="certificates/edge-b"))
    return api


def test_protocol_rules_over_a_real_stream(control_plane, populated):
    api = populated
    channel = grpc.insecure_channel(control_plane.address)
    a = RawAds(channel, "raw-a", {"zone": "a"})
    b = RawAds(channel, "raw-b", {"zone": "b"})
    try:
        a.send(LISTENER)
        first = a.recv()
        assert first.type_url == LISTENER and [r.type_url for r in first.resources] == [LISTENER]
        a.send(LISTENER, version=first.version_info, nonce=first.nonce)

        # By-name: another group's certificate is never answered, our own is.
        a.send(CERT, names=("certificates/edge", "certificates/edge-b"))
        certs = a.recv()
        assert len(certs.resources) == 1 and b"certificates/edge-b" not in certs.resources[0].value
        a.send(CERT, version=certs.version_info, nonce=certs.nonce, names=("certificates/edge", "certificates/edge-b"))
        b.send(LISTENER)
        b_first = b.recv()
        b.send(LISTENER, version=b_first.version_info, nonce=b_first.nonce)
        wait_until(lambda: api.nodes()["raw-a"].state == api_pb2.SYNCED, message="raw-a SYNCED")

        # A listener change: a stale ACK (old nonce) is ignored, the NACK of the new one is recorded.
        api.put(listener("listeners/a", free_port(), selector={"zone": "a"}))
        second = a.recv()
        assert second.type_url == LISTENER and second.version_info != first.version_info
        a.send(LISTENER, version=first.version_info, nonce=first.nonce)  # stale
        wait_until(lambda: api.nodes()["raw-a"].state == api_pb2.STALE, message="raw-a STALE")
        a.send(LISTENER, version=first.version_info, nonce=second.nonce, error="raw-a cannot use this")
        status = wait_until(lambda: (n := api.nodes()["raw-a"]).state == api_pb2.ERROR and n,
                            message="raw-a ERROR")
        (lst,) = [t for t in status.types if t.type_url == LISTENER]
        assert lst.error == "raw-a cannot use this" and lst.acked_version == first.version_info
        assert lst.sent_version == second.version_info

        # A change elsewhere is pushed to group b; raw-a gets nothing (its snapshot did not change).
        api.put(listener("listeners/b", free_port(), selector={"zone": "b"}, policy="", cert="certificates/edge-b"))
        b_second = b.recv()
        assert b_second.version_info != b_first.version_info
        with pytest.raises(queue.Empty):
            a.recv(timeout=0.5)

        # The configuration changes again: raw-a gets the new version.
        api.put(listener("listeners/a", free_port(), selector={"zone": "a"}))
        third = a.recv()
        assert third.type_url == LISTENER and third.version_info not in (first.version_info, second.version_info)
        a.send(LISTENER, version=third.version_info, nonce=third.nonce)
        status = wait_until(lambda: (n := api.nodes()["raw-a"]).state == api_pb2.SYNCED and n,
                            message="raw-a SYNCED again")
        # The NACK is history now: no error text under a SYNCED type (before: the old text stayed), but
        # the history keeps it, with the version and a time.
        (lst,) = [t for t in status.types if t.type_url == LISTENER]
        assert (lst.error, lst.desired_version, lst.acked_version) == ("", third.version_info, third.version_info)
        assert [(n.version, n.error) for n in lst.nack_history] == [(second.version_info, "raw-a cannot use this")]
        assert lst.nack_history[0].time.seconds > 0
    finally:
        a.close()
        b.close()

    # Reconnect holding the current version: nothing is re-sent, and the node shows SYNCED.
    again = RawAds(channel, "raw-a", {"zone": "a"})
    try:
        again.send(LISTENER, version=third.version_info)
        wait_until(lambda: (n := api.nodes()["raw-a"]).connected and n.state == api_pb2.SYNCED,
                   message="raw-a reconnected and SYNCED")
        with pytest.raises(queue.Empty):
            again.recv(timeout=0.5)
    finally:
        again.close()
        channel.close()


def test_unknown_type_and_missing_node_id_are_refused(control_plane, populated):
    channel = grpc.insecure_channel(control_plane.address)
    try:
        anonymous = RawAds(channel, "", {})
        anonymous.send(LISTENER)
        with pytest.raises(grpc.RpcError) as err:
            anonymous.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "node.id" in err.value.details()
        odd = RawAds(channel, "raw-odd", {})
        odd.send("type.googleapis.com/envoy.config.cluster.v3.Cluster")
        with pytest.raises(grpc.RpcError) as err:
            odd.recv()
        assert "not served" in err.value.details()
    finally:
        channel.close()


def test_watch_nodes_streams_changes(control_plane, populated):
    channel = grpc.insecure_channel(control_plane.address)
    watch = populated.fleet.WatchNodes(api_pb2.ListNodesRequest(cluster="raw"), timeout=30)
    try:
        assert list(next(watch).nodes) == []  # the full (empty) list at once
        node = RawAds(channel, "raw-watched", {"zone": "a"})
        node.send(LISTENER)
        first = node.recv()
        node.send(LISTENER, version=first.version_info, nonce=first.nonce)
        states = []
        for update in watch:
            states.append([(n.id, api_pb2.SyncState.Name(n.state)) for n in update.nodes])
            if states[-1] == [("raw-watched", "SYNCED")]:
                break
        assert states[-1] == [("raw-watched", "SYNCED")]
        node.close()
        for update in watch:
            if update.nodes and not update.nodes[0].connected:
                break
    finally:
        watch.cancel()
        channel.close()


def test_a_burst_of_writes_is_debounced_into_few_pushes(tmp_path, logs_dir, demo_pki, monkeypatch):
    import time

    from mtlsgate.v1 import resources_pb2

    from tests.control_plane.harness import start_control_plane
    from tests.xds.conftest import Api

    quiet = 0.4  # long enough that back-to-back API writes fall inside it even on a loaded machine
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_QUIET", str(quiet))
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_MAX", "5")
    proc, address = start_control_plane(tmp_path, logs_dir)
    api = Api(address)
    channel = grpc.insecure_channel(address)
    node = RawAds(channel, "raw-burst", {"zone": "a"})
    try:
        api.put(certificate(demo_pki))
        api.put(listener("listeners/a", free_port(), selector={"zone": "a"}, policy=""))
        node.send(LISTENER)
        first = node.recv()
        node.send(LISTENER, version=first.version_info, nonce=first.nonce)
        ports = [free_port() for _ in range(10)]
        written = []
        for port in ports:
            api.put(listener("listeners/a", port, selector={"zone": "a"}, policy=""))
            written.append(time.monotonic())
        received = [node.recv()]
        while True:
            try:
                received.append(node.recv(timeout=2 * quiet + 0.5))
            except queue.Empty:
                break
        # The burst's first write may go out at once (leading edge, when it came a quiet period after the
        # last build); the rest wait for the burst to settle: one more push, plus one per quiet period that
        # actually separated two writes (normally none).
        gaps = sum(1 for a, b in itertools.pairwise(written) if b - a >= quiet)
        assert len(received) <= 2 + gaps, [r.version_info for r in received]
        last = resources_pb2.Listener.FromString(received[-1].resources[0].value)
        assert last.port == ports[-1]
    finally:
        node.close()
        channel.close()
        api.close()
        proc.stop()


def test_the_first_write_after_a_quiet_period_is_pushed_at_once(tmp_path, logs_dir, demo_pki, monkeypatch):
    """Leading edge (issue 17): a lone change does not wait for the quiet period; a change right after it
    does (the burst rule), so both arrive, the second after the first settled."""
    import time

    from mtlsgate.v1 import resources_pb2

    from tests.control_plane.harness import start_control_plane
    from tests.xds.conftest import Api

    quiet = 6.0  # far longer than a push takes even on a loaded machine
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_QUIET", str(quiet))
    monkeypatch.setenv("MTLSGATE_XDS_DEBOUNCE_MAX", "20")
    proc, address = start_control_plane(tmp_path, logs_dir)
    api = Api(address)
    channel = grpc.insecure_channel(address)
    node = RawAds(channel, "raw-leading", {"zone": "a"})
    try:
        api.put(certificate(demo_pki))
        node.send(LISTENER)
        first = node.recv(timeout=30)
        node.send(LISTENER, version=first.version_info, nonce=first.nonce)
        wait_until(lambda: "raw-leading" in api.nodes(), timeout=10, message="the node to be known")
        # Wait out the quiet period after the start-up build and the certificate write, on the clock.
        settled = time.monotonic() + quiet
        wait_until(lambda: time.monotonic() > settled, timeout=quiet + 5, interval=0.1, message="quiet period")
        port, again = free_port(), free_port()
        api.put(listener("listeners/a", port, selector={"zone": "a"}, policy=""))
        written = time.monotonic()
        pushed = node.recv(timeout=quiet - 1)  # before the quiet period could have ended
        assert time.monotonic() - written < quiet - 1
        assert resources_pb2.Listener.FromString(pushed.resources[0].value).port == port
        node.send(LISTENER, version=pushed.version_info, nonce=pushed.nonce)
        api.put(listener("listeners/a", again, selector={"zone": "a"}, policy=""))
        written = time.monotonic()
        with pytest.raises(queue.Empty):  # inside the window of the last build: debounced
            node.recv(timeout=quiet / 2)
        later = node.recv(timeout=30)
        assert time.monotonic() - written >= quiet * 0.9
        assert resources_pb2.Listener.FromString(later.resources[0].value).port == again
    finally:
        node.close()
        channel.close()
        api.close()
        proc.stop()


def test_apply_wait_names_a_node_that_never_acks(control_plane, populated, tmp_path):
    """A node that takes the push but never answers (stuck, or hostile) must not let `apply --wait` report
    success: it exits 1 after the timeout naming that node and the type it owes, while the node that did
    ACK is reported as such."""
    import subprocess

    from tests.support import MTLSGATE

    channel = grpc.insecure_channel(control_plane.address)
    stuck, ok = RawAds(channel, "raw-stuck", {"zone": "a"}), RawAds(channel, "raw-ok", {"zone": "a"})
    try:
        for node in (stuck, ok):
            node.send(LISTENER)
            first = node.recv()
            node.send(LISTENER, version=first.version_info, nonce=first.nonce)
        wait_until(lambda: all(populated.nodes()[n].state == api_pb2.SYNCED for n in ("raw-stuck", "raw-ok")),
                   message="both raw nodes SYNCED")
        manifest = tmp_path / "l.yaml"
        manifest.write_text(f"kind: Listener\nname: a\nport: {free_port()}\ncertificate: certificates/edge\n"
                            "serverTlsPolicy: serverTlsPolicies/strict\nbackend: 127.0.0.1:9\nnodeSelector: {zone: a}\n")
        command = subprocess.Popen([*MTLSGATE, "apply", "--wait=3s", "-f", str(manifest), "--server",
                                    control_plane.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pushed = ok.recv()
        ok.send(LISTENER, version=pushed.version_info, nonce=pushed.nonce)
        stuck.recv()  # taken, never answered
        out, err = command.communicate(timeout=30)
        assert command.returncode == 1, (out, err)
        assert "node raw-ok acked after" in out and "raw-stuck" not in out
        assert err == "mtlsgate apply: --wait: not acked after 3s: raw-stuck (Listener)\n"
    finally:
        stuck.close()
        ok.close()
        channel.close()
