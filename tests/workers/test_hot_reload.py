"""SPEC §6 hot reload in the workers: new trust material for new handshakes, no restarts, no dropped valid
connections, revalidateOnUpdate closing connections whose certificate became invalid; listeners opening
and closing ports; port conflicts refused; dead workers replaced."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from control_plane.pki import DemoPki, Issued, issue
from data_plane.node.config import ConfigRejected
from tests.support import free_port, port_open, wait_until
from tests.workers.conftest import (
    PoolHarness,
    RecordingBackend,
    client_context,
    http_roundtrip,
    https_get,
    listener,
    node_config,
    policy,
    trust_config,
)


def _config(pki: DemoPki, backend: RecordingBackend, port: int, *, revoked: bool, revalidate: bool,
            extra: list | None = None):
    crl = pki.path("crl" if revoked else "empty_crl").read_text()
    tc = trust_config(pki, crl_pem=crl)
    lst = listener("reload", port, backend.address, policy("REJECT_INVALID", revalidate_on_update=revalidate))
    return node_config(pki, [lst, *(extra or [])], tc)


def _open_connection(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _closed_by_server(sock: ssl.SSLSocket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ssl.SSLError, OSError):
        return True


class _ClientLoop(threading.Thread):
    """A valid client making requests on new connections as fast as it can; counts failures."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        super().__init__(daemon=True)
        self.port, self.ctx = port, ctx
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, _, _ = https_get(self.port, self.ctx)
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"status {status}")
            except Exception as exc:
                self.failures.append(repr(exc))


def test_crl_update_applies_to_new_handshakes_and_revalidates_open_connections(
        harness: PoolHarness, backend: RecordingBackend, demo_pki: DemoPki) -> None:
    port = free_port()
    harness.apply(_config(demo_pki, backend, port, revoked=False, revalidate=True))
    pids = sorted(harness.pool.pids())
    revoked_ctx = client_context(demo_pki, "revoked")
    open_conn = _open_connection(port, revoked_ctx)
    assert http_roundtrip(open_conn)[0] == 200  # not yet revoked

    loop = _ClientLoop(port, client_context(demo_pki, "client"))
    loop.start()
    wait_until(lambda: loop.ok >= 5, message="the valid client loop is running")
    harness.apply(_config(demo_pki, backend, port, revoked=True, revalidate=True))
    applied_at = time.monotonic()
    wait_until(lambda: _closed_by_server(open_conn), timeout=1.0, interval=0.01,
               message="revalidateOnUpdate closes the revoked client's connection")
    assert time.monotonic() - applied_at < 1.0
    ok_at_change = loop.ok
    wait_until(lambda: loop.ok >= ok_at_change + 5, message="the valid client keeps being served")
    loop.stop.set()
    loop.join(10)
    open_conn.close()

    assert loop.failures == []
    assert sorted(harness.pool.pids()) == pids  # no worker restart
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
        https_get(port, revoked_ctx)


def test_without_revalidation_open_connections_keep_their_verdict(harness: PoolHarness, backend: RecordingBackend,
                                                                  demo_pki: DemoPki) -> None:
    port = free_port()
    harness.apply(_config(demo_pki, backend, port, revoked=False, revalidate=False))
    conn = _open_connection(port, client_context(demo_pki, "revoked"))
    assert http_roundtrip(conn)[0] == 200
    harness.apply(_config(demo_pki, backend, port, revoked=True, revalidate=False))
    assert http_roundtrip(conn)[0] == 200  # same connection, still served
    conn.close()
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
        https_get(port, client_context(demo_pki, "revoked"))


def test_listeners_added_removed_and_moved_open_and_close_ports(harness: PoolHarness, backend: RecordingBackend,
                                                                demo_pki: DemoPki) -> None:
    port, extra_port, moved_port = free_port(), free_port(), free_port()
    extra = listener("extra", extra_port, backend.address, None)
    harness.apply(_config(demo_pki, backend, port, revoked=False, revalidate=False, extra=[extra]))
    assert https_get(extra_port, client_context(demo_pki, None))[0] == 200
    moved = listener("extra", moved_port, backend.address, None)
    harness.apply(_config(demo_pki, backend, port, revoked=False, revalidate=False, extra=[moved]))
    assert https_get(moved_port, client_context(demo_pki, None))[0] == 200
    wait_until(lambda: not port_open("127.0.0.1", extra_port), message="the old port is closed")
    harness.apply(_config(demo_pki, backend, port, revoked=False, revalidate=False))
    wait_until(lambda: not port_open("127.0.0.1", moved_port), message="the removed listener's port is closed")
    assert https_get(port, client_context(demo_pki, "client"))[0] == 200


def test_port_in_use_is_refused_and_the_last_good_config_keeps_serving(
        harness: PoolHarness, backend: RecordingBackend, demo_pki: DemoPki) -> None:
    port = free_port()
    harness.apply(_config(demo_pki, backend, port, revoked=False, revalidate=False))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        clash = listener("clash", taken, backend.address, None)
        with pytest.raises(ConfigRejected, match=f"listeners/clash: port {taken} is already in use"):
            harness.apply(_config(demo_pki, backend, port, revoked=False, revalidate=False, extra=[clash]))
    assert https_get(port, client_context(demo_pki, "client"))[0] == 200


def test_a_dead_worker_is_replaced_and_runs_the_current_config(harness: PoolHarness, backend: RecordingBackend,
                                                               demo_pki: DemoPki) -> None:
    port = free_port()
    harness.apply(_config(demo_pki, backend, port, revoked=False, revalidate=False))
    victim = harness.pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(harness.pool.pids()) == 2 and victim not in harness.pool.pids(), timeout=20,
               message="the killed worker is restarted")
    version = harness.pool.running_version()
    wait_until(lambda: all(w.get("version") == version and w["alive"] for w in harness.pool.worker_status()),
               timeout=20, message="the new worker runs the current version")
    for _ in range(6):  # SO_REUSEPORT spreads these over both workers
        assert https_get(port, client_context(demo_pki, "client"))[0] == 200


def _listen_inodes(port: int) -> set[str]:
    """Inodes of the LISTEN sockets on `port` (from /proc/net/tcp): the same inodes = not rebound."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
            inodes.add(fields[9])
    return inodes


def test_policy_change_applies_to_new_handshakes_without_rebinding(harness: PoolHarness, backend: RecordingBackend,
                                                                   demo_pki: DemoPki) -> None:
    port = free_port()
    allow = listener("switch", port, backend.address, policy("ALLOW_INVALID_OR_MISSING_CLIENT_CERT"))
    harness.apply(node_config(demo_pki, [allow]))
    assert https_get(port, client_context(demo_pki, "untrusted"))[0] == 200
    inodes = _listen_inodes(port)
    assert len(inodes) == 2  # one SO_REUSEPORT socket per worker
    strict = listener("switch", port, backend.address, policy("REJECT_INVALID"))
    harness.apply(node_config(demo_pki, [strict]))
    with pytest.raises(ssl.SSLError):
        https_get(port, client_context(demo_pki, "untrusted"))
    assert https_get(port, client_context(demo_pki, "client"))[0] == 200
    assert _listen_inodes(port) == inodes


def test_rotated_server_certificate_is_served_to_new_handshakes(harness: PoolHarness, backend: RecordingBackend,
                                                                demo_pki: DemoPki) -> None:
    port = free_port()
    config = _config(demo_pki, backend, port, revoked=False, revalidate=False)
    harness.apply(config)
    open_conn = _open_connection(port, client_context(demo_pki, "client"))
    old_serial = open_conn.getpeercert()["serialNumber"]
    intermediate = Issued(x509.load_pem_x509_certificate(demo_pki.path("intermediate_cert").read_bytes()),
                          serialization.load_pem_private_key(demo_pki.path("intermediate_key").read_bytes(), None))
    rotated = issue("mtlsgate demo server", issuer=intermediate, eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
                    dns=("localhost",), ips=("127.0.0.1",))
    certificate = config.certificates["certificates/edge"]
    new_cert = type(certificate)(name=certificate.name, pem_certificate_chain=rotated.cert_pem + intermediate.cert_pem,
                                 pem_private_key=rotated.key_pem)
    harness.apply(dataclasses.replace(config, certificates={certificate.name: new_cert}))
    with _open_connection(port, client_context(demo_pki, "client")) as fresh:
        assert int(fresh.getpeercert()["serialNumber"], 16) == rotated.cert.serial_number
        assert int(old_serial, 16) != rotated.cert.serial_number
    assert http_roundtrip(open_conn)[0] == 200  # the existing connection is unaffected
    open_conn.close()
