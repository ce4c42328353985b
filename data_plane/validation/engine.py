"""The decision of SPEC §4: `validate(chain, bundle, policy, now) -> Verdict`, plus what a rejection
looks like on the wire (`tls_alert`, `http_status`).

Path building and the RFC 5280 checks come from `cryptography.x509.verification` (its client verifier);
this module adds what it lacks: GCP's limits and key rules, the allowlist, EKU rules on the chain, the
depth and candidate limits, the time budget, CRLs and SAN matchers, and a finer `reason` for failures.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from data_plane.validation.bundle import MALFORMED, CompiledBundle, der_digest, spki_digest
from data_plane.validation.policy import ClientPolicy, RevocationCheck, ValidationMode, san_matches

# ---------------------------------------------------------------- error strings (GCP's, then ours)

NOT_PROVIDED = "client_cert_not_provided"
CHAIN_EXCEEDED_LIMIT = "client_cert_chain_exceeded_limit"
UNSUPPORTED_KEY_ALGORITHM = "client_cert_unsupported_key_algorithm"
INVALID_RSA_KEY_SIZE = "client_cert_invalid_rsa_key_size"
UNSUPPORTED_ELLIPTIC_CURVE_KEY = "client_cert_unsupported_elliptic_curve_key"
PKI_TOO_LARGE = "client_cert_pki_too_large"
MAX_NAME_CONSTRAINTS_EXCEEDED = "client_cert_chain_max_name_constraints_exceeded"
VALIDATION_NOT_PERFORMED = "client_cert_validation_not_performed"
CHAIN_INVALID_EKU = "client_cert_chain_invalid_eku"
SEARCH_LIMIT_EXCEEDED = "client_cert_validation_search_limit_exceeded"
VALIDATION_TIMED_OUT = "client_cert_validation_timed_out"
VALIDATION_FAILED = "client_cert_validation_failed"
# mtlsgate extensions
REVOKED = "client_cert_revoked"
CRL_STALE = "client_cert_crl_stale"
SAN_MISMATCH = "client_cert_san_mismatch"

# GCP's limits (SPEC §4 step 3 and 6).
MAX_INTERMEDIATES = 10
MAX_SAME_SUBJECT_AND_KEY = 10
MAX_NAME_CONSTRAINTS = 10
MAX_CANDIDATES = 100
MAX_CERTIFICATE_BYTES = 64 * 1024
DEFAULT_TIME_BUDGET = 0.25  # CPU seconds; a normal validation takes well under 1 ms
CACHE_ENTRIES = 4096

_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)

# GCP does not require a SAN on the client certificate, and we check EKUs ourselves so that a wrong
# one gets its own error string; everything else stays at cryptography's webpki defaults, plus the
# RFC 5280 rules those leave out (critical nameConstraints/policyConstraints, AKI and SKI on CAs).
_C = verification.Criticality


def _san_rules(_policy: verification.Policy, cert: x509.Certificate, san: x509.ExtensionType | None) -> None:
    """RFC 5280 §4.2.1.6: with an empty subject the SAN carries the identity and must be critical;
    with a subject it must not be (CABF)."""
    if san is None:
        return
    critical = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    if not list(cert.subject) and not critical:
        raise ValueError("subjectAltName must be critical when the subject is empty")
    if list(cert.subject) and critical:
        raise ValueError("subjectAltName must not be critical when the subject is not empty")


def _ca_aki_rule(
    _policy: verification.Policy, cert: x509.Certificate, aki: x509.ExtensionType | None
) -> None:
    if aki is None and cert.issuer != cert.subject:
        raise ValueError("authorityKeyIdentifier is required on a CA certificate that is not self-issued")


def _ca_ski_rule(
    _policy: verification.Policy, cert: x509.Certificate, ski: x509.ExtensionType | None
) -> None:
    if ski is None:
        raise ValueError("subjectKeyIdentifier is required on CA certificates (RFC 5280 4.2.1.2)")


def _ca_key_usage_rule(
    _policy: verification.Policy, cert: x509.Certificate, usage: x509.ExtensionType | None
) -> None:
    # RFC 5280 §4.2.1.3 / §6.1.4(n): no keyUsage = every usage; with one, keyCertSign must be set.
    if isinstance(usage, x509.KeyUsage) and not usage.key_cert_sign:
        raise ValueError("keyUsage of a CA certificate must include keyCertSign")


_EE_POLICY = (
    verification.ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, _C.AGNOSTIC, _san_rules)
    .may_be_present(x509.ExtendedKeyUsage, _C.NON_CRITICAL, None)
)
_CA_POLICY = (
    verification.ExtensionPolicy.webpki_defaults_ca()
    .may_be_present(x509.ExtendedKeyUsage, _C.NON_CRITICAL, None)
    .may_be_present(x509.AuthorityKeyIdentifier, _C.NON_CRITICAL, _ca_aki_rule)
    .may_be_present(x509.SubjectKeyIdentifier, _C.NON_CRITICAL, _ca_ski_rule)
    .may_be_present(x509.NameConstraints, _C.CRITICAL, None)
    .may_be_present(x509.PolicyConstraints, _C.CRITICAL, None)
    .may_be_present(x509.KeyUsage, _C.AGNOSTIC, _ca_key_usage_rule)
)


@dataclass(frozen=True)
class Verdict:
    """The outcome for one presented chain. `error` is "" when the certificate is valid under the
    policy; `chain_verified` is true only then. `accepted`: may this client's requests reach the
    backend under the policy's mode. `leaf` is the DER the client sent (for headers, when present);
    `chain` the verified path's intermediates, leaf and trust anchor excluded (empty unless verified)."""

    present: bool
    chain_verified: bool
    error: str
    reason: str
    accepted: bool
    leaf: bytes | None = field(default=None, repr=False)
    chain: tuple[bytes, ...] = field(default=(), repr=False)
    detail: str = ""  # one human-readable line for logs; never contains key material

    @property
    def valid(self) -> bool:
        return self.present and self.chain_verified and not self.error


class _Failure(Exception):
    def __init__(self, error: str, reason: str, detail: str = "") -> None:
        super().__init__(error)
        self.error, self.reason, self.detail = error, reason, detail


def _accepted(policy: ClientPolicy, error: str) -> bool:
    if not policy.mtls or policy.mode is ValidationMode.ALLOW_INVALID_OR_MISSING_CLIENT_CERT:
        return True
    return not error


def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


# ---------------------------------------------------------------- step 3: GCP's limits and key rules


def _check_key(cert: x509.Certificate, role: str) -> None:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise _Failure(
            UNSUPPORTED_KEY_ALGORITHM, "unsupported_key_algorithm", f"{role}: unreadable public key"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 4096 or key.key_size % 8:
            raise _Failure(
                INVALID_RSA_KEY_SIZE, "rsa_key_size", f"{role}: RSA-{key.key_size} (2048..4096, whole bytes)"
            )
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise _Failure(
                UNSUPPORTED_ELLIPTIC_CURVE_KEY, "unsupported_curve", f"{role}: curve {key.curve.name}"
            )
    else:
        raise _Failure(
            UNSUPPORTED_KEY_ALGORITHM, "unsupported_key_algorithm", f"{role}: {type(key).__name__}"
        )


def _name_constraint_count(cert: x509.Certificate) -> int:
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return 0
    except MALFORMED:  # malformed: the verifier rejects it with its own message
        return 0
    return len(nc.permitted_subtrees or ()) + len(nc.excluded_subtrees or ())


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER element at `at` (definite lengths only, as DER is)."""
    tag, first = der[at], der[at + 1]
    at += 2
    if first < 0x80:
        return tag, at, at + first
    size = first & 0x7F
    if not 1 <= size <= 4:
        raise ValueError("unsupported DER length")
    length = int.from_bytes(der[at:at + size], "big")
    return tag, at + size, at + size + length


def _signature_problem(der: bytes) -> str:
    """What is wrong with how a certificate carries its signature ("" when nothing). RFC 5280 §4.1.1.2:
    the outer signatureAlgorithm must equal tbsCertificate.signature. §4.1.1.3: every signature algorithm
    we accept gives an octet-aligned value, so unused bits other than 0 mean a mangled certificate:
    OpenSSL verifies the bytes regardless, which would let one certificate be re-encoded into others with
    other fingerprints (the inventory and shadow reports count by fingerprint)."""
    try:
        _, at, _ = _tlv(der, 0)  # Certificate SEQUENCE
        _, tbs, tbs_end = _tlv(der, at)
        _, _, at = _tlv(der, at)  # past tbsCertificate
        outer_start = at
        _, _, at = _tlv(der, at)  # past signatureAlgorithm
        outer = der[outer_start:at]
        tag, start, end = _tlv(der, at)
        inner = tbs
        if der[inner] == 0xA0:  # [0] version
            inner = _tlv(der, inner)[2]
        inner = _tlv(der, inner)[2]  # past serialNumber
        inner_end = _tlv(der, inner)[2]
    except (IndexError, ValueError):
        return "cannot be read as DER"
    if inner_end > tbs_end or der[inner:inner_end] != outer:
        return "signatureAlgorithm differs from tbsCertificate.signature"
    if tag != 0x03 or start >= end or der[start] != 0:
        return "signatureValue is not octet-aligned (unused bits not 0)"
    return ""


def _parse_chain(chain: Sequence[bytes]) -> list[x509.Certificate]:
    certs = []
    for i, der in enumerate(chain):
        role = "leaf" if i == 0 else f"chain[{i}]"
        if len(der) > MAX_CERTIFICATE_BYTES:
            raise _Failure(VALIDATION_FAILED, "malformed_certificate", f"{role}: {len(der)} bytes")
        try:
            cert = x509.load_der_x509_certificate(der)
            # cryptography parses these lazily: force them now so a malformed field is reported here
            # rather than raising from deep inside path building.
            cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
            cert.extensions  # noqa: B018
        except MALFORMED as exc:
            raise _Failure(VALIDATION_FAILED, "malformed_certificate", f"{role}: {exc}") from None
        problem = _signature_problem(der)
        if problem:
            raise _Failure(VALIDATION_FAILED, "malformed_certificate", f"{role}: {problem}")
        certs.append(cert)
    return certs


# ---------------------------------------------------------------- step 6 helpers


def _gather_candidates(
    leaf: x509.Certificate,
    sent: Sequence[x509.Certificate],
    bundle: CompiledBundle,
    max_depth: int,
    deadline: float,
) -> list[x509.Certificate]:
    """Intermediates (sent or configured) reachable from the leaf by issuer name within the depth limit.
    Counting what is examined implements GCP's candidate limit and keeps the verifier's input small."""
    sent_by_subject: dict[bytes, list[x509.Certificate]] = {}
    for cert in sent:
        sent_by_subject.setdefault(cert.subject.public_bytes(), []).append(cert)
    chosen: dict[x509.Certificate, None] = {}  # Certificate hashes and compares by its DER
    examined = 0
    frontier = [leaf]
    for _level in range(max_depth):
        issuers = {c.issuer.public_bytes() for c in frontier}
        frontier = []
        for issuer in issuers:
            for cand in (*sent_by_subject.get(issuer, ()), *bundle.intermediates_by_subject.get(issuer, ())):
                examined += 1
                if examined > MAX_CANDIDATES:
                    raise _Failure(
                        SEARCH_LIMIT_EXCEEDED, "too_many_candidates", f"more than {MAX_CANDIDATES} candidates"
                    )
                if cand not in chosen:
                    chosen[cand] = None
                    frontier.append(cand)
        if not frontier:
            break
        if time.thread_time() > deadline:
            raise _Failure(VALIDATION_TIMED_OUT, "time_budget", "candidate search")
    candidates = list(chosen)
    _check_candidate_limits(candidates)
    return candidates


def _check_candidate_limits(candidates: Sequence[x509.Certificate]) -> None:
    by_subject: dict[bytes, list[x509.Certificate]] = {}
    for cert in candidates:
        by_subject.setdefault(cert.subject.public_bytes(), []).append(cert)
        if _name_constraint_count(cert) > MAX_NAME_CONSTRAINTS:
            raise _Failure(
                MAX_NAME_CONSTRAINTS_EXCEEDED,
                "name_constraints",
                f"{cert.subject.rfc4514_string()}: over {MAX_NAME_CONSTRAINTS}",
            )
    for group in by_subject.values():
        if len(group) > MAX_SAME_SUBJECT_AND_KEY:
            counts: dict[bytes, int] = {}
            for cert in group:
                key = spki_digest(cert)
                counts[key] = counts.get(key, 0) + 1
                if counts[key] > MAX_SAME_SUBJECT_AND_KEY:
                    raise _Failure(PKI_TOO_LARGE, "same_subject_and_key", cert.subject.rfc4514_string())


def _has_eku(cert: x509.Certificate, wanted: x509.ObjectIdentifier, *, leaf: bool) -> bool:
    """The leaf must name `wanted` itself; an issuer without EKU allows all, with one it must name
    `wanted` or anyExtendedKeyUsage."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return not leaf
    return wanted in eku or (not leaf and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku)


def _check_ekus(path: Sequence[x509.Certificate], wanted: x509.ObjectIdentifier) -> None:
    """GCP: the leaf must carry clientAuth; an issuer that restricts its EKUs must allow clientAuth."""
    try:
        if not _has_eku(path[0], wanted, leaf=True):
            raise _Failure(CHAIN_INVALID_EKU, "leaf_eku", f"leaf has no {wanted._name} extended key usage")
        for depth, issuer in enumerate(path[1:], start=1):
            if not _has_eku(issuer, wanted, leaf=False):
                raise _Failure(
                    CHAIN_INVALID_EKU,
                    "issuer_eku",
                    f"chain[{depth}] {issuer.subject.rfc4514_string()}: extended key usage without {wanted._name}",
                )
    except MALFORMED as exc:  # a malformed EKU extension
        raise _Failure(CHAIN_INVALID_EKU, "malformed_eku", str(exc)) from None


def _check_path(path: Sequence[x509.Certificate]) -> None:
    """What the verifier leaves out: positive serials (RFC 5280 §4.1.2.2) and GCP's name-constraint
    limit, which we apply to every CA of the path, anchor included (a huge constraint set on a root is
    the same quadratic cost)."""
    for depth, cert in enumerate(path):
        if depth < len(path) - 1 and cert.serial_number <= 0:  # the anchor is trusted as configured
            raise _Failure(
                VALIDATION_FAILED, "invalid_serial", f"chain[{depth}]: serial number is not positive"
            )
        if depth and _name_constraint_count(cert) > MAX_NAME_CONSTRAINTS:
            raise _Failure(
                MAX_NAME_CONSTRAINTS_EXCEEDED,
                "name_constraints",
                f"chain[{depth}] {cert.subject.rfc4514_string()}: over {MAX_NAME_CONSTRAINTS}",
            )


def _signature_hash_is_weak(cert: x509.Certificate) -> bool:
    try:
        return isinstance(cert.signature_hash_algorithm, _WEAK_HASHES)
    except UnsupportedAlgorithm:
        return False


def _diagnose(
    leaf: x509.Certificate,
    candidates: Sequence[x509.Certificate],
    bundle: CompiledBundle,
    now: datetime,
    max_depth: int,
    message: str,
) -> _Failure:
    """Name the most specific reason the verifier refused: walk the most plausible path by issuer name
    and report the first broken link; fall back to the verifier's own message."""
    if "signature check limit" in message:
        return _Failure(SEARCH_LIMIT_EXCEEDED, "too_many_candidates", message)
    pool = list(bundle.anchors) + list(candidates)
    anchors = {a.fingerprint(hashes.SHA256()) for a in bundle.anchors}
    cert = leaf
    depth = 0
    for depth in range(MAX_INTERMEDIATES + 2):
        role = "leaf" if depth == 0 else f"chain[{depth}]"
        subject = cert.subject.rfc4514_string()
        if now > cert.not_valid_after_utc:
            return _Failure(
                VALIDATION_FAILED,
                "expired",
                f"{role} {subject}: expired {cert.not_valid_after_utc.isoformat()}",
            )
        if now < cert.not_valid_before_utc:
            return _Failure(
                VALIDATION_FAILED,
                "not_yet_valid",
                f"{role} {subject}: valid from {cert.not_valid_before_utc.isoformat()}",
            )
        if cert.fingerprint(hashes.SHA256()) in anchors:
            break
        if _signature_hash_is_weak(cert):
            return _Failure(
                VALIDATION_FAILED,
                "weak_hash",
                f"{role} {subject}: signed with {getattr(cert.signature_hash_algorithm, 'name', '?')}",
            )
        issuers = [c for c in pool if c.subject == cert.issuer and c is not cert]
        if not issuers:
            return _Failure(
                VALIDATION_FAILED,
                "unknown_issuer",
                f"{role} {subject}: issuer {cert.issuer.rfc4514_string()} not found",
            )
        signer = None
        for issuer in sorted(issuers, key=lambda c: c.fingerprint(hashes.SHA256()) not in anchors):
            try:
                cert.verify_directly_issued_by(issuer)
            except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
                continue
            signer = issuer
            break
        if signer is None:
            return _Failure(
                VALIDATION_FAILED, "bad_signature", f"{role} {subject}: signature does not verify"
            )
        cert = signer
    else:
        return _Failure(VALIDATION_FAILED, "unknown_issuer", "no path to a trust anchor")
    if "exceeds max depth" in message or depth > max_depth:
        return _Failure(
            SEARCH_LIMIT_EXCEEDED, "max_depth", f"{depth} certificates above the anchor, limit {max_depth}"
        )
    return _Failure(VALIDATION_FAILED, _reason_from_message(message), message)


def _reason_from_message(message: str) -> str:
    lowered = message.lower()
    for needle, reason in (
        ("must not be asserted in an ee", "leaf_is_ca"),
        ("ca must be asserted", "issuer_not_ca"),
        ("name constraint", "name_constraints"),
        ("path length", "path_length"),
        ("pathlen", "path_length"),
        ("keyusage", "key_usage"),
        ("key usage", "key_usage"),
        ("signature check limit", "too_many_candidates"),
        ("signature", "bad_signature"),
        ("no interior errors", "unknown_issuer"),
    ):
        if needle in lowered:
            return reason
    return "invalid"


def _verify_path(
    leaf: x509.Certificate,
    candidates: list[x509.Certificate],
    bundle: CompiledBundle,
    policy: ClientPolicy,
    now: datetime,
) -> list[x509.Certificate]:
    if bundle.store is None:
        raise _Failure(VALIDATION_FAILED, "unknown_issuer", "the trust config has no trust anchors")
    verifier = (
        verification.PolicyBuilder()
        .store(bundle.store)
        .time(now)
        .max_chain_depth(policy.max_depth - 1)  # cryptography counts intermediates; we count leaf too
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        return list(verifier.verify(leaf, candidates).chain)
    except verification.VerificationError as exc:
        raise _diagnose(leaf, candidates, bundle, now, policy.max_depth, str(exc)) from None


def _check_revocation(
    path: Sequence[x509.Certificate], bundle: CompiledBundle, policy: ClientPolicy, now: datetime
) -> None:
    if policy.revocation is RevocationCheck.OFF:
        return
    links = 1 if policy.revocation is RevocationCheck.LEAF else len(path) - 1
    for depth in range(min(links, len(path) - 1)):
        cert, issuer = path[depth], path[depth + 1]
        crls = bundle.crls_for(issuer)
        if not crls:
            continue
        role = "leaf" if depth == 0 else f"chain[{depth}]"
        serial = cert.serial_number
        for crl in crls:
            if serial in crl.revoked:
                raise _Failure(
                    REVOKED,
                    "revoked" if depth == 0 else "issuer_revoked",
                    f"{role} serial {serial:x} ({crl.where})",
                )
        if policy.require_fresh_crl and crls[0].is_stale(now):
            raise _Failure(
                CRL_STALE, "crl_stale", f"{crls[0].where}: nextUpdate {crls[0].next_update} has passed"
            )


# ---------------------------------------------------------------- verdict cache


def _chain_key(chain: Sequence[bytes]) -> bytes:
    h = hashlib.sha256()
    for der in chain:
        h.update(len(der).to_bytes(4, "big"))
        h.update(der)
    return h.digest()


def _window(
    path: Sequence[x509.Certificate], bundle: CompiledBundle, policy: ClientPolicy
) -> tuple[datetime, datetime]:
    """The time interval over which a successful verdict for this path stays the same: every
    certificate of the path valid and, with requireFreshCrl, every consulted CRL fresh."""
    start = max(c.not_valid_before_utc for c in path)
    end = min(c.not_valid_after_utc for c in path)
    if policy.require_fresh_crl and policy.revocation is not RevocationCheck.OFF:
        links = 1 if policy.revocation is RevocationCheck.LEAF else len(path) - 1
        for depth in range(min(links, len(path) - 1)):
            crls = bundle.crls_for(path[depth + 1])
            if crls and crls[0].next_update is not None:
                end = min(end, crls[0].next_update)
    return start, end


# ---------------------------------------------------------------- validate


def validate(
    chain: Sequence[bytes],
    bundle: CompiledBundle | None,
    policy: ClientPolicy,
    now: datetime,
    *,
    time_budget: float = DEFAULT_TIME_BUDGET,
    leaf_eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> Verdict:
    """Decide SPEC §4 for `chain` (DER certificates, leaf first, as the client sent them).

    `leaf_eku` exists for conformance vectors written for server certificates; the product always
    uses clientAuth.
    Pure: the only state touched is the bundle's memo of successful verdicts, which is keyed by
    everything the verdict depends on and only answers inside the interval where it holds."""
    now = _utc(now)
    if not chain:
        return Verdict(False, False, NOT_PROVIDED, "no_certificate", _accepted(policy, NOT_PROVIDED))
    leaf_der = bytes(chain[0])
    try:
        return _validate_presented(chain, leaf_der, bundle, policy, now, time_budget, leaf_eku)
    except _Failure as failure:
        return Verdict(
            True,
            False,
            failure.error,
            failure.reason,
            _accepted(policy, failure.error),
            leaf_der,
            detail=failure.detail,
        )
    except MALFORMED as exc:
        # A malformed field cryptography only parses on use: never let client input crash a worker.
        return Verdict(
            True,
            False,
            VALIDATION_FAILED,
            "malformed_certificate",
            _accepted(policy, VALIDATION_FAILED),
            leaf_der,
            detail=f"malformed certificate: {exc}",
        )


def _validate_presented(
    chain: Sequence[bytes],
    leaf_der: bytes,
    bundle: CompiledBundle | None,
    policy: ClientPolicy,
    now: datetime,
    time_budget: float,
    leaf_eku: x509.ObjectIdentifier,
) -> Verdict:
    # CPU time of this thread, not wall time: a worker descheduled on a busy machine has not spent its
    # budget, while a pathological chain burns exactly this clock.
    deadline = time.thread_time() + time_budget
    if len(chain) - 1 > MAX_INTERMEDIATES:
        raise _Failure(CHAIN_EXCEEDED_LIMIT, "too_many_intermediates", f"{len(chain) - 1} intermediates sent")
    cache_key = None
    if bundle is not None:
        cache_key = (_chain_key(chain), policy.cache_key, leaf_eku)
        hit = bundle.cache.get(cache_key)
        if hit is not None and hit[1] <= now <= hit[2]:
            return hit[0]  # type: ignore[no-any-return]
    certs = _parse_chain(chain)
    leaf, sent = certs[0], certs[1:]
    _check_key(leaf, "leaf")
    for i, cert in enumerate(sent, start=1):
        _check_key(cert, f"chain[{i}]")
        if _name_constraint_count(cert) > MAX_NAME_CONSTRAINTS:
            raise _Failure(
                MAX_NAME_CONSTRAINTS_EXCEEDED, "name_constraints", f"chain[{i}]: over {MAX_NAME_CONSTRAINTS}"
            )

    # Step 4: an allowlisted leaf is valid as it is (expired or self-signed included).
    if bundle is not None and der_digest(leaf_der) in bundle.allowlist:
        _check_san(leaf, policy)
        return Verdict(True, True, "", "allowlisted", True, leaf_der)
    if bundle is None:
        raise _Failure(VALIDATION_NOT_PERFORMED, "no_trust_config", "the policy names no trust config")

    candidates = _gather_candidates(leaf, sent, bundle, policy.max_depth, deadline)
    path = _verify_path(leaf, candidates, bundle, policy, now)
    if time.thread_time() > deadline:
        raise _Failure(VALIDATION_TIMED_OUT, "time_budget", f"over {time_budget:.3f} s of CPU")
    _check_path(path)
    _check_ekus(path, leaf_eku)
    if len(path) - 1 > policy.max_depth:  # the verifier enforces this too; kept as a guard
        raise _Failure(SEARCH_LIMIT_EXCEEDED, "max_depth", f"{len(path) - 1} certificates above the anchor")
    _check_revocation(path, bundle, policy, now)
    _check_san(leaf, policy)

    verdict = Verdict(
        True, True, "", "", True, leaf_der, tuple(c.public_bytes(Encoding.DER) for c in path[1:-1])
    )
    if cache_key is not None:
        if len(bundle.cache) >= CACHE_ENTRIES:
            bundle.cache.clear()  # crude but bounded; the working set is normally far smaller
        start, end = _window(path, bundle, policy)
        bundle.cache[cache_key] = (verdict, start, end)
    return verdict


def _check_san(leaf: x509.Certificate, policy: ClientPolicy) -> None:
    if not san_matches(policy, leaf):
        raise _Failure(SAN_MISMATCH, "san_mismatch", "no subject alternative name matches the policy")


# ---------------------------------------------------------------- rejection on the wire


class TlsAlert(enum.IntEnum):
    """TLS alert descriptions (RFC 8446 §6)."""

    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    CERTIFICATE_REQUIRED = 116


_ALERT_BY_ERROR = {
    UNSUPPORTED_KEY_ALGORITHM: TlsAlert.UNSUPPORTED_CERTIFICATE,
    INVALID_RSA_KEY_SIZE: TlsAlert.UNSUPPORTED_CERTIFICATE,
    UNSUPPORTED_ELLIPTIC_CURVE_KEY: TlsAlert.UNSUPPORTED_CERTIFICATE,
    CHAIN_INVALID_EKU: TlsAlert.UNSUPPORTED_CERTIFICATE,
    VALIDATION_NOT_PERFORMED: TlsAlert.UNKNOWN_CA,
    REVOKED: TlsAlert.CERTIFICATE_REVOKED,
    SAN_MISMATCH: TlsAlert.ACCESS_DENIED,
}
_ALERT_BY_REASON = {
    "expired": TlsAlert.CERTIFICATE_EXPIRED,
    "not_yet_valid": TlsAlert.CERTIFICATE_EXPIRED,  # OpenSSL sends certificate_expired for both
    "unknown_issuer": TlsAlert.UNKNOWN_CA,
}


def tls_alert(verdict: Verdict, *, tls13: bool = True) -> TlsAlert | None:
    """The alert a REJECT_INVALID / rejectAt TLS listener sends for this verdict (None: valid)."""
    if not verdict.present:
        return TlsAlert.CERTIFICATE_REQUIRED if tls13 else TlsAlert.HANDSHAKE_FAILURE
    if verdict.valid:
        return None
    return (
        _ALERT_BY_ERROR.get(verdict.error) or _ALERT_BY_REASON.get(verdict.reason) or TlsAlert.BAD_CERTIFICATE
    )


def http_status(verdict: Verdict) -> int:
    """nginx's codes for rejectAt HTTP: 496 no certificate, 495 invalid certificate (200 when valid)."""
    if not verdict.present:
        return 496
    return 200 if verdict.valid else 495
