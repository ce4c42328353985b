"""ServerTlsPolicy → ClientPolicy: the mode and extension options, with SAN patterns compiled to RE2.

RE2 (google-re2) matches in time linear in the subject's length whatever the pattern, so a hostile
pattern or SAN cannot stall a worker; patterns must match the whole SAN (full match).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import re2
from cryptography import x509
from mtlsgate.v1 import resources_pb2

from data_plane.validation.bundle import MALFORMED

GCP_MAX_DEPTH = 10
MAX_SAN_MATCHERS = 64
MAX_PATTERN_CHARS = 1024
_RE2_MAX_MEM = 1 << 20  # bytes per compiled pattern; bounds what a huge pattern can cost

# otherName type-id of a Microsoft User Principal Name.
UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

_MTLS = resources_pb2.MTLSPolicy


class ValidationMode(enum.Enum):
    ALLOW_INVALID_OR_MISSING_CLIENT_CERT = "ALLOW_INVALID_OR_MISSING_CLIENT_CERT"
    REJECT_INVALID = "REJECT_INVALID"


class RevocationCheck(enum.Enum):
    LEAF = "LEAF"
    CHAIN = "CHAIN"
    OFF = "OFF"


class RejectAt(enum.Enum):
    TLS = "TLS"
    HTTP = "HTTP"


SAN_KINDS = ("dns", "email", "ip_address", "uri", "user_principal_name")
_SAN_FIELD = {
    "dns": "dns",
    "email": "email",
    "ip_address": "ipAddress",
    "uri": "uri",
    "user_principal_name": "userPrincipalName",
}


@dataclass(frozen=True)
class SanMatcher:
    kind: str  # one of SAN_KINDS
    pattern: str
    regex: Any = field(compare=False, repr=False)  # re2 compiled pattern

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None


@dataclass(frozen=True)
class ClientPolicy:
    """What validation needs from a ServerTlsPolicy. `mtls` False = plain TLS, no client certificate."""

    mtls: bool = False
    mode: ValidationMode = ValidationMode.ALLOW_INVALID_OR_MISSING_CLIENT_CERT
    trust_config: str = ""
    max_depth: int = GCP_MAX_DEPTH
    san_matchers: tuple[SanMatcher, ...] = ()
    revocation: RevocationCheck = RevocationCheck.LEAF
    require_fresh_crl: bool = False
    reject_at: RejectAt = RejectAt.TLS
    revalidate_on_update: bool = False
    name: str = ""

    @property
    def cache_key(self) -> tuple:
        """Everything a verdict depends on, as plain values (for verdict caching)."""
        return (
            self.mode,
            self.max_depth,
            tuple((m.kind, m.pattern) for m in self.san_matchers),
            self.revocation,
            self.require_fresh_crl,
        )


PLAIN_TLS = ClientPolicy()


def _compile_pattern(pattern: str, where: str) -> Any:
    if not pattern:
        raise ValueError(f"{where}: empty pattern")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"{where}: pattern of {len(pattern)} characters, more than the limit of {MAX_PATTERN_CHARS}"
        )
    options = re2.Options()
    options.log_errors = False
    options.max_mem = _RE2_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = (
            exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        )
        raise ValueError(f"{where}: invalid RE2 pattern {pattern!r}: {detail}") from None


def compile_policy(p: resources_pb2.ServerTlsPolicy | None) -> ClientPolicy:
    """Compile a ServerTlsPolicy (None or no `mtlsPolicy` = plain TLS). Raises ValueError naming the
    field for an invalid value (`mtlsPolicy.matchSubjectAltNames[0].dns: invalid RE2 pattern …`)."""
    if p is None or not p.HasField("mtls_policy"):
        return ClientPolicy(name=p.name if p is not None else "")
    m = p.mtls_policy
    if m.client_validation_mode == _MTLS.ALLOW_INVALID_OR_MISSING_CLIENT_CERT:
        mode = ValidationMode.ALLOW_INVALID_OR_MISSING_CLIENT_CERT
    elif m.client_validation_mode == _MTLS.REJECT_INVALID:
        mode = ValidationMode.REJECT_INVALID
    else:
        raise ValueError(
            "mtlsPolicy.clientValidationMode: required (ALLOW_INVALID_OR_MISSING_CLIENT_CERT or REJECT_INVALID)"
        )
    if m.max_verify_depth < 0 or m.max_verify_depth > GCP_MAX_DEPTH:
        raise ValueError(
            f"mtlsPolicy.maxVerifyDepth: {m.max_verify_depth} is outside 0..{GCP_MAX_DEPTH} (0 = {GCP_MAX_DEPTH})"
        )
    if len(m.match_subject_alt_names) > MAX_SAN_MATCHERS:
        raise ValueError(
            f"mtlsPolicy.matchSubjectAltNames: {len(m.match_subject_alt_names)} entries, "
            f"more than the limit of {MAX_SAN_MATCHERS}"
        )
    matchers = []
    for i, matcher in enumerate(m.match_subject_alt_names):
        kind = matcher.WhichOneof("type")
        if kind is None:
            raise ValueError(
                f"mtlsPolicy.matchSubjectAltNames[{i}]: set one of dns, email, ipAddress, uri, userPrincipalName"
            )
        pattern = getattr(matcher, kind)
        where = f"mtlsPolicy.matchSubjectAltNames[{i}].{_SAN_FIELD[kind]}"
        matchers.append(SanMatcher(kind, pattern, _compile_pattern(pattern, where)))
    revocation = {
        _MTLS.REVOCATION_CHECK_UNSPECIFIED: RevocationCheck.LEAF,
        _MTLS.LEAF: RevocationCheck.LEAF,
        _MTLS.CHAIN: RevocationCheck.CHAIN,
        _MTLS.OFF: RevocationCheck.OFF,
    }.get(m.revocation_check)
    if revocation is None:
        raise ValueError(f"mtlsPolicy.revocationCheck: unknown value {m.revocation_check}")
    reject_at = {
        _MTLS.REJECT_AT_UNSPECIFIED: RejectAt.TLS,
        _MTLS.TLS: RejectAt.TLS,
        _MTLS.HTTP: RejectAt.HTTP,
    }.get(m.reject_at)
    if reject_at is None:
        raise ValueError(f"mtlsPolicy.rejectAt: unknown value {m.reject_at}")
    return ClientPolicy(
        mtls=True,
        mode=mode,
        trust_config=m.client_validation_trust_config,
        max_depth=m.max_verify_depth or GCP_MAX_DEPTH,
        san_matchers=tuple(matchers),
        revocation=revocation,
        require_fresh_crl=m.require_fresh_crl,
        reject_at=reject_at,
        revalidate_on_update=m.revalidate_on_update,
        name=p.name,
    )


# ---------------------------------------------------------------- SAN extraction and matching


def _decode_utf8_string(der: bytes) -> str | None:
    """The value of a DER UTF8String (tag 0x0c), as UPN otherNames carry; None if it is not one."""
    if len(der) < 2 or der[0] != 0x0C:
        return None
    length, offset = der[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 2 or len(der) < 2 + count:
            return None
        length, offset = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
    if offset + length != len(der):
        return None
    try:
        return der[offset:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def subject_alt_names(cert: x509.Certificate) -> Mapping[str, list[str]]:
    """The leaf's SANs by matcher kind. A malformed SAN extension yields nothing (so nothing matches)."""
    out: dict[str, list[str]] = {kind: [] for kind in SAN_KINDS}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, *MALFORMED):
        return out
    for name in san:
        if isinstance(name, x509.DNSName):
            out["dns"].append(name.value)
        elif isinstance(name, x509.RFC822Name):
            out["email"].append(name.value)
        elif isinstance(name, x509.UniformResourceIdentifier):
            out["uri"].append(name.value)
        elif isinstance(name, x509.IPAddress):
            if isinstance(name.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                out["ip_address"].append(str(name.value))
        elif isinstance(name, x509.OtherName) and name.type_id == UPN_OID:
            upn = _decode_utf8_string(name.value)
            if upn is not None:
                out["user_principal_name"].append(upn)
    return out


def san_matches(policy: ClientPolicy, cert: x509.Certificate) -> bool:
    """True when the policy has no SAN matchers, or any matcher fully matches a SAN of its kind."""
    if not policy.san_matchers:
        return True
    names = subject_alt_names(cert)
    return any(matcher.matches(value) for matcher in policy.san_matchers for value in names[matcher.kind])
