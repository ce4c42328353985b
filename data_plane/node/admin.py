"""The node's admin HTTP endpoint (SPEC §7), like Envoy's: `/ready` (200 once a configuration is active),
`/config_dump` (versions, listeners, bundle and certificate fingerprints — never private keys), `/metrics`.
Served by the standard library's threaded HTTP server; it only reads the agent's immutable config."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from google.protobuf import json_format
from mtlsgate.v1 import xds_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from data_plane.node.agent import XdsAgent
from data_plane.node.config import NodeConfig


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _bundle_summary(bundle: xds_pb2.TrustBundle) -> dict[str, Any]:
    return {
        "name": bundle.name,
        "trustStores": [{
            "trustAnchors": [_fingerprint(d) for d in store.trust_anchors],
            "intermediateCas": [_fingerprint(d) for d in store.intermediate_cas],
            "crls": [_fingerprint(d) for d in store.crls],
        } for store in bundle.trust_stores],
        "allowlistedCertificates": [_fingerprint(d) for d in bundle.allowlisted_certificates],
    }


def _certificate_summary(cert: xds_pb2.ServerCertificate) -> dict[str, Any]:
    out: dict[str, Any] = {"name": cert.name}
    try:
        chain = x509.load_pem_x509_certificates(cert.pem_certificate_chain.encode())
    except ValueError:
        return out
    from cryptography.hazmat.primitives import serialization

    leaf = chain[0]
    out["chain"] = [_fingerprint(c.public_bytes(serialization.Encoding.DER)) for c in chain]
    out["subject"] = leaf.subject.rfc4514_string()
    out["notAfter"] = leaf.not_valid_after_utc.isoformat()
    out["publicKeySha256"] = _fingerprint(leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    return out


def config_dump(agent: XdsAgent) -> dict[str, Any]:
    config: NodeConfig | None = agent.active
    dump: dict[str, Any] = {
        "node": {"id": agent.identity.id, "cluster": agent.identity.cluster, "labels": dict(agent.identity.labels)},
        "controlPlane": agent.server,
        "connected": agent.connected,
        "ready": agent.ready,
        "source": agent.source,
        "appliedCount": agent.applied_count,
        "lastError": agent.last_error,
    }
    if config is not None:
        dump["versions"] = dict(config.versions)
        dump["listeners"] = [json_format.MessageToDict(lst) for _, lst in sorted(config.listeners.items())]
        dump["bundles"] = [_bundle_summary(b) for _, b in sorted(config.bundles.items())]
        dump["certificates"] = [_certificate_summary(c) for _, c in sorted(config.certificates.items())]
        dump["backendServices"] = [json_format.MessageToDict(s) for _, s in sorted(config.backend_services.items())]
    health = getattr(agent.applier, "health", None)  # the WorkerPool's active health checks
    if health is not None:
        dump["backendHealth"] = health.status()
    worker_status = getattr(agent.applier, "worker_status", None)  # the WorkerPool: what each worker runs
    if worker_status is not None:
        dump["workers"] = worker_status()
    return dump


class AdminServer:
    def __init__(self, agent: XdsAgent, address: str) -> None:
        host, _, port = address.rpartition(":")
        agent_ref = agent

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/ready":
                    ok = agent_ref.ready
                    self._send(200 if ok else 503, b"LIVE\n" if ok else b"NOT READY\n", "text/plain")
                elif path == "/config_dump":
                    body = json.dumps(config_dump(agent_ref), indent=2).encode()
                    self._send(200, body, "application/json")
                elif path == "/metrics":
                    self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b"not found: try /ready, /config_dump, /metrics\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="admin-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
