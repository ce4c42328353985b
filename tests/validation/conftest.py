"""PKI shapes for the validation tests, generated with `cryptography` once per session, and helpers
that turn them into real TrustConfig / ServerTlsPolicy protos compiled the way the product does."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from mtlsgate.v1 import resources_pb2

from control_plane.pki import Issued, crl_pem, issue
from data_plane.validation.bundle import CompiledBundle, compile_bundle, trust_bundle_from_trust_config
from data_plane.validation.policy import ClientPolicy, compile_policy

UTC = dt.UTC
NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)  # every validation in these tests happens "now"
CA_START = dt.datetime(2025, 1, 1, tzinfo=UTC)
LEAF_START = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LEAF_END = dt.datetime(2036, 1, 2, 3, 4, 5, tzinfo=UTC)
ORG = "mtlsgate test"


def ca(name: str, issuer: Issued | None = None, **kw: object) -> Issued:
    kw.setdefault("not_before", CA_START)
    kw.setdefault("not_after", CA_START + dt.timedelta(days=3650))
    return issue(name, issuer=issuer, ca=True, organization=ORG, **kw)  # type: ignore[arg-type]


def leaf(name: str, issuer: Issued, **kw: object) -> Issued:
    kw.setdefault("not_before", LEAF_START)
    kw.setdefault("not_after", LEAF_END)
    return issue(name, issuer=issuer, organization=ORG, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Pki:
    root: Issued
    inter: Issued
    client: Issued  # valid: root → inter → client, with DNS/URI SANs and a fixed serial


@pytest.fixture(scope="session")
def pki() -> Pki:
    root = ca("Test Root")
    inter = ca("Test Intermediate", issuer=root)
    client = leaf(
        "client",
        inter,
        serial=0x0123ABCDEF,
        dns=("client.example.com", "alt.example.com"),
        uris=("spiffe://example.org/ns/default/sa/client",),
    )
    return Pki(root, inter, client)


def trust_config(
    anchors: Sequence[Issued] = (),
    intermediates: Sequence[Issued] = (),
    crls: Sequence[x509.CertificateRevocationList] = (),
    allowlist: Sequence[Issued] = (),
    name: str = "trustConfigs/test",
) -> resources_pb2.TrustConfig:
    tc = resources_pb2.TrustConfig(name=name)
    store = tc.trust_stores.add()
    for a in anchors:
        store.trust_anchors.add(pem_certificate=a.cert_pem)
    for i in intermediates:
        store.intermediate_cas.add(pem_certificate=i.cert_pem)
    for c in crls:
        store.crls.add(pem_crl=crl_pem(c))
    for a in allowlist:
        tc.allowlisted_certificates.add(pem_certificate=a.cert_pem)
    return tc


def bundle(**kw: object) -> CompiledBundle:
    return compile_bundle(trust_bundle_from_trust_config(trust_config(**kw)))  # type: ignore[arg-type]


def server_tls_policy(mode: str = "REJECT_INVALID", **mtls: object) -> resources_pb2.ServerTlsPolicy:
    m = resources_pb2.MTLSPolicy(
        client_validation_mode=resources_pb2.MTLSPolicy.ClientValidationMode.Value(mode),
        client_validation_trust_config="trustConfigs/test",
        **mtls,  # type: ignore[arg-type]
    )
    return resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/test", mtls_policy=m)


def policy(mode: str = "REJECT_INVALID", **mtls: object) -> ClientPolicy:
    return compile_policy(server_tls_policy(mode, **mtls))


# ---------------------------------------------------------------- SHA-1 signatures
# cryptography refuses to sign certificates with SHA-1, so re-sign a TBS by hand: swap the
# sha256WithRSAEncryption OID for sha1WithRSAEncryption (same length) and sign with PKCS#1 v1.5.

_SHA256_RSA = bytes.fromhex("06092a864886f70d01010b")
_SHA1_RSA = bytes.fromhex("06092a864886f70d010105")


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def sha1_signed(cert: x509.Certificate, issuer_key: rsa.RSAPrivateKey) -> bytes:
    """DER of `cert` re-signed by `issuer_key` with sha1WithRSAEncryption."""
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(_SHA256_RSA) == 1, "issuer must be RSA with a SHA-256 signature"
    tbs = tbs.replace(_SHA256_RSA, _SHA1_RSA)
    signature = issuer_key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    algorithm = b"\x30\x0d" + _SHA1_RSA + b"\x05\x00"
    bits = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = tbs + algorithm + bits
    return b"\x30" + _der_length(len(body)) + body
