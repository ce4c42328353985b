"""PEM text in words: which blocks a text holds and, when it is not what a field expects, why — "not a PEM
block", "a private key where a certificate was expected", "truncated DER" — instead of the parser's
internals. Pure; shared by write validation, `mtlsgate check` and the manifest tools. Never quotes input
(a misplaced private key must not end up in an error message or a log)."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from cryptography import x509

_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)-----BEGIN (?P<label>[A-Z0-9 ]+)-----[ \t]*\r?\n"
    r"(?P<body>.*?)"
    r"^[ \t]*-----END (?P=label)-----",
    re.MULTILINE | re.DOTALL,
)
_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
_HEADER_LINE = re.compile(r"^[A-Za-z-]+:.*$", re.MULTILINE)  # RFC 1421 headers (Proc-Type, DEK-Info)

CERTIFICATE_LABELS = ("CERTIFICATE", "X509 CERTIFICATE")

_WHAT = {
    "CERTIFICATE": "a certificate",
    "X509 CERTIFICATE": "a certificate",
    "TRUSTED CERTIFICATE": "an OpenSSL trusted certificate",
    "X509 CRL": "a CRL",
    "PRIVATE KEY": "a private key",
    "RSA PRIVATE KEY": "a private key",
    "EC PRIVATE KEY": "a private key",
    "ENCRYPTED PRIVATE KEY": "an encrypted private key",
    "OPENSSH PRIVATE KEY": "an OpenSSH private key",
    "PUBLIC KEY": "a public key",
    "RSA PUBLIC KEY": "a public key",
    "CERTIFICATE REQUEST": "a certificate signing request",
    "NEW CERTIFICATE REQUEST": "a certificate signing request",
    "PKCS7": "a PKCS#7 bundle",
    "EC PARAMETERS": "EC parameters",
}


class PemProblem(ValueError):
    """The text is not what the field expects; the message says what it is instead."""


@dataclass(frozen=True)
class PemBlock:
    label: str
    body: str  # base64 text between the BEGIN and END lines
    line: int  # 1-based line of the BEGIN line
    indented: bool  # BEGIN line indented: the block is embedded in some other text (a YAML manifest)

    @property
    def what(self) -> str:
        return _WHAT.get(self.label, f"a {self.label[:40]} block")


def blocks(text: str) -> list[PemBlock]:
    return [
        PemBlock(m["label"], m["body"], text.count("\n", 0, m.start()) + 1, bool(m["indent"]))
        for m in _BLOCK.finditer(text)
    ]


def _unframed_problem(text: str, expected_label: str) -> str:
    begin = _BEGIN.search(text)
    if begin is None:
        return f"not a PEM block (no -----BEGIN {expected_label}----- line)"
    label = begin[1][:40]
    return f"truncated PEM: -----BEGIN {label}----- has no matching -----END {label}----- line"


def _der(block: PemBlock) -> bytes:
    body = _HEADER_LINE.sub("", block.body)
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise PemProblem(f"the {block.label} block is not valid base64") from None


def der_problem(der: bytes, what: str) -> str:
    """Why `der` did not parse as `what`: cut short, or not DER at all."""
    if len(der) >= 2 and der[0] == 0x30:
        first = der[1]
        if first < 0x80:
            length, header = first, 2
        else:
            count = first & 0x7F
            length = int.from_bytes(der[2 : 2 + count], "big") if 0 < count <= 4 else -1
            header = 2 + count
        if length >= 0 and header + length > len(der):
            return f"truncated DER (the PEM block holds {len(der)} bytes; its DER header announces {header + length})"
    return f"garbage DER (not {what})"


def load_certificates(text: str, *, expected: str = "a certificate") -> list[x509.Certificate]:
    """Every certificate of a PEM text, in order; PemProblem if any block is something else (a key, a CRL),
    is cut short or does not decode. `expected` names what the field wants, for the message."""
    found = blocks(text)
    if not found:
        raise PemProblem(_unframed_problem(text, "CERTIFICATE"))
    certificates = []
    for index, block in enumerate(found, 1):
        where = f" (PEM block {index})" if len(found) > 1 else ""
        if block.label not in CERTIFICATE_LABELS:
            raise PemProblem(f"{block.what} where {expected} was expected{where}")
        der = _der(block)
        try:
            certificates.append(x509.load_der_x509_certificate(der))
        except ValueError:
            raise PemProblem(f"{der_problem(der, 'a certificate')}{where}") from None
    return certificates


def crl_problem(text: str) -> str:
    """Why a text that cryptography refused as a PEM CRL is not one, in words."""
    found = blocks(text)
    if not found:
        return _unframed_problem(text, "X509 CRL")
    for block in found:
        if block.label != "X509 CRL":
            return f"{block.what} where a CRL was expected"
    if len(found) > 1:
        return f"{len(found)} CRL blocks where one was expected"
    try:
        der = _der(found[0])
    except PemProblem as exc:
        return str(exc)
    return der_problem(der, "a CRL")


def private_key_problem(text: str) -> str:
    """Why a text cryptography refused as a PEM private key is not one, in words."""
    found = blocks(text)
    if not found:
        return _unframed_problem(text, "PRIVATE KEY")
    block = found[0]
    if block.what != "a private key":
        return f"{block.what} where a private key was expected"
    try:
        der = _der(block)
    except PemProblem as exc:
        return str(exc)
    return der_problem(der, "a private key")


def tls_files_problem(*, cert: str | None = None, key: str | None = None, ca: str | None = None) -> str | None:
    """What is wrong with the PEM texts of a TLS identity (`cert` + `key`) and/or a CA bundle, in words,
    before a TLS library turns them into "Invalid cert chain file" or a bind failure. Names the role
    (`certificate`, `key`, `CA`) the caller maps to its flag."""
    from cryptography.hazmat.primitives import serialization

    if ca is not None:
        try:
            load_certificates(ca, expected="a CA certificate")
        except PemProblem as exc:
            return f"CA: {exc}"
    if cert is None or key is None:
        return None
    try:
        leaf = load_certificates(cert)[0]
    except PemProblem as exc:
        return f"certificate: {exc}"
    try:
        private = serialization.load_pem_private_key(key.encode(), password=None)
    except TypeError:
        return "key: encrypted private keys are not supported"
    except ValueError:
        return f"key: {private_key_problem(key)}"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        return "key: does not match the certificate's public key"
    return None
