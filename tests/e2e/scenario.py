"""The end-to-end scenario both topologies (processes via `mtlsgate demo`, containers via compose) go
through, written against what a user sees: HTTPS requests with client certificates, the CLI, JSON."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.support import MTLSGATE


@dataclass(frozen=True)
class ClientIdentity:
    cert: Path | None
    key: Path | None


@dataclass(frozen=True)
class Answer:
    """What a client got: an HTTP answer (status, the headers the echo backend saw) or a refusal."""

    status: int | None = None
    backend_headers: dict | None = None
    refused: str | None = None


def request(url: str, ca: Path, client: ClientIdentity, timeout: float = 5.0) -> Answer:
    parts = urlsplit(url)
    context = ssl.create_default_context(cafile=str(ca))
    if client.cert is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    conn = http.client.HTTPSConnection(
        parts.hostname or "", parts.port or 443, context=context, timeout=timeout
    )
    try:
        conn.request("GET", "/e2e", headers={"X-Client-Cert-Chain-Verified": "spoofed"})
        reply = conn.getresponse()
        body = reply.read()
    except (ssl.SSLError, ConnectionError, http.client.HTTPException, TimeoutError) as exc:
        # TLS 1.3: a rejected client certificate surfaces as an alert on the client's first read.
        return Answer(refused=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    headers = None
    if reply.status == 200 and reply.getheader("Content-Type", "").startswith("application/json"):
        headers = json.loads(body)["headers"]
    return Answer(status=reply.status, backend_headers=headers)


def accepted_and_verified(answer: Answer) -> bool:
    headers = answer.backend_headers or {}
    return (
        answer.status == 200
        and headers.get("x-client-cert-present") == "true"
        and headers.get("x-client-cert-chain-verified") == "true"  # ours: the spoofed value was removed
        and headers.get("x-client-cert-error", "") == ""
    )


def forwarded_with_error(answer: Answer, error: str) -> bool:
    headers = answer.backend_headers or {}
    return (
        answer.status == 200
        and headers.get("x-client-cert-chain-verified") == "false"
        and error in headers.get("x-client-cert-error", "")
    )


def rejected(answer: Answer) -> bool:
    """Refused in the TLS handshake, or (rejectAt: HTTP) answered 495/496 without reaching the backend."""
    return answer.refused is not None or answer.status in (495, 496)


def mtlsgate(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTLSGATE, *args], capture_output=True, text=True, timeout=timeout)


def fleet_status(server: str) -> list[dict]:
    """`mtlsgate status -o json`: the list of node entries (SPEC §3)."""
    done = mtlsgate("status", "-o", "json", "--server", server)
    document = json.loads(done.stdout)
    nodes = document["nodes"] if isinstance(document, dict) else document
    # status exits 1 exactly while a connected node is ERROR or STALE, or a node is moving off a dead
    # replica (scripts gate on it)
    gating = any(n.get("moving") or (n.get("connected", True) and n["state"] in ("ERROR", "STALE"))
                 for n in nodes) or bool(
        isinstance(document, dict) and document.get("crlSourceProblems"))
    assert done.returncode == (1 if gating else 0), (done.returncode, done.stderr)
    return nodes


def all_synced(server: str, node_ids: set[str]) -> bool:
    nodes = {node["id"]: node for node in fleet_status(server)}
    return node_ids <= nodes.keys() and all(
        nodes[n]["state"] == "SYNCED" and nodes[n].get("connected", True) for n in node_ids
    )


def acked_versions(server: str) -> dict[str, dict[str, str]]:
    """node id → {short type name (Listener, TrustBundle, ServerCertificate): acked version}."""
    return {
        node["id"]: {
            type_url.rsplit(".", 1)[-1]: entry["version"] for type_url, entry in node["types"].items()
        }
        for node in fleet_status(server)
    }


def apply(manifest: Path, server: str) -> None:
    done = mtlsgate("apply", "-f", str(manifest), "--server", server)
    assert done.returncode == 0, f"mtlsgate apply -f {manifest} failed: {done.stderr}{done.stdout}"


def distinct_free_ports(host: str, count: int) -> list[int]:
    """`count` different free ports (all held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
