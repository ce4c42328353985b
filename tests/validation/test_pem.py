"""PEM problems in words (data_plane/validation/pem.py) and where write validation uses them."""

from __future__ import annotations

import base64

import pytest
from mtlsgate.v1 import resources_pb2

from data_plane.validation.pem import PemProblem, crl_problem, load_certificates, private_key_problem
from data_plane.validation.resources import validate_certificate, validate_trust_config
from tests.validation.conftest import Pki


def _frame(label: str, der: bytes) -> str:
    return f"-----BEGIN {label}-----\n{base64.encodebytes(der).decode()}-----END {label}-----\n"


def problem(text: str) -> str:
    with pytest.raises(PemProblem) as raised:
        load_certificates(text)
    return str(raised.value)


def test_certificate_problems(pki: Pki) -> None:
    der = base64.b64decode("".join(pki.client.cert_pem.splitlines()[1:-1]))
    assert problem("") == "not a PEM block (no -----BEGIN CERTIFICATE----- line)"
    assert problem("MIIB...") == "not a PEM block (no -----BEGIN CERTIFICATE----- line)"
    assert problem(pki.client.key_pem) == "a private key where a certificate was expected"
    assert problem(_frame("X509 CRL", b"\x30\x00")) == "a CRL where a certificate was expected"
    assert problem(pki.client.cert_pem[:200]) == ("truncated PEM: -----BEGIN CERTIFICATE----- has no matching "
                                                  "-----END CERTIFICATE----- line")
    assert problem(_frame("CERTIFICATE", der[:100])) == (
        f"truncated DER (the PEM block holds 100 bytes; its DER header announces {len(der)})")
    assert problem(_frame("CERTIFICATE", b"\x02\x01\x05")) == "garbage DER (not a certificate)"
    assert problem("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n") == (
        "the CERTIFICATE block is not valid base64")
    assert problem(pki.client.cert_pem + pki.client.key_pem) == (
        "a private key where a certificate was expected (PEM block 2)")
    assert [c.subject for c in load_certificates(pki.client.cert_pem + pki.inter.cert_pem)] == [
        pki.client.cert.subject, pki.inter.cert.subject]


def test_other_kinds(pki: Pki) -> None:
    assert crl_problem(pki.client.cert_pem) == "a certificate where a CRL was expected"
    assert crl_problem("nothing") == "not a PEM block (no -----BEGIN X509 CRL----- line)"
    assert private_key_problem(pki.client.cert_pem) == "a certificate where a private key was expected"
    assert private_key_problem(_frame("PRIVATE KEY", b"\x30\x82\x04\x00\x02")) == (
        "truncated DER (the PEM block holds 5 bytes; its DER header announces 1028)")


def test_messages_never_quote_key_material(pki: Pki) -> None:
    key_body = pki.client.key_pem.splitlines()[1]
    for text in (problem(pki.client.key_pem), private_key_problem(pki.client.key_pem[:150])):
        assert key_body not in text and key_body[:16] not in text


def test_a_private_key_inside_pem_certificate_is_refused(pki: Pki) -> None:
    """Before: cryptography's PEM loader skips blocks that are not certificates, so a chain with its key
    appended passed validation and the key was stored in pemCertificate, which the API returns to every
    reader (`get -o yaml`). Now the write is refused and the message does not quote the key."""
    cert = resources_pb2.Certificate(pem_certificate=pki.client.cert_pem + pki.client.key_pem,
                                     pem_private_key=pki.client.key_pem)
    violations = validate_certificate(cert)
    assert [str(v) for v in violations] == [
        "pemCertificate: a private key where a certificate chain was expected (PEM block 2)"]
    tc = resources_pb2.TrustConfig()
    tc.trust_stores.add().trust_anchors.add(pem_certificate=pki.root.cert_pem + pki.client.key_pem)
    assert [str(v) for v in validate_trust_config(tc)] == [
        "trustStores[0].trustAnchors[0].pemCertificate: a private key where a certificate was expected "
        "(PEM block 2)"]
