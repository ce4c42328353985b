"""Resources for xDS tests, built from the session's demo PKI: a trust config, policies, certificates
and listeners with node selectors, written through a real store."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mtlsgate.v1 import resources_pb2

from control_plane.pki import DemoPki, Issued, crl_pem, make_crl
from control_plane.store.sqlite import SqliteStore


def trust_config(pki: DemoPki, *, crl_file: str = "crl", name: str = "trustConfigs/demo") -> resources_pb2.TrustConfig:
    tc = resources_pb2.TrustConfig(name=name)
    store = tc.trust_stores.add()
    store.trust_anchors.add(pem_certificate=pki.path("ca_cert").read_text())
    store.intermediate_cas.add(pem_certificate=pki.path("intermediate_cert").read_text())
    store.crls.add(pem_crl=pki.path(crl_file).read_text())
    return tc


def strict_policy(name: str = "serverTlsPolicies/strict",
                  trust: str = "trustConfigs/demo") -> resources_pb2.ServerTlsPolicy:
    p = resources_pb2.ServerTlsPolicy(name=name)
    p.mtls_policy.client_validation_mode = resources_pb2.MTLSPolicy.REJECT_INVALID
    p.mtls_policy.client_validation_trust_config = trust
    return p


def certificate(pki: DemoPki, name: str = "certificates/edge") -> resources_pb2.Certificate:
    return resources_pb2.Certificate(name=name, pem_certificate=pki.path("server_cert").read_text(),
                                     pem_private_key=pki.path("server_key").read_text())


def listener(name: str, port: int, *, selector: dict[str, str] | None = None, policy: str = "serverTlsPolicies/strict",
             cert: str = "certificates/edge", backend: str = "127.0.0.1:9") -> resources_pb2.Listener:
    return resources_pb2.Listener(name=name, port=port, node_selector=selector or {}, certificate=cert,
                                  server_tls_policy=policy, backend=backend)


def rotated_crl_pem(pki: DemoPki, revoked_serials: list[int]) -> str:
    """A new CRL from the demo intermediate CA (the test revokes more serials)."""
    inter_cert = _load_cert(pki.path("intermediate_cert"))
    inter_key = serialization.load_pem_private_key(pki.path("intermediate_key").read_bytes(), None)
    inter = Issued(inter_cert, inter_key)  # type: ignore[arg-type]
    return crl_pem(make_crl(inter, revoked_serials))


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def two_group_store(store: SqliteStore, pki: DemoPki, ports: tuple[int, int]) -> SqliteStore:
    """zone=a nodes get listeners/a (strict), zone=b nodes get listeners/b (plain TLS, its own cert)."""
    store.create(trust_config(pki), actor="test")
    store.create(strict_policy(), actor="test")
    store.create(certificate(pki), actor="test")
    store.create(certificate(pki, "certificates/edge-b"), actor="test")
    store.create(listener("listeners/a", ports[0], selector={"zone": "a"}), actor="test")
    store.create(listener("listeners/b", ports[1], selector={"zone": "b"}, policy="",
                          cert="certificates/edge-b"), actor="test")
    return store

