"""A four-node fleet for roll-out tests: a real control plane (the shared `--insecure` harness), four real
proxy nodes in two label groups (zone=a: edge-1, edge-2; zone=b: edge-3, edge-4) on their own loopback
addresses, an echo backend, and real TLS clients that keep requesting through every node."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from control_plane.pki import DemoPki
from tests.support import MTLSGATE, wait_until
from tests.xds.conftest import Node

ZONES = {"edge-1": "a", "edge-2": "a", "edge-3": "b", "edge-4": "b"}
ADDRESSES = {"edge-1": "127.0.0.11", "edge-2": "127.0.0.12", "edge-3": "127.0.0.13", "edge-4": "127.0.0.14"}
LISTENER = "type.googleapis.com/mtlsgate.v1.Listener"


def cli(server: str, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTLSGATE, *args, "--server", server], capture_output=True, text=True, timeout=timeout)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}{done.stdout}"
    return done.stdout


def block(pem: str, indent: int = 6) -> str:
    return "|\n" + "".join(" " * indent + line + "\n" for line in pem.strip().splitlines())


def base_manifest(pki: DemoPki, port: int, backend: str, *, crl: str | None = None, san: str = "",
                  ports: tuple[int, int] | None = None) -> str:
    """TrustConfig + strict policy + certificate + one listener per zone (the two label groups)."""
    pa, pb = ports or (port, port)
    san_block = f"  matchSubjectAltNames:\n  - uri: '{san}'\n" if san else ""
    return f"""kind: TrustConfig
name: demo
trustStores:
- trustAnchors:
  - pemCertificate: {block(pki.path('ca_cert').read_text())}  intermediateCas:
  - pemCertificate: {block(pki.path('intermediate_cert').read_text())}  crls:
  - pemCrl: {block(crl or pki.path('crl').read_text())}---
kind: ServerTlsPolicy
name: strict
mtlsPolicy:
  clientValidationMode: REJECT_INVALID
  clientValidationTrustConfig: trustConfigs/demo
{san_block}---
kind: Certificate
name: edge
pemCertificate: {block(pki.path('server_cert').read_text(), 2)}pemPrivateKey: {block(pki.path('server_key').read_text(), 2)}---
kind: Listener
name: zone-a
port: {pa}
certificate: certificates/edge
serverTlsPolicy: serverTlsPolicies/strict
backend: {backend}
nodeSelector: {{zone: a}}
---
kind: Listener
name: zone-b
port: {pb}
certificate: certificates/edge
serverTlsPolicy: serverTlsPolicies/strict
backend: {backend}
nodeSelector: {{zone: b}}
"""


def policy_manifest(name: str, waves: str, bake: str, extra: str = "") -> str:
    return f"kind: RolloutPolicy\nname: {name}\nwaves: {waves}\nbake: {bake}\n{extra}"


def request_ok(address: str, port: int, pki: DemoPki, cert: str = "client_cert", key: str = "client_key",
               timeout: float = 3.0) -> tuple[bool, str]:
    """One HTTPS request through a node with a client certificate: (200 from the backend?, what happened)."""
    context = ssl.create_default_context(cafile=str(pki.path("ca_cert")))
    context.check_hostname = True
    context.load_cert_chain(str(pki.path(cert)) if cert in pki.files else cert,
                            str(pki.path(key)) if key in pki.files else key)
    try:
        with socket.create_connection((address, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            conn = http.client.HTTPConnection(address, port, timeout=timeout)
            conn.sock = tls
            conn.request("GET", "/rollout")
            reply = conn.getresponse()
            reply.read()
            return reply.status == 200, f"HTTP {reply.status}"
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"


@dataclass
class ClientLoop:
    """A valid client requesting through one node in a loop; records every failure with its time."""

    node_id: str
    address: str
    port: int
    pki: DemoPki
    cert: str = "client_cert"
    key: str = "client_key"
    ok_count: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ClientLoop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            good, what = request_ok(self.address, self.port, self.pki, self.cert, self.key)
            if good:
                self.ok_count += 1
            else:
                self.failures.append((time.time(), what))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def node_listener_version(node: Node) -> str:
    return str(node.dump().get("versions", {}).get(LISTENER, ""))


def status_versions(server: str) -> dict[str, str]:
    """`mtlsgate status -o json`: node ID → acked Listener version."""
    done = cli(server, "status", "-o", "json")
    document: Any = json.loads(done.stdout)
    nodes = document["nodes"] if isinstance(document, dict) else document
    return {n["id"]: n["types"].get(LISTENER, {}).get("version", "") for n in nodes}


def rollout_status(server: str, name: str = "") -> dict[str, Any]:
    done = cli(server, "rollout", "status", *([name] if name else []), "-o", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def wait_state(server: str, state: str, timeout: float = 30.0, name: str = "") -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        # the latest status only: its JSON leaves out empty fields (a HALTED run's `reached`), so keys of
        # an earlier poll must not survive into it
        found.clear()
        found.update(rollout_status(server, name))
        return found.get("state") == state

    wait_until(reached, timeout=timeout, interval=0.1, message=f"roll-out state {state} (last: {found.get('state')}, "
               f"{found.get('reason')})")
    return found
