"""What the backend receives about the client certificate (SPEC §5): GCP's `{client_cert_*}` variables
with their exact formats and size limits, `Name:{variable}` templates, and Envoy-style
`x-forwarded-client-cert` for the XFCC modes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from data_plane.validation.bundle import MALFORMED
from data_plane.validation.engine import Verdict

MAX_CUSTOM_HEADERS = 16
MAX_HEADER_NAME = 128
MAX_TEMPLATE_CHARS = 1024

# GCP's size limits (bytes of the rendered value).
SERIAL_MAX_BYTES = 50  # of the serial number itself
SPIFFE_MAX = 2048
SANS_MAX = 512
DN_MAX = 512
LEAF_CHAIN_MAX = 16 * 1024

VARIABLES = (
    "client_cert_present",
    "client_cert_chain_verified",
    "client_cert_error",
    "client_cert_sha256_fingerprint",
    "client_cert_serial_number",
    "client_cert_spiffe_id",
    "client_cert_uri_sans",
    "client_cert_dnsname_sans",
    "client_cert_valid_not_before",
    "client_cert_valid_not_after",
    "client_cert_issuer_dn",
    "client_cert_subject_dn",
    "client_cert_leaf",
    "client_cert_chain",
)

DEFAULT_HEADER_ENTRIES = (
    "X-Client-Cert-Present:{client_cert_present}",
    "X-Client-Cert-Chain-Verified:{client_cert_chain_verified}",
    "X-Client-Cert-Error:{client_cert_error}",
    "X-Client-Cert-Hash:{client_cert_sha256_fingerprint}",
    "X-Client-Cert-Serial-Number:{client_cert_serial_number}",
    "X-Client-Cert-SPIFFE:{client_cert_spiffe_id}",
    "X-Client-Cert-URI-SANs:{client_cert_uri_sans}",
    "X-Client-Cert-DNSName-SANs:{client_cert_dnsname_sans}",
    "X-Client-Cert-Valid-Not-Before:{client_cert_valid_not_before}",
    "X-Client-Cert-Valid-Not-After:{client_cert_valid_not_after}",
    "X-Client-Cert-Issuer-Dn:{client_cert_issuer_dn}",
    "X-Client-Cert-Subject-Dn:{client_cert_subject_dn}",
    "X-Client-Cert-Leaf:{client_cert_leaf}",
    "X-Client-Cert-Chain:{client_cert_chain}",
)

XFCC_HEADER = "x-forwarded-client-cert"

# Headers a listener may not set: framing and hop-by-hop headers the proxy owns, and XFCC (which has
# its own option, forwardClientCertDetails).
_RESERVED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        XFCC_HEADER,
    }
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SPIFFE = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*")

# ---------------------------------------------------------------- the variables


@dataclass(frozen=True)
class CertificateFields:
    """Every variable's value for one presented certificate, plus the size-limit errors it produced."""

    values: Mapping[str, str]
    size_errors: tuple[str, ...]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sfv_bytes(der: bytes) -> str:
    """An RFC 8941 byte sequence, as RFC 9440 carries certificates."""
    return f":{_b64(der)}:"


def _limited(name: str, value: str, limit: int, errors: list[str]) -> str:
    if len(value.encode()) > limit:
        errors.append(f"{name}_exceeded_size_limit")
        return ""
    return value


def _spiffe_id(uris: Sequence[str]) -> str:
    spiffe = [u for u in uris if u.lower().startswith("spiffe://")]
    # A SPIFFE SVID carries exactly one SPIFFE ID; anything else is not a usable identity.
    if len(spiffe) != 1 or len(spiffe[0].encode()) > SPIFFE_MAX or not _SPIFFE.fullmatch(spiffe[0]):
        return ""
    if any(segment in (".", "..") for segment in spiffe[0][len("spiffe://") :].split("/")[1:]):
        return ""  # SPIFFE ID spec: no relative path segments
    return spiffe[0]


@functools.lru_cache(maxsize=1024)
def certificate_fields(leaf_der: bytes, chain: tuple[bytes, ...], verified: bool) -> CertificateFields:
    """The leaf-derived variables (everything but present / chain_verified / error). A leaf that does
    not parse yields empty fields (its verdict already says client_cert_validation_failed)."""
    try:
        return _certificate_fields(leaf_der, chain, verified)
    except MALFORMED:
        return CertificateFields({name: "" for name in VARIABLES[3:]}, ())


def _certificate_fields(leaf_der: bytes, chain: tuple[bytes, ...], verified: bool) -> CertificateFields:
    errors: list[str] = []
    values = {name: "" for name in VARIABLES[3:]}
    cert = x509.load_der_x509_certificate(leaf_der)
    values["client_cert_sha256_fingerprint"] = (
        base64.b64encode(hashlib.sha256(leaf_der).digest()).decode().rstrip("=")
    )
    serial = cert.serial_number
    if (serial.bit_length() + 8) // 8 > SERIAL_MAX_BYTES:
        errors.append("client_cert_serial_number_exceeded_size_limit")
    else:
        values["client_cert_serial_number"] = format(serial, "x")
    uris: list[str] = []
    dns: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, *MALFORMED):
        pass
    values["client_cert_spiffe_id"] = _spiffe_id(uris)
    values["client_cert_uri_sans"] = _limited(
        "client_cert_uri_sans", ",".join(_b64(u.encode()) for u in uris), SANS_MAX, errors
    )
    values["client_cert_dnsname_sans"] = _limited(
        "client_cert_dnsname_sans", ",".join(_b64(d.encode()) for d in dns), SANS_MAX, errors
    )
    values["client_cert_valid_not_before"] = cert.not_valid_before_utc.isoformat()
    values["client_cert_valid_not_after"] = cert.not_valid_after_utc.isoformat()
    values["client_cert_issuer_dn"] = _limited(
        "client_cert_issuer_dn", _b64(cert.issuer.public_bytes()), DN_MAX, errors
    )
    values["client_cert_subject_dn"] = _limited(
        "client_cert_subject_dn", _b64(cert.subject.public_bytes()), DN_MAX, errors
    )
    if verified:
        values["client_cert_leaf"] = _limited(
            "client_cert_leaf", _sfv_bytes(leaf_der), LEAF_CHAIN_MAX, errors
        )
        values["client_cert_chain"] = _limited(
            "client_cert_chain", ", ".join(_sfv_bytes(der) for der in chain), LEAF_CHAIN_MAX, errors
        )
    return CertificateFields(values, tuple(errors))


def variables(verdict: Verdict) -> dict[str, str]:
    """Every `{client_cert_*}` variable for this verdict."""
    fields = (
        certificate_fields(verdict.leaf, verdict.chain, verdict.chain_verified)
        if verdict.present and verdict.leaf is not None
        else CertificateFields({name: "" for name in VARIABLES[3:]}, ())
    )
    errors = ([verdict.error] if verdict.error else []) + list(fields.size_errors)
    out = {
        "client_cert_present": "true" if verdict.present else "false",
        "client_cert_chain_verified": "true" if verdict.chain_verified else "false",
        "client_cert_error": ",".join(errors),
    }
    out.update(fields.values)
    return out


# ---------------------------------------------------------------- templates


@dataclass(frozen=True)
class HeaderTemplate:
    name: str
    parts: tuple[tuple[bool, str], ...]  # (is_variable, literal text or variable name)

    def render(self, values: Mapping[str, str]) -> str:
        return "".join(values[text] if is_var else text for is_var, text in self.parts)


@dataclass(frozen=True)
class HeaderSet:
    """A listener's compiled header templates. `names` (lowercase) are what anti-spoofing strips from
    incoming requests before these are added."""

    templates: tuple[HeaderTemplate, ...]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name.lower() for t in self.templates)

    def render(self, verdict: Verdict) -> list[tuple[str, str]]:
        values = variables(verdict)
        return [(t.name, t.render(values)) for t in self.templates]


def _compile_template(entry: str, where: str) -> HeaderTemplate:
    name, sep, template = entry.partition(":")
    name = name.strip()
    if not sep:
        raise ValueError(f"{where}: expected Name:{{variable}}, got {entry!r}")
    if not name or len(name) > MAX_HEADER_NAME or not _TOKEN.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not a valid HTTP header name")
    if name.lower() in _RESERVED:
        raise ValueError(f"{where}: the proxy sets {name!r} itself; it cannot be a custom header")
    template = template.strip()
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(
            f"{where}: value template of {len(template)} characters (limit {MAX_TEMPLATE_CHARS})"
        )
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in template):
        raise ValueError(f"{where}: control characters are not allowed in a header value")
    parts: list[tuple[bool, str]] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(template):
        if match.start() > pos:
            parts.append((False, template[pos : match.start()]))
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append((False, token[0]))
        elif token in ("{", "}"):
            raise ValueError(f"{where}: unbalanced {token!r} (write {token * 2} for a literal one)")
        else:
            variable = match.group(1)
            if variable not in VARIABLES:
                raise ValueError(f"{where}: unknown variable {{{variable}}}; known: {', '.join(VARIABLES)}")
            parts.append((True, variable))
        pos = match.end()
    if pos < len(template):
        parts.append((False, template[pos:]))
    merged: list[tuple[bool, str]] = []
    for part in parts:  # join adjacent literals so rendering is one join of few pieces
        if merged and not part[0] and not merged[-1][0]:
            merged[-1] = (False, merged[-1][1] + part[1])
        else:
            merged.append(part)
    return HeaderTemplate(name, tuple(merged))


def compile_headers(entries: Sequence[str]) -> HeaderSet:
    """Compile `customRequestHeaders` (`Name:{variable}`, `{{`/`}}` for literal braces). Empty = the
    default X-Client-Cert-* set. Raises ValueError naming the entry: `customRequestHeaders[2]: …`."""
    if not entries:
        return DEFAULT_HEADERS
    if len(entries) > MAX_CUSTOM_HEADERS:
        raise ValueError(
            f"customRequestHeaders: {len(entries)} entries, more than the limit of {MAX_CUSTOM_HEADERS}"
        )
    templates = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"customRequestHeaders[{i}]"
        template = _compile_template(entry, where)
        key = template.name.lower()
        if key in seen:
            raise ValueError(
                f"{where}: header {template.name!r} is already set by customRequestHeaders[{seen[key]}]"
            )
        seen[key] = i
        templates.append(template)
    return HeaderSet(tuple(templates))


DEFAULT_HEADERS = HeaderSet(tuple(_compile_template(e, "default") for e in DEFAULT_HEADER_ENTRIES))


# ---------------------------------------------------------------- x-forwarded-client-cert (Envoy format)

SANITIZE = 1
SANITIZE_SET = 2
APPEND_FORWARD = 3
_XFCC_MODES = {
    0: SANITIZE,
    1: SANITIZE,
    2: SANITIZE_SET,
    3: APPEND_FORWARD,
    "SANITIZE": SANITIZE,
    "SANITIZE_SET": SANITIZE_SET,
    "APPEND_FORWARD": APPEND_FORWARD,
    "FORWARD_CLIENT_CERT_DETAILS_UNSPECIFIED": SANITIZE,
}


def forwards_incoming_xfcc(mode: int | str) -> bool:
    """Whether an incoming x-forwarded-client-cert survives anti-spoofing (only APPEND_FORWARD)."""
    return _XFCC_MODES.get(mode) == APPEND_FORWARD


def _rfc4514_printable(name: str) -> str:
    """An RFC 4514 string with every character outside printable ASCII hex-escaped (`\\0D`, RFC 4514
    §2.4), so that a hostile certificate cannot put CR/LF (header injection) or non-Latin-1 text into a
    header value."""
    return "".join(ch if " " <= ch <= "~" else "".join(f"\\{b:02X}" for b in ch.encode()) for ch in name)


def _uri_printable(value: str) -> str:
    """A URI / DNS SAN with every character outside printable ASCII percent-encoded (as in an IRI → URI
    conversion), for the same reason."""
    return "".join(ch if " " < ch <= "~" else urllib.parse.quote(ch, safe="") for ch in value)


def _xfcc_value(value: str) -> str:
    if any(ch in value for ch in ',;="') or value != value.strip():
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def xfcc_element(verdict: Verdict, by: str = "") -> str | None:
    """This connection's XFCC element, or None when no verified certificate was presented."""
    if not (verdict.present and verdict.chain_verified and verdict.leaf is not None):
        return None
    cert = x509.load_der_x509_certificate(verdict.leaf)
    leaf_pem = _pem(verdict.leaf)
    pairs = []
    if by:
        pairs.append(("By", _uri_printable(by)))
    pairs.append(("Hash", hashlib.sha256(verdict.leaf).hexdigest()))
    pairs.append(("Cert", urllib.parse.quote(leaf_pem, safe="")))
    chain_pem = leaf_pem + "".join(_pem(der) for der in verdict.chain)
    pairs.append(("Chain", urllib.parse.quote(chain_pem, safe="")))
    pairs.append(("Subject", _rfc4514_printable(cert.subject.rfc4514_string())))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, *MALFORMED):
        uris, dns = [], []
    pairs += [("URI", _uri_printable(u)) for u in uris[:1]]  # Envoy sends the first URI SAN only
    pairs += [("DNS", _uri_printable(d)) for d in dns]
    # Envoy always quotes Cert, Chain and Subject; other values only when they need it.
    quoted = {"Cert", "Chain", "Subject"}
    return ";".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        if k in quoted
        else f"{k}={_xfcc_value(v)}"
        for k, v in pairs
    )


def render_xfcc(verdict: Verdict, mode: int | str, incoming: str | None = None, by: str = "") -> str | None:
    """The x-forwarded-client-cert value to send to the backend, or None to send none.

    SANITIZE (default): never send one (the incoming one was stripped). SANITIZE_SET: send only this
    connection's element. APPEND_FORWARD: the incoming value with this connection's element appended
    (the incoming value alone when there is no verified certificate). `by` is the proxy's own identity
    (e.g. its certificate's URI SAN)."""
    resolved = _XFCC_MODES.get(mode)
    if resolved is None:
        raise ValueError(f"forwardClientCertDetails: unknown mode {mode!r}")
    if resolved == SANITIZE:
        return None
    element = xfcc_element(verdict, by)
    if resolved == SANITIZE_SET:
        return element
    if incoming and element:
        return f"{incoming},{element}"
    return element or incoming or None
