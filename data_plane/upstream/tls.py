"""Upstream TLS, the pure part (SPEC §15): which names a backend's certificate must carry, and the verdict on
the chain a backend presented — the validation engine of SPEC §4 (path building, limits, CRLs) with the
serverAuth EKU, then the name check of `tlsSettings`. No sockets; the worker's TLS client calls `judge`
from its verify callback (data_plane/workers/upstream_tls.py)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from data_plane.validation import engine
from data_plane.validation.bundle import MALFORMED, CompiledBundle
from data_plane.validation.policy import ClientPolicy, RevocationCheck, ValidationMode

# A backend's chain is judged as strictly as a REJECT_INVALID client chain, with every link's CRL consulted.
BACKEND_POLICY = ClientPolicy(mtls=True, mode=ValidationMode.REJECT_INVALID, revocation=RevocationCheck.CHAIN,
                              name="backend")
SAN_MISMATCH = "backend_cert_san_mismatch"


@dataclass(frozen=True)
class BackendVerdict:
    """`error` "" = the backend may be sent requests. Errors are the engine's strings with `client_cert_`
    read as `backend_cert_` (e.g. `backend_cert_revoked`); `reason` and `detail` as the engine's."""

    error: str
    reason: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def describe(self) -> str:
        """One line for the log and the 502 body (never key material)."""
        if self.ok:
            return "verified"
        return f"backend certificate refused: {self.error}" + (f" ({self.reason}: {self.detail})"
                                                               if self.detail else f" ({self.reason})")


def expected_names(sni: str, subject_alt_names: Sequence[str], endpoint_host: str) -> tuple[str, ...]:
    """The names one of which the backend's certificate must carry: `subjectAltNames` if set, else the SNI,
    else the endpoint's own host (a DNS name or an IP address). Never empty: a backend certificate is always
    checked against a name (secure by default; GCP leaves it unchecked without `tlsSettings`)."""
    if subject_alt_names:
        return tuple(n.lower().rstrip(".") for n in subject_alt_names)
    if sni:
        return (sni.lower().rstrip("."),)
    return (endpoint_host.lower().strip("[]").rstrip("."),)


def server_name(sni: str, endpoint_host: str) -> str:
    """The SNI to send: `tlsSettings.sni`, else the endpoint's host when it is a DNS name (never an IP,
    RFC 6066 §3)."""
    if sni:
        return sni
    host = endpoint_host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return ""


def _dns_matches(wanted: str, presented: str) -> bool:
    """RFC 6125 §6.4: exact (case-insensitive), or a presented `*.suffix` covering exactly one more label.
    A wanted `*.suffix` (allowed in subjectAltNames) matches only the same wildcard."""
    presented = presented.lower().rstrip(".")
    if wanted == presented:
        return True
    if presented.startswith("*.") and not wanted.startswith("*."):
        label, dot, rest = wanted.partition(".")
        return bool(label) and bool(dot) and rest == presented[2:]
    return False


def names_match(cert: x509.Certificate, wanted: Sequence[str]) -> bool:
    """Does the certificate carry one of `wanted` as a DNS or IP address SAN? (The subject CN is never used.)"""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, *MALFORMED):
        return False
    dns = san.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)
           if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))}
    for name in wanted:
        try:
            if str(ipaddress.ip_address(name)) in ips:
                return True
            continue
        except ValueError:
            pass
        if any(_dns_matches(name, presented) for presented in dns):
            return True
    return False


def judge(chain: Sequence[bytes], bundles: Sequence[CompiledBundle], wanted: Sequence[str],
          now: datetime) -> BackendVerdict:
    """The verdict on a backend's chain (DER, leaf first, as the backend sent it). `bundles`: the
    BackendAuthenticationConfig's TrustConfig and/or the public roots, in that order; a later one is only
    asked when an earlier one does not know the issuer (so a CRL's revocation is final)."""
    if not chain:
        return BackendVerdict("backend_cert_not_provided", "no_certificate")
    if not bundles:
        return BackendVerdict("backend_cert_validation_not_performed", "no_trust_config",
                              "neither a trustConfig nor PUBLIC_ROOTS")
    verdict: engine.Verdict | None = None
    for bundle in bundles:
        verdict = engine.validate(chain, bundle, BACKEND_POLICY, now, leaf_eku=ExtendedKeyUsageOID.SERVER_AUTH)
        if verdict.valid or verdict.reason != "unknown_issuer":
            break
    assert verdict is not None
    if not verdict.valid:
        return BackendVerdict(verdict.error.replace("client_cert_", "backend_cert_", 1), verdict.reason,
                              verdict.detail)
    try:
        leaf = x509.load_der_x509_certificate(bytes(chain[0]))
    except MALFORMED as exc:  # the engine parsed it already; kept so nothing here can raise
        return BackendVerdict("backend_cert_validation_failed", "malformed_certificate", str(exc))
    if not names_match(leaf, wanted):
        return BackendVerdict(SAN_MISMATCH, "san_mismatch",
                              f"no subject alternative name matches {', '.join(wanted)}")
    return BackendVerdict("")
