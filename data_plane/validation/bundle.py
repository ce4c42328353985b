"""TrustConfig → TrustBundle (PEM decoded to DER) → CompiledBundle (parsed, indexed, CRLs checked).

Compilation happens once per configuration version, never per handshake: anchors go into a
`cryptography` verification store, intermediates are indexed by subject for path building, the
allowlist by DER digest, and each CRL's revoked serials into a frozenset keyed by its issuer's name and
key, so a revocation lookup costs the same for an empty CRL and for one listing 100,000 serials.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtensionOID
from mtlsgate.v1 import resources_pb2, xds_pb2

from data_plane.validation.pem import PemProblem, crl_problem, load_certificates

# Bounds on what a TrustConfig may hold (every size an outsider controls is bounded, SPEC §8).
# At least what the control plane's write validation admits (4 stores x (200 anchors + 200
# intermediates + 200 CRLs) + 500 allowlisted), so a stored TrustConfig never fails to compile for size.
MAX_CERTIFICATES = 2100  # anchors + intermediates + allowlisted, over all trust stores
MAX_CERTIFICATE_BYTES = 64 * 1024  # one PEM certificate entry
MAX_CRLS = 800  # over all trust stores
MAX_CRL_BYTES = 32 * 1024 * 1024  # one PEM CRL: ~100,000 serials take ~5 MB of PEM
# One fetched CRL (SPEC §13), kept as DER: a 64 MiB response is at most ~48 MiB of DER once PEM is decoded.
MAX_FETCHED_CRL_BYTES = 48 * 1024 * 1024

# CRL extensions we understand; any other critical extension makes the CRL unusable (RFC 5280 §5.2).
_UNSUPPORTED_CRL_EXTENSIONS = {
    ExtensionOID.DELTA_CRL_INDICATOR: "delta CRLs are not supported; give the complete CRL",
    ExtensionOID.ISSUING_DISTRIBUTION_POINT: "partitioned/indirect CRLs (issuingDistributionPoint) are not supported",
}


# What cryptography raises for a certificate or extension it cannot parse (parsing is partly lazy).
MALFORMED = (
    ValueError,
    TypeError,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,
)


class InvalidBundle(ValueError):
    """A TrustConfig / TrustBundle that cannot be used; the message names the field and the problem.
    `reason` is a short machine name (`wrong_signature`, `delta_crl`, …) for the CRL fetcher's status and
    metrics; it is `invalid` where nobody needed a finer one."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def spki_digest(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo: identifies an issuer's key."""
    return hashlib.sha256(
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).digest()


def der_digest(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


# ---------------------------------------------------------------- TrustConfig → TrustBundle


def _pem_certificate_to_der(pem: str, where: str) -> bytes:
    if not pem.strip():
        raise InvalidBundle(f"{where}: empty; expected one PEM certificate")
    if len(pem) > MAX_CERTIFICATE_BYTES:
        raise InvalidBundle(f"{where}: {len(pem)} bytes, more than the {MAX_CERTIFICATE_BYTES}-byte limit")
    try:
        certs = load_certificates(pem)
    except PemProblem as exc:
        raise InvalidBundle(f"{where}: {exc}") from None
    if len(certs) != 1:
        raise InvalidBundle(f"{where}: holds {len(certs)} certificates; give exactly one per entry")
    return certs[0].public_bytes(serialization.Encoding.DER)


def _pem_crl_to_der(pem: str, where: str) -> bytes:
    if len(pem) > MAX_CRL_BYTES:
        raise InvalidBundle(f"{where}: {len(pem)} bytes, more than the {MAX_CRL_BYTES}-byte limit")
    try:
        crl = x509.load_pem_x509_crl(pem.encode())
    except ValueError:
        raise InvalidBundle(f"{where}: {crl_problem(pem)}") from None
    return crl.public_bytes(serialization.Encoding.DER)


def trust_bundle_from_trust_config(tc: resources_pb2.TrustConfig) -> xds_pb2.TrustBundle:
    """Decode every PEM of a TrustConfig into the DER-only TrustBundle sent to proxy nodes.

    Raises InvalidBundle naming the field (`trustStores[0].trustAnchors[1].pemCertificate: …`).
    Signature, CA and CRL checks happen in `compile_bundle`."""
    _check_counts(
        sum(len(s.trust_anchors) + len(s.intermediate_cas) for s in tc.trust_stores)
        + len(tc.allowlisted_certificates),
        sum(len(s.crls) for s in tc.trust_stores) + sum(1 for c in tc.crl_source_status if c.der_crl),
    )
    bundle = xds_pb2.TrustBundle(name=tc.name)
    for i, store in enumerate(tc.trust_stores):
        out = bundle.trust_stores.add()
        for j, anchor in enumerate(store.trust_anchors):
            out.trust_anchors.append(
                _pem_certificate_to_der(
                    anchor.pem_certificate, f"trustStores[{i}].trustAnchors[{j}].pemCertificate"
                )
            )
        for j, inter in enumerate(store.intermediate_cas):
            out.intermediate_cas.append(
                _pem_certificate_to_der(
                    inter.pem_certificate, f"trustStores[{i}].intermediateCas[{j}].pemCertificate"
                )
            )
        for j, crl in enumerate(store.crls):
            out.crls.append(_pem_crl_to_der(crl.pem_crl, f"trustStores[{i}].crls[{j}].pemCrl"))
    # CRLs the control plane fetched from crlSources (SPEC §13) follow the written ones in their store.
    for k, status in enumerate(tc.crl_source_status):
        if not status.der_crl:
            continue
        if not 0 <= status.trust_store < len(bundle.trust_stores):
            raise InvalidBundle(f"crlSourceStatus[{k}].trustStore: no trust store {status.trust_store}")
        if len(status.der_crl) > MAX_FETCHED_CRL_BYTES:
            raise InvalidBundle(f"crlSourceStatus[{k}].derCrl: {len(status.der_crl)} bytes, more than the "
                                f"{MAX_FETCHED_CRL_BYTES}-byte limit", "too_large")
        bundle.trust_stores[status.trust_store].crls.append(status.der_crl)
    for j, allowed in enumerate(tc.allowlisted_certificates):
        bundle.allowlisted_certificates.append(
            _pem_certificate_to_der(allowed.pem_certificate, f"allowlistedCertificates[{j}].pemCertificate")
        )
    return bundle


def _check_counts(certificates: int, crls: int) -> None:
    if certificates > MAX_CERTIFICATES:
        raise InvalidBundle(
            f"trustStores: {certificates} certificates, more than the limit of {MAX_CERTIFICATES}"
        )
    if crls > MAX_CRLS:
        raise InvalidBundle(f"trustStores: {crls} CRLs, more than the limit of {MAX_CRLS}")


# ---------------------------------------------------------------- TrustBundle → CompiledBundle


@dataclass(frozen=True)
class RevocationList:
    """One issuer's CRL, reduced to what a lookup needs."""

    issuer: x509.Name
    revoked: frozenset[int]
    this_update: datetime
    next_update: datetime | None
    where: str  # field path, for messages
    number: int = 0  # cRLNumber

    def is_stale(self, now: datetime) -> bool:
        return self.next_update is not None and now > self.next_update


@dataclass(frozen=True, eq=False)
class CompiledBundle:
    """An immutable, pre-indexed TrustBundle. Identity (`digest`) is the content hash of the bundle."""

    name: str
    digest: str
    anchors: tuple[x509.Certificate, ...]
    intermediates_by_subject: Mapping[bytes, tuple[x509.Certificate, ...]]
    allowlist: frozenset[bytes]  # SHA-256 of DER
    # (issuer subject DER, issuer SPKI SHA-256) → CRLs of that issuer, newest first.
    crls: Mapping[tuple[bytes, bytes], tuple[RevocationList, ...]]
    store: verification.Store | None  # None when there are no trust anchors
    anchor_subjects: frozenset[bytes]
    # Configured CA → (subject DER, SPKI SHA-256): the CRL index key, computed once.
    issuer_keys: Mapping[x509.Certificate, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    # Memo of successful verdicts; see engine.VerdictCache. Not part of the bundle's value.
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def intermediate_count(self) -> int:
        return sum(len(v) for v in self.intermediates_by_subject.values())

    def crls_for(self, issuer: x509.Certificate) -> tuple[RevocationList, ...]:
        """CRLs signed by this issuer (same name and key). Configured CAs are looked up in a table built
        at compile time (the verifier hands back the very objects it was given); others are hashed."""
        key = self.issuer_keys.get(issuer)
        if key is None:
            key = (issuer.subject.public_bytes(), spki_digest(issuer))
        return self.crls.get(key, ())


def _load_der(der: bytes, where: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.subject, cert.issuer, cert.extensions  # noqa: B018 - parsed lazily; fail here, not later
        return cert
    except MALFORMED as exc:
        raise InvalidBundle(f"{where}: not a valid DER certificate ({exc})") from None


def _require_ca(cert: x509.Certificate, where: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise InvalidBundle(f"{where}: not a CA certificate (no basicConstraints extension)") from None
    except MALFORMED as exc:
        raise InvalidBundle(f"{where}: malformed extensions ({exc})") from None
    if not constraints.ca:
        raise InvalidBundle(f"{where}: not a CA certificate (basicConstraints cA is false)")


def _subject_label(name: x509.Name) -> str:
    return name.rfc4514_string() or "<empty name>"


def compile_crl(
    der: bytes, where: str, cas: Sequence[x509.Certificate]
) -> tuple[tuple[bytes, bytes], RevocationList]:
    """Check one DER CRL against the CAs of a trust config and reduce it to its lookup form: the single
    implementation behind written CRLs, fetched CRLs (the control plane's CRL fetcher) and the node."""
    return _compile_crl(der, where, cas)


def _compile_crl(
    der: bytes, where: str, cas: Sequence[x509.Certificate]
) -> tuple[tuple[bytes, bytes], RevocationList]:
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise InvalidBundle(f"{where}: not a DER CRL ({exc})", "not_a_crl") from None
    try:
        extensions = list(crl.extensions)
    except MALFORMED as exc:
        raise InvalidBundle(f"{where}: malformed CRL extensions ({exc})", "malformed_crl") from None
    for ext in extensions:
        if ext.oid in _UNSUPPORTED_CRL_EXTENSIONS:
            reason = "delta_crl" if ext.oid == ExtensionOID.DELTA_CRL_INDICATOR else "unsupported_crl"
            raise InvalidBundle(f"{where}: {_UNSUPPORTED_CRL_EXTENSIONS[ext.oid]}", reason)
        if ext.oid == ExtensionOID.CRL_NUMBER and ext.critical:
            raise InvalidBundle(f"{where}: the cRLNumber extension must not be critical (RFC 5280 §5.2.3)",
                                "unsupported_crl")
        if ext.critical and ext.oid not in (ExtensionOID.CRL_NUMBER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER):
            raise InvalidBundle(f"{where}: unsupported critical CRL extension {ext.oid.dotted_string}",
                                "unsupported_crl")
    numbers = [ext.value.crl_number for ext in extensions if ext.oid == ExtensionOID.CRL_NUMBER]
    if not numbers:
        raise InvalidBundle(f"{where}: no cRLNumber extension (RFC 5280 §5.2.3 requires one)", "no_crl_number")
    issuer_der = crl.issuer.public_bytes()
    same_name = [ca for ca in cas if ca.subject.public_bytes() == issuer_der]
    if not same_name:
        raise InvalidBundle(f"{where}: issuer {_subject_label(crl.issuer)} is not a CA of this trust config",
                            "unknown_issuer")
    for ca in same_name:
        if crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            _require_crl_sign(ca, where)
            this_update = crl.last_update_utc
            next_update = crl.next_update_utc
            if next_update is not None and next_update < this_update:
                raise InvalidBundle(f"{where}: nextUpdate is before thisUpdate", "bad_dates")
            revoked = frozenset(entry.serial_number for entry in crl)
            return (issuer_der, spki_digest(ca)), RevocationList(
                crl.issuer, revoked, this_update, next_update, where, numbers[0]
            )
    raise InvalidBundle(
        f"{where}: signature does not verify against any trust anchor or intermediate named "
        f"{_subject_label(crl.issuer)}",
        "wrong_signature",
    )


def _require_crl_sign(ca: x509.Certificate, where: str) -> None:
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except MALFORMED:
        raise InvalidBundle(
            f"{where}: issuer {_subject_label(ca.subject)} has a malformed keyUsage"
        ) from None
    except x509.ExtensionNotFound:
        return  # RFC 5280 §6.3.3(f): no keyUsage extension = every usage allowed
    if not usage.crl_sign:
        raise InvalidBundle(
            f"{where}: issuer {_subject_label(ca.subject)} has a keyUsage without cRLSign, so it may not sign CRLs",
            "issuer_not_crl_signer",
        )


def compile_bundle(tb: xds_pb2.TrustBundle) -> CompiledBundle:
    """Parse, check and index a TrustBundle. Raises InvalidBundle naming the field and the problem:
    an undecodable certificate, a non-CA anchor or intermediate, a CRL whose signature does not verify
    against a CA of this bundle, or a CRL kind we do not support."""
    _check_counts(
        sum(len(s.trust_anchors) + len(s.intermediate_cas) for s in tb.trust_stores)
        + len(tb.allowlisted_certificates),
        sum(len(s.crls) for s in tb.trust_stores),
    )
    anchors: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    crl_inputs: list[tuple[bytes, str]] = []
    for i, store in enumerate(tb.trust_stores):
        for j, der in enumerate(store.trust_anchors):
            where = f"trustStores[{i}].trustAnchors[{j}]"
            cert = _load_der(der, where)
            _require_ca(cert, where)
            anchors.append(cert)
        for j, der in enumerate(store.intermediate_cas):
            where = f"trustStores[{i}].intermediateCas[{j}]"
            cert = _load_der(der, where)
            _require_ca(cert, where)
            intermediates.append(cert)
        crl_inputs += [(der, f"trustStores[{i}].crls[{j}]") for j, der in enumerate(store.crls)]
    allowlist = set()
    for j, der in enumerate(tb.allowlisted_certificates):
        _load_der(der, f"allowlistedCertificates[{j}]")
        allowlist.add(der_digest(der))

    by_subject: dict[bytes, list[x509.Certificate]] = {}
    seen: set[bytes] = set()
    for cert in intermediates:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der in seen:
            continue
        seen.add(der)
        by_subject.setdefault(cert.subject.public_bytes(), []).append(cert)

    crls: dict[tuple[bytes, bytes], list[RevocationList]] = {}
    for der, where in crl_inputs:
        key, compiled = _compile_crl(der, where, anchors + intermediates)
        crls.setdefault(key, []).append(compiled)

    return CompiledBundle(
        name=tb.name,
        digest=hashlib.sha256(tb.SerializeToString(deterministic=True)).hexdigest(),
        anchors=tuple(anchors),
        intermediates_by_subject={k: tuple(v) for k, v in by_subject.items()},
        allowlist=frozenset(allowlist),
        crls={k: tuple(sorted(v, key=lambda c: c.this_update, reverse=True)) for k, v in crls.items()},
        store=verification.Store(anchors) if anchors else None,
        anchor_subjects=frozenset(a.subject.public_bytes() for a in anchors),
        issuer_keys={ca: (ca.subject.public_bytes(), spki_digest(ca)) for ca in anchors + intermediates},
    )
