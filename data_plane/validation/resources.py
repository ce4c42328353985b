"""Write validation of the four resources, one resource at a time (no I/O, no other resources): every PEM
parsed, CA constraints, CRL signatures, key/certificate match, size and count bounds, header templates and
SAN patterns. The control plane runs it on every write; the proxy and `mtlsgate check` can run it too.
References between resources are checked by the control plane (they need the store)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from mtlsgate.v1 import backends_pb2, resources_pb2

from data_plane.http import routes as routes_mod
from data_plane.validation import pem as pem_text
from data_plane.validation.bundle import InvalidBundle, compile_bundle, trust_bundle_from_trust_config
from data_plane.validation.headers import compile_headers
from data_plane.validation.pem import PemProblem
from data_plane.validation.policy import compile_policy


@dataclass(frozen=True)
class FieldViolation:
    """`field` is the camelCase path as in YAML (`trustStores[0].trustAnchors[1].pemCertificate`)."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


# ---------------------------------------------------------------- limits (everything an API client controls)

MAX_DESCRIPTION_CHARS = 2048
MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 63
MAX_TRUST_STORES = 4
MAX_TRUST_ANCHORS = 200  # per trust store
MAX_INTERMEDIATE_CAS = 200  # per trust store
MAX_CRLS = 200  # per trust store
MAX_ALLOWLISTED_CERTIFICATES = 500
MAX_CERTIFICATE_PEM_BYTES = 64 * 1024  # one certificate (or a server's chain) as PEM
MAX_CRL_PEM_BYTES = 16 * 1024 * 1024  # ~100k+ revoked serials
MAX_TRUST_CONFIG_BYTES = 48 * 1024 * 1024  # all PEMs of one TrustConfig together
MAX_PRIVATE_KEY_PEM_BYTES = 16 * 1024
MAX_SERVER_CHAIN_CERTIFICATES = 10
MAX_CUSTOM_REQUEST_HEADERS = 16  # also enforced by compile_headers; SAN matcher limits live in policy.py
MAX_NODE_SELECTOR_ENTRIES = 16
MAX_BACKEND_CHARS = 255
MAX_LISTENER_CERTIFICATES = 20  # SNI certificates per listener (SPEC §15)
MAX_GRPC_MESSAGE_BYTES = 64 * 1024 * 1024  # the API server's and clients' message size limit
MAX_CRL_SOURCES = 8  # per trust store (SPEC §13)
MAX_CRL_SOURCE_URI_CHARS = 2048
# refreshInterval bounds: a second is the least that still means "a schedule" (the demo and tests use a few
# seconds; every fetch after the first is a conditional GET); a week is the most that still catches a CA's
# daily or weekly CRL before its nextUpdate. Unset means an hour.
MIN_CRL_REFRESH_SECONDS = 1
MAX_CRL_REFRESH_SECONDS = 7 * 24 * 3600
DEFAULT_CRL_REFRESH_SECONDS = 3600
CRL_SOURCE_SCHEMES = ("http", "https", "file")

_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


# ---------------------------------------------------------------- shared pieces


def _metadata(description: str, labels: dict[str, str] | object) -> Iterator[FieldViolation]:
    if len(description) > MAX_DESCRIPTION_CHARS:
        yield FieldViolation("description", f"too long ({len(description)} characters, limit {MAX_DESCRIPTION_CHARS})")
    yield from _label_map("labels", labels)  # type: ignore[arg-type]


def _label_map(path: str, labels: dict[str, str], limit: int = MAX_LABELS) -> Iterator[FieldViolation]:
    if len(labels) > limit:
        yield FieldViolation(path, f"too many entries ({len(labels)}, limit {limit})")
        return
    for key, value in sorted(labels.items()):
        if len(key) > MAX_LABEL_KEY_CHARS or not _LABEL_KEY.fullmatch(key):
            yield FieldViolation(f"{path}[{key!r}]", "invalid key: letters, digits, '.', '_', '-', '/'; "
                                 f"alphanumeric first and last; at most {MAX_LABEL_KEY_CHARS} characters")
        elif len(value) > MAX_LABEL_VALUE_CHARS or not _LABEL_VALUE.fullmatch(value):
            yield FieldViolation(f"{path}[{key!r}]", "invalid value: letters, digits, '.', '_', '-'; "
                                 f"alphanumeric first and last; at most {MAX_LABEL_VALUE_CHARS} characters")


def _one_certificate(path: str, pem: str, *, required: bool = True) -> tuple[x509.Certificate | None,
                                                                              FieldViolation | None]:
    if not pem.strip():
        return None, FieldViolation(path, "required") if required else None
    if len(pem.encode()) > MAX_CERTIFICATE_PEM_BYTES:
        return None, FieldViolation(path, f"too large ({len(pem.encode())} bytes, limit {MAX_CERTIFICATE_PEM_BYTES})")
    try:
        certs = pem_text.load_certificates(pem)
    except PemProblem as exc:
        return None, FieldViolation(path, str(exc))
    if len(certs) != 1:
        return None, FieldViolation(path, f"must hold exactly one certificate (found {len(certs)})")
    return certs[0], None


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("Unable to load PEM"):  # cryptography's generic text, with a FAQ link
        return "no well-formed PEM block"
    return text[:200]


def _ca_problem(cert: x509.Certificate) -> str | None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "not a CA certificate (no basicConstraints extension)"
    except ValueError as exc:
        return f"unreadable extensions ({_reason(exc)})"
    if not constraints.ca:
        return "not a CA certificate (basicConstraints CA=false)"
    return None


def _public_key_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------- TrustConfig


def validate_trust_config(tc: resources_pb2.TrustConfig) -> list[FieldViolation]:
    out = list(_metadata(tc.description, tc.labels))
    total = sum(len(a.pem_certificate) for s in tc.trust_stores for a in s.trust_anchors)
    total += sum(len(a.pem_certificate) for s in tc.trust_stores for a in s.intermediate_cas)
    total += sum(len(c.pem_crl) for s in tc.trust_stores for c in s.crls)
    total += sum(len(a.pem_certificate) for a in tc.allowlisted_certificates)
    if total > MAX_TRUST_CONFIG_BYTES:
        return [*out, FieldViolation("trustStores", f"too large ({total} bytes of PEM, limit {MAX_TRUST_CONFIG_BYTES})")]
    if len(tc.trust_stores) > MAX_TRUST_STORES:
        return [*out, FieldViolation("trustStores", f"too many trust stores ({len(tc.trust_stores)}, limit {MAX_TRUST_STORES})")]

    cas: list[x509.Certificate] = []  # every anchor and intermediate: CRL issuers are looked up here
    crls: list[tuple[str, x509.CertificateRevocationList]] = []
    out += _crl_source_problems(tc)
    for s, store in enumerate(tc.trust_stores):
        base = f"trustStores[{s}]"
        for field, entries, limit in (("trustAnchors", store.trust_anchors, MAX_TRUST_ANCHORS),
                                      ("intermediateCas", store.intermediate_cas, MAX_INTERMEDIATE_CAS)):
            if len(entries) > limit:
                out.append(FieldViolation(f"{base}.{field}", f"too many entries ({len(entries)}, limit {limit})"))
                continue
            for i, entry in enumerate(entries):
                path = f"{base}.{field}[{i}].pemCertificate"
                cert, problem = _one_certificate(path, entry.pem_certificate)
                if problem is not None:
                    out.append(problem)
                    continue
                assert cert is not None
                ca_problem = _ca_problem(cert)
                if ca_problem:
                    out.append(FieldViolation(path, ca_problem))
                else:
                    cas.append(cert)
        if len(store.crls) > MAX_CRLS:
            out.append(FieldViolation(f"{base}.crls", f"too many entries ({len(store.crls)}, limit {MAX_CRLS})"))
            continue
        for i, entry in enumerate(store.crls):
            path = f"{base}.crls[{i}].pemCrl"
            data = entry.pem_crl.encode()
            if not data.strip():
                out.append(FieldViolation(path, "required"))
            elif len(data) > MAX_CRL_PEM_BYTES:
                out.append(FieldViolation(path, f"too large ({len(data)} bytes, limit {MAX_CRL_PEM_BYTES})"))
            else:
                try:
                    crls.append((path, x509.load_pem_x509_crl(data)))
                except ValueError:
                    out.append(FieldViolation(path, pem_text.crl_problem(entry.pem_crl)))
    for path, crl in crls:
        crl_problem = _crl_problem(crl, cas)
        if crl_problem:
            out.append(FieldViolation(path, crl_problem))

    if len(tc.allowlisted_certificates) > MAX_ALLOWLISTED_CERTIFICATES:
        out.append(FieldViolation("allowlistedCertificates", f"too many entries "
                                  f"({len(tc.allowlisted_certificates)}, limit {MAX_ALLOWLISTED_CERTIFICATES})"))
    else:
        for i, entry in enumerate(tc.allowlisted_certificates):
            _, problem = _one_certificate(f"allowlistedCertificates[{i}].pemCertificate", entry.pem_certificate)
            if problem is not None:
                out.append(problem)
    if not out:
        out += _node_compile_problems(tc)
    return out


def _node_compile_problems(tc: resources_pb2.TrustConfig) -> list[FieldViolation]:
    """Compile the TrustConfig exactly as every proxy node will, so that nothing the API accepts can be
    NACKed by the whole fleet (a CRL without cRLNumber, a delta CRL, a CA without key identifiers…)."""
    try:
        compile_bundle(trust_bundle_from_trust_config(tc))
    except InvalidBundle as exc:
        field, _, description = str(exc).partition(": ")
        field = _fetched_crl_field(tc, field)
        if field.endswith("]"):  # the node names the entry; the API names the PEM field inside it
            field += ".pemCrl" if field.rpartition(".")[2].startswith("crls[") else ".pemCertificate"
        return [FieldViolation(field, description or field)]
    return []


_BUNDLE_CRL_FIELD = re.compile(r"trustStores\[(\d+)\]\.crls\[(\d+)\]")


def _fetched_crl_field(tc: resources_pb2.TrustConfig, field: str) -> str:
    """The bundle numbers fetched CRLs after the written ones of their store; name them as the API does."""
    match = _BUNDLE_CRL_FIELD.fullmatch(field)
    if match is None:
        return field
    store, index = int(match.group(1)), int(match.group(2))
    if store >= len(tc.trust_stores) or index < len(tc.trust_stores[store].crls):
        return field
    fetched = [k for k, c in enumerate(tc.crl_source_status) if c.der_crl and c.trust_store == store]
    offset = index - len(tc.trust_stores[store].crls)
    return f"crlSourceStatus[{fetched[offset]}].derCrl" if offset < len(fetched) else field


def crl_source_uri_problem(uri: str) -> str | None:
    """Why `uri` cannot be a CRL source (SPEC §13), or None: http/https/file only, no credentials, and
    nothing a log line or a redirect could be fooled by."""
    if not uri:
        return "required"
    if len(uri) > MAX_CRL_SOURCE_URI_CHARS:
        return f"too long ({len(uri)} characters, limit {MAX_CRL_SOURCE_URI_CHARS})"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in uri) or not uri.isascii():
        return "must be ASCII without spaces or control characters (percent-encode them)"
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in CRL_SOURCE_SCHEMES:
        return f"scheme {parts.scheme + ':' if parts.scheme else '(none)'} is not allowed (use http, https or file)"
    if "@" in parts.netloc:
        return "must not carry credentials (user:password@); CRLs are public, signed documents"
    if parts.fragment:
        return "must not have a #fragment"
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return "file:// URLs name a local file (file:///path)"
        if not parts.path.startswith("/") or parts.query:
            return "file:// URLs take an absolute path and no query"
        return None
    if not parts.hostname:
        return "needs a host"
    if port == 0:
        return "port 0 is not a port"
    return None


def _crl_source_problems(tc: resources_pb2.TrustConfig) -> Iterator[FieldViolation]:
    seen: dict[str, str] = {}
    for s, store in enumerate(tc.trust_stores):
        base = f"trustStores[{s}].crlSources"
        if len(store.crl_sources) > MAX_CRL_SOURCES:
            yield FieldViolation(base, f"too many entries ({len(store.crl_sources)}, limit {MAX_CRL_SOURCES})")
            continue
        for i, source in enumerate(store.crl_sources):
            path = f"{base}[{i}]"
            problem = crl_source_uri_problem(source.uri)
            if problem:
                yield FieldViolation(f"{path}.uri", problem)
            elif source.uri in seen:
                yield FieldViolation(f"{path}.uri", f"already listed at {seen[source.uri]}")
            else:
                seen[source.uri] = path
            interval = source.refresh_interval
            if source.HasField("refresh_interval") and not (
                    interval.nanos == 0 and MIN_CRL_REFRESH_SECONDS <= interval.seconds <= MAX_CRL_REFRESH_SECONDS):
                yield FieldViolation(f"{path}.refreshInterval", f"must be whole seconds between "
                                     f"{MIN_CRL_REFRESH_SECONDS}s and {MAX_CRL_REFRESH_SECONDS}s (7 days)")
    for k, status in enumerate(tc.crl_source_status):
        if not 0 <= status.trust_store < len(tc.trust_stores):
            yield FieldViolation(f"crlSourceStatus[{k}].trustStore", f"no trust store {status.trust_store}")


def _crl_problem(crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate]) -> str | None:
    issuers = [ca for ca in cas if ca.subject == crl.issuer]
    if not issuers:
        return f"issuer {crl.issuer.rfc4514_string()!r} is not a CA of this trust config"
    for ca in issuers:
        try:
            if crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return None
        except (TypeError, UnsupportedAlgorithm, ValueError):
            continue
    return "signature does not verify against any CA of this trust config"


def trust_config_is_empty(tc: resources_pb2.TrustConfig) -> bool:
    """No trust anchor and no allowlisted certificate: nothing a client certificate could be trusted by."""
    return not any(s.trust_anchors for s in tc.trust_stores) and not tc.allowlisted_certificates


# ---------------------------------------------------------------- ServerTlsPolicy

_MODE = resources_pb2.MTLSPolicy.ClientValidationMode


def validate_server_tls_policy(policy: resources_pb2.ServerTlsPolicy) -> list[FieldViolation]:
    out = list(_metadata(policy.description, policy.labels))
    if not policy.HasField("mtls_policy"):
        return out
    mtls = policy.mtls_policy
    if mtls.client_validation_mode == _MODE.REJECT_INVALID and not mtls.client_validation_trust_config:
        out.append(FieldViolation("mtlsPolicy.clientValidationTrustConfig",
                                  "required when clientValidationMode is REJECT_INVALID"))
    # Mode, depth, SAN matchers (RE2): the validation engine's compiler is the one implementation.
    try:
        compile_policy(policy)
    except ValueError as exc:
        out.append(_violation_from(exc, "mtlsPolicy"))
    return out


def _violation_from(exc: ValueError, default_field: str) -> FieldViolation:
    """The engine's compilers raise `ValueError("field.path: problem")`."""
    field, sep, description = str(exc).partition(": ")
    if not sep or " " in field:
        return FieldViolation(default_field, str(exc))
    return FieldViolation(field, description)


# ---------------------------------------------------------------- Certificate


def validate_certificate(cert: resources_pb2.Certificate) -> list[FieldViolation]:
    out = list(_metadata(cert.description, cert.labels))
    chain: list[x509.Certificate] = []
    pem = cert.pem_certificate
    if not pem.strip():
        out.append(FieldViolation("pemCertificate", "required"))
    elif len(pem.encode()) > MAX_CERTIFICATE_PEM_BYTES:
        out.append(FieldViolation("pemCertificate", f"too large ({len(pem.encode())} bytes, "
                                  f"limit {MAX_CERTIFICATE_PEM_BYTES})"))
    else:
        try:
            chain = pem_text.load_certificates(pem, expected="a certificate chain")
        except PemProblem as exc:
            out.append(FieldViolation("pemCertificate", str(exc)))
        if len(chain) > MAX_SERVER_CHAIN_CERTIFICATES:
            out.append(FieldViolation("pemCertificate", f"too many certificates ({len(chain)}, "
                                      f"limit {MAX_SERVER_CHAIN_CERTIFICATES})"))
            chain = []
    key_pem = cert.pem_private_key
    key = None
    if not key_pem.strip():
        out.append(FieldViolation("pemPrivateKey", "required"))
    elif len(key_pem.encode()) > MAX_PRIVATE_KEY_PEM_BYTES:
        out.append(FieldViolation("pemPrivateKey", f"too large (limit {MAX_PRIVATE_KEY_PEM_BYTES} bytes)"))
    else:
        key, key_problem = _load_private_key(key_pem)
        if key_problem:
            out.append(FieldViolation("pemPrivateKey", key_problem))
    if chain and key is not None and _public_key_der(chain[0].public_key()) != _public_key_der(key.public_key()):
        out.append(FieldViolation("pemPrivateKey", "does not match the public key of the first certificate "
                                  "in pemCertificate"))
    return out


def _load_private_key(pem: str) -> tuple[PrivateKeyTypes | None, str | None]:
    # Never put key material or the parser's message (which may quote input) into the error.
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except TypeError:
        return None, "encrypted private keys are not supported (store it unencrypted)"
    except (ValueError, UnsupportedAlgorithm):
        return None, pem_text.private_key_problem(pem)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            return None, f"RSA key too small ({key.key_size} bits, minimum 2048)"
    elif not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None, f"unsupported key type {type(key).__name__} (use RSA, ECDSA or Ed25519)"
    return key, None


def private_key_sha256(pem_private_key: str) -> str:
    """Hex SHA-256 of the key's SubjectPublicKeyInfo (DER): what the API returns instead of the key."""
    import hashlib

    key = serialization.load_pem_private_key(pem_private_key.encode(), password=None)
    return hashlib.sha256(_public_key_der(key.public_key())).hexdigest()


# ---------------------------------------------------------------- Listener


def validate_listener(listener: resources_pb2.Listener) -> list[FieldViolation]:
    out = list(_metadata(listener.description, listener.labels))
    if not 1 <= listener.port <= 65535:
        out.append(FieldViolation("port", "required, between 1 and 65535"))
    out.extend(_label_map("nodeSelector", dict(listener.node_selector), MAX_NODE_SELECTOR_ENTRIES))
    if not listener.certificate and not listener.certificates:
        out.append(FieldViolation("certificate", "required (certificates/ID), or `certificates`"))
    if len(listener.certificates) > MAX_LISTENER_CERTIFICATES:
        out.append(FieldViolation("certificates", f"too many entries ({len(listener.certificates)}, "
                                  f"limit {MAX_LISTENER_CERTIFICATES})"))
    names = listener_certificates(listener)
    if len(names) != len(set(names)):
        out.append(FieldViolation("certificates", "names a certificate twice"))
    if listener.backend or not (listener.routes or listener.default_backend_service):
        problem = _backend_problem(listener.backend)
        if problem:
            out.append(FieldViolation("backend", problem))
    if listener.backend and listener.default_backend_service:
        out.append(FieldViolation("defaultBackendService", "set together with backend: name one of them"))
    out.extend(route_problems(listener))
    entries = list(listener.custom_request_headers)
    if len(entries) > MAX_CUSTOM_REQUEST_HEADERS:
        out.append(FieldViolation("customRequestHeaders", f"too many entries ({len(entries)}, "
                                  f"limit {MAX_CUSTOM_REQUEST_HEADERS})"))
    else:
        out.extend(_header_problems(entries))
    if listener.HasField("resolved_server_tls_policy"):
        out.append(FieldViolation("resolvedServerTlsPolicy", "output only: set by the control plane for xDS"))
    out.extend(_ssl_policy_problems(listener.ssl_policy))
    return out


def listener_certificates(listener: resources_pb2.Listener) -> list[str]:
    """The certificates a listener serves, the default first (`certificate`, then `certificates`)."""
    names = [listener.certificate] if listener.certificate else []
    return names + [name for name in listener.certificates if name != listener.certificate]


def route_problems(listener: resources_pb2.Listener) -> list[FieldViolation]:
    """Routes compile with the proxy's own route table (`data_plane/http/routes.py`)."""
    out: list[FieldViolation] = []
    specs = []
    for i, route in enumerate(listener.routes):
        where = f"routes[{i}]"
        if bool(route.backend) == bool(route.backend_service):
            out.append(FieldViolation(where, "needs exactly one of backendService and backend"))
        elif route.backend:
            problem = _backend_problem(route.backend)
            if problem:
                out.append(FieldViolation(f"{where}.backend", problem))
        if route.client_certificate not in backends_pb2.Route.ClientCertificate.values():
            out.append(FieldViolation(f"{where}.clientCertificate", f"unknown value {route.client_certificate}"))
        entries = list(route.custom_request_headers)
        if len(entries) > MAX_CUSTOM_REQUEST_HEADERS:
            out.append(FieldViolation(f"{where}.customRequestHeaders", f"too many entries ({len(entries)}, "
                                      f"limit {MAX_CUSTOM_REQUEST_HEADERS})"))
        else:
            out.extend(FieldViolation(f"{where}.{v.field}", v.description) for v in _header_problems(entries))
        match = route.WhichOneof("path_match")
        specs.append(routes_mod.RouteSpec(
            tuple(route.hosts), route.path_prefix if match == "path_prefix" else None,
            route.path if match == "path" else None, routes_mod.Route(i, route.backend or route.backend_service)))
    try:
        routes_mod.RouteTable(specs, None)
    except routes_mod.InvalidRoute as exc:
        field, _, description = str(exc).partition(": ")
        out.append(FieldViolation(field, description))
    return out


def _ssl_policy_problems(policy: resources_pb2.SslPolicy) -> list[FieldViolation]:
    """Enum values a gRPC client can send as raw numbers (JSON/YAML names are checked by the parser)."""
    out = []
    for field, enum, value in (("sslPolicy.minTlsVersion", resources_pb2.SslPolicy.TlsVersion, policy.min_tls_version),
                               ("sslPolicy.profile", resources_pb2.SslPolicy.Profile, policy.profile)):
        if value not in enum.values():
            names = ", ".join(n for n in enum.keys() if not n.endswith("UNSPECIFIED"))  # noqa: SIM118 - an EnumTypeWrapper, not a dict
            out.append(FieldViolation(field, f"unknown value {value}; one of {names}"))
    return out


def _backend_problem(backend: str) -> str | None:
    if not backend:
        return "required (HOST:PORT)"
    if len(backend) > MAX_BACKEND_CHARS:
        return f"too long (limit {MAX_BACKEND_CHARS} characters)"
    host, sep, port = backend.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{backend!r} is not HOST:PORT with a port between 1 and 65535"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            import ipaddress

            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
        return None
    if not _HOSTNAME.fullmatch(host):
        return f"{host!r} is not a host name or IPv4 address (write IPv6 as [ADDR]:PORT)"
    return None


def _header_problems(entries: Sequence[str]) -> list[FieldViolation]:
    """Header templates compile with the engine's `compile_headers` (the proxy runs the same code)."""
    try:
        compile_headers(entries)
    except ValueError as exc:
        return [_violation_from(exc, "customRequestHeaders")]
    return []


# ---------------------------------------------------------------- BackendService, BackendAuthenticationConfig (SPEC §15)

MAX_BACKEND_ENDPOINTS = 100  # per BackendService
MAX_ENDPOINT_WEIGHT = 1000
MAX_HEALTH_CHECK_PATH_CHARS = 1024
MAX_TLS_SUBJECT_ALT_NAMES = 20
MAX_THRESHOLD = 100
MAX_CONSECUTIVE_ERRORS = 1000
# Duration bounds (seconds): (field path, min, max). Health checks may run as often as every 100 ms (tests,
# demos) and as rarely as every 5 minutes.
_DURATION_BOUNDS = {
    "healthCheck.interval": (0.1, 300.0),
    "healthCheck.timeout": (0.01, 60.0),
    "outlierDetection.baseEjectionTime": (0.01, 3600.0),
    "timeouts.connect": (0.001, 60.0),
    "timeouts.response": (0.001, 3600.0),
}
_BS = backends_pb2.BackendService
_HC_PATH = re.compile(r"/[!-~]*")


def seconds(duration: object) -> float:
    """A google.protobuf.Duration as float seconds."""
    return duration.seconds + duration.nanos / 1e9  # type: ignore[attr-defined,no-any-return]


def backend_service_tls(service: backends_pb2.BackendService) -> bool:
    """Does this service's every endpoint speak TLS? (tlsSettings or backendAuthentication set.)"""
    return service.HasField("tls_settings") or bool(service.backend_authentication)


def validate_backend_service(service: backends_pb2.BackendService) -> list[FieldViolation]:
    out = list(_metadata(service.description, service.labels))
    if not service.endpoints:
        out.append(FieldViolation("endpoints", "required: at least one {address: HOST:PORT}"))
    elif len(service.endpoints) > MAX_BACKEND_ENDPOINTS:
        out.append(FieldViolation("endpoints", f"too many entries ({len(service.endpoints)}, "
                                  f"limit {MAX_BACKEND_ENDPOINTS})"))
    else:
        seen: dict[str, int] = {}
        for i, endpoint in enumerate(service.endpoints):
            problem = _backend_problem(endpoint.address)
            if problem:
                out.append(FieldViolation(f"endpoints[{i}].address", problem))
            elif endpoint.address.lower() in seen:
                out.append(FieldViolation(f"endpoints[{i}].address", f"{endpoint.address} is already "
                                          f"endpoints[{seen[endpoint.address.lower()]}]"))
            else:
                seen[endpoint.address.lower()] = i
            if not 0 <= endpoint.weight <= MAX_ENDPOINT_WEIGHT:
                out.append(FieldViolation(f"endpoints[{i}].weight", f"must be between 0 (= 1) and "
                                          f"{MAX_ENDPOINT_WEIGHT}"))
    if service.load_balancing not in _BS.LoadBalancing.values():
        out.append(FieldViolation("loadBalancing", f"unknown value {service.load_balancing}; one of ROUND_ROBIN, "
                                  "LEAST_REQUEST"))
    hc = service.health_check
    if hc.path and (len(hc.path) > MAX_HEALTH_CHECK_PATH_CHARS or not _HC_PATH.fullmatch(hc.path)):
        out.append(FieldViolation("healthCheck.path", "must start with / and hold only visible ASCII "
                                  f"(at most {MAX_HEALTH_CHECK_PATH_CHARS} characters)"))
    for field, value in (("healthCheck.healthyThreshold", hc.healthy_threshold),
                         ("healthCheck.unhealthyThreshold", hc.unhealthy_threshold)):
        if not 0 <= value <= MAX_THRESHOLD:
            out.append(FieldViolation(field, f"must be between 0 (= default) and {MAX_THRESHOLD}"))
    if not 0 <= service.outlier_detection.consecutive_errors <= MAX_CONSECUTIVE_ERRORS:
        out.append(FieldViolation("outlierDetection.consecutiveErrors",
                                  f"must be between 0 (= 5) and {MAX_CONSECUTIVE_ERRORS}"))
    durations = {
        "healthCheck.interval": (hc, "interval"), "healthCheck.timeout": (hc, "timeout"),
        "outlierDetection.baseEjectionTime": (service.outlier_detection, "base_ejection_time"),
        "timeouts.connect": (service.timeouts, "connect"), "timeouts.response": (service.timeouts, "response"),
    }
    for field, (holder, attr) in durations.items():
        if holder.HasField(attr):  # type: ignore[attr-defined]
            low, high = _DURATION_BOUNDS[field]
            value = seconds(getattr(holder, attr))
            if not low <= value <= high:
                out.append(FieldViolation(field, f"must be between {low:g}s and {high:g}s (got {value:g}s)"))
    if hc.path and hc.HasField("timeout") and hc.HasField("interval") and seconds(hc.timeout) > seconds(hc.interval):
        out.append(FieldViolation("healthCheck.timeout", "must not be longer than healthCheck.interval"))
    tls = service.tls_settings
    if tls.sni:
        problem = _dns_name_problem(tls.sni, wildcard=False)
        if problem:
            out.append(FieldViolation("tlsSettings.sni", problem))
    if len(tls.subject_alt_names) > MAX_TLS_SUBJECT_ALT_NAMES:
        out.append(FieldViolation("tlsSettings.subjectAltNames", f"too many entries "
                                  f"({len(tls.subject_alt_names)}, limit {MAX_TLS_SUBJECT_ALT_NAMES})"))
    else:
        for i, name in enumerate(tls.subject_alt_names):
            problem = _dns_name_problem(name, wildcard=True)
            if problem:
                out.append(FieldViolation(f"tlsSettings.subjectAltNames[{i}]", problem))
    if service.HasField("resolved_backend_authentication") and not service.backend_authentication:
        out.append(FieldViolation("resolvedBackendAuthentication", "output only: set by the control plane for xDS"))
    return out


def _dns_name_problem(name: str, *, wildcard: bool) -> str | None:
    text = name[2:] if wildcard and name.startswith("*.") else name
    if len(name) > 253 or not _HOSTNAME.fullmatch(text):
        return f"{name[:100]!r} is not a DNS name" + (" (a leading *. is allowed)" if wildcard else "")
    return None


_ROOTS = backends_pb2.BackendAuthenticationConfig.WellKnownRoots


def validate_backend_authentication_config(config: backends_pb2.BackendAuthenticationConfig) -> list[FieldViolation]:
    out = list(_metadata(config.description, config.labels))
    if config.well_known_roots not in _ROOTS.values():
        out.append(FieldViolation("wellKnownRoots", f"unknown value {config.well_known_roots}; one of NONE, "
                                  "PUBLIC_ROOTS"))
    elif config.well_known_roots == _ROOTS.NONE and not config.trust_config:
        out.append(FieldViolation("wellKnownRoots", "NONE without a trustConfig would refuse every backend "
                                  "certificate; name a trustConfig or use PUBLIC_ROOTS"))
    return out
