"""When to fetch a CRL source and what its answer means (SPEC §13). Pure: no sockets, no clocks, no store —
the fetcher task passes in the time, the HTTP status and body, the TrustConfig and a random number."""

from __future__ import annotations

import base64
import hashlib
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mtlsgate.v1 import resources_pb2

from data_plane.validation.bundle import MALFORMED, MAX_FETCHED_CRL_BYTES, InvalidBundle, compile_crl
from data_plane.validation.resources import DEFAULT_CRL_REFRESH_SECONDS, crl_source_uri_problem

MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # SPEC §13
MAX_REDIRECTS = 3
MIN_DELAY_SECONDS = 1.0  # never fetch one source more often than this, whatever nextUpdate says
STALE_POLL_SECONDS = 60.0  # a held CRL past nextUpdate: ask at least this often for its successor
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0


# ---------------------------------------------------------------- what a TrustConfig asks to be fetched


@dataclass(frozen=True)
class Source:
    trust_config: str  # trustConfigs/ID
    trust_store: int
    uri: str
    refresh_seconds: float
    distribution_point: bool = False  # from a CA certificate's cRLDistributionPoints, not crlSources

    @property
    def key(self) -> tuple[str, str]:
        return (self.trust_config, self.uri)


def sources_of(tc: resources_pb2.TrustConfig) -> list[Source]:
    """Every source of a TrustConfig: its crlSources, then (with fetchDistributionPoints) the http(s)
    distribution points of its stores' CA certificates. One entry per URI, the first one wins."""
    out: dict[str, Source] = {}
    for s, store in enumerate(tc.trust_stores):
        for source in store.crl_sources:
            refresh = source.refresh_interval.seconds if source.HasField("refresh_interval") else 0
            out.setdefault(source.uri, Source(tc.name, s, source.uri, float(refresh or DEFAULT_CRL_REFRESH_SECONDS)))
    for s, store in enumerate(tc.trust_stores):
        if not store.fetch_distribution_points:
            continue
        for entry in [*store.trust_anchors, *store.intermediate_cas]:
            for uri in distribution_points(entry.pem_certificate):
                out.setdefault(uri, Source(tc.name, s, uri, float(DEFAULT_CRL_REFRESH_SECONDS), True))
    return list(out.values())


def distribution_points(pem_certificate: str) -> list[str]:
    """The http(s) fullName URIs of a certificate's cRLDistributionPoints that would pass write
    validation as a crlSource (LDAP and the rest are skipped)."""
    try:
        cert = x509.load_pem_x509_certificate(pem_certificate.encode())
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, *MALFORMED):
        return []
    uris = []
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                uri = name.value
                if urllib.parse.urlsplit(uri).scheme in ("http", "https") and crl_source_uri_problem(uri) is None:
                    uris.append(uri)
    return uris


def shown_uri(uri: str) -> str:
    """A source's URI as logs and errors show it: a query (a bucket's signed URL carries its signature
    there) is replaced by `?…`. Userinfo cannot be present: write validation refuses it."""
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path,
                                    "…" if parts.query else "", ""))


# ---------------------------------------------------------------- the fetcher's memory of one source


@dataclass(frozen=True)
class Runtime:
    """Times are seconds since the epoch; 0 = never."""

    next_attempt: float
    last_attempt: float = 0.0
    last_success: float = 0.0
    last_error: str = ""
    last_error_reason: str = ""
    last_error_time: float = 0.0
    failing_since: float = 0.0
    failures: int = 0
    http_etag: str = ""  # validators of the last good response, for the next conditional GET
    last_modified: str = ""


def first_runtime(now: float) -> Runtime:
    return Runtime(next_attempt=now)


def success_delay(refresh_seconds: float, now: float, next_update: float | None) -> float:
    """Seconds until the next fetch after a good answer: the earlier of refreshInterval and half the time
    left to nextUpdate; a CRL already past nextUpdate is asked for at least every STALE_POLL_SECONDS."""
    delay = refresh_seconds
    if next_update is not None:
        left = next_update - now
        delay = min(delay, left / 2 if left > 0 else STALE_POLL_SECONDS)
    return max(MIN_DELAY_SECONDS, delay)


def failure_delay(refresh_seconds: float, failures: int, rand: float) -> float:
    """Exponential backoff from BACKOFF_BASE_SECONDS, capped at the refresh interval and at
    BACKOFF_CAP_SECONDS, with "equal jitter" (half fixed, half random, `rand` in [0, 1)) so that many
    control planes whose CA went down together do not come back in lockstep."""
    ceiling = max(MIN_DELAY_SECONDS, min(refresh_seconds, BACKOFF_CAP_SECONDS))
    delay = min(ceiling, BACKOFF_BASE_SECONDS * 2 ** min(max(failures - 1, 0), 30))
    return max(MIN_DELAY_SECONDS, delay / 2 + delay / 2 * rand)


def after_success(runtime: Runtime, source: Source, now: float, next_update: float | None, *,
                  http_etag: str = "", last_modified: str = "", keep_validators: bool = False) -> Runtime:
    return replace(
        runtime, next_attempt=now + success_delay(source.refresh_seconds, now, next_update),
        last_attempt=now, last_success=now, last_error="", last_error_reason="", failing_since=0.0, failures=0,
        http_etag=runtime.http_etag if keep_validators else http_etag,
        last_modified=runtime.last_modified if keep_validators else last_modified)


def after_failure(runtime: Runtime, source: Source, now: float, reason: str, message: str, rand: float) -> Runtime:
    failures = runtime.failures + 1
    return replace(
        runtime, next_attempt=now + failure_delay(source.refresh_seconds, failures, rand), last_attempt=now,
        last_error=message, last_error_reason=reason, last_error_time=now,
        failing_since=runtime.failing_since or now, failures=failures)


# ---------------------------------------------------------------- what an answer means


@dataclass(frozen=True)
class Failed:
    """A fetch that yields no usable CRL. `reason` is the metrics label; `message` is one line for status
    and logs (never the URL's query, never the body)."""

    reason: str
    message: str


@dataclass(frozen=True)
class Body:
    data: bytes
    http_etag: str = ""
    last_modified: str = ""


@dataclass(frozen=True)
class NotModified:
    pass


def http_outcome(status: int, headers: Mapping[str, str], body: bytes) -> Body | NotModified | Failed:
    """A final (non-redirect) HTTP response."""
    if status == 304:
        return NotModified()
    if status != 200:
        return Failed("http_status", f"HTTP {status}")
    return Body(body, headers.get("etag", "")[:256], headers.get("last-modified", "")[:64])


def redirect_target(current: str, location: str, hops: int) -> str | Failed:
    """Where a 3xx response sends the fetch, if it may follow: at most MAX_REDIRECTS hops, only to
    http(s) URLs without credentials (a CRL URL must not be turned into a file:// read or an auth leak)."""
    if hops >= MAX_REDIRECTS:
        return Failed("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")
    if not location:
        return Failed("bad_redirect", "redirect without a Location header")
    target = urllib.parse.urljoin(current, location.strip())
    problem = crl_source_uri_problem(target)
    if problem is None and urllib.parse.urlsplit(target).scheme not in ("http", "https"):
        problem = "redirects may only lead to http or https"
    if problem:
        return Failed("bad_redirect", f"redirect refused: {problem}")
    return target


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END X509 CRL-----")


def crl_der(body: bytes) -> bytes | Failed:
    """A response body as one DER CRL: PEM (exactly one `X509 CRL` block) or DER (what CDPs, Vault's
    `/v1/pki/crl` and step-ca's `/crl` serve). The body itself is never quoted back."""
    if len(body) > MAX_RESPONSE_BYTES:
        return Failed("too_large", f"response larger than {MAX_RESPONSE_BYTES} bytes")
    stripped = body.lstrip()
    if stripped.startswith(b"-----BEGIN"):
        blocks = _PEM_CRL.findall(stripped)
        if len(blocks) != 1:
            return Failed("not_a_crl", f"PEM body with {len(blocks)} X509 CRL blocks (expected exactly one)")
        try:
            der = base64.b64decode(b"".join(blocks[0].split()), validate=True)
        except ValueError:
            return Failed("not_a_crl", "PEM body whose base64 does not decode")
    elif body[:1] == b"\x30":
        der = body
    else:
        return Failed("not_a_crl", f"body of {len(body)} bytes is neither a PEM nor a DER CRL")
    if len(der) > MAX_FETCHED_CRL_BYTES:
        return Failed("too_large", f"CRL of {len(der)} bytes, more than {MAX_FETCHED_CRL_BYTES}")
    return der


# ---------------------------------------------------------------- is this CRL acceptable?


@dataclass(frozen=True)
class Unchanged:
    pass


@dataclass(frozen=True)
class Accepted:
    status: resources_pb2.CrlSourceStatus  # the stored part, ready to be written into the TrustConfig


def _cas(tc: resources_pb2.TrustConfig) -> list[x509.Certificate]:
    cas = []
    for store in tc.trust_stores:
        for entry in [*store.trust_anchors, *store.intermediate_cas]:
            try:
                cas.extend(x509.load_pem_x509_certificates(entry.pem_certificate.encode()))
            except ValueError:
                continue  # write validation refuses such a TrustConfig; nothing to verify against
    return cas


def _timestamp(value: datetime, target: object) -> None:
    target.FromDatetime(value.astimezone(UTC).replace(tzinfo=None))  # type: ignore[attr-defined]


def evaluate(source: Source, der: bytes, tc: resources_pb2.TrustConfig,
             held: resources_pb2.CrlSourceStatus | None, now: float) -> Accepted | Unchanged | Failed:
    """Decide on a fetched CRL exactly as on a written one (`compile_crl`: issuer is a CA of this trust
    config, signature, cRLSign, complete CRL — no delta, no partition — with a cRLNumber), plus the
    rollback rule: the cRLNumber never goes down, and a number already held never comes with other content."""
    if held is not None and held.der_crl == der:
        return Unchanged()
    try:
        _, compiled = compile_crl(der, shown_uri(source.uri), _cas(tc))
    except InvalidBundle as exc:
        return Failed(exc.reason, str(exc).partition(": ")[2] or str(exc))
    if held is not None and held.der_crl:
        issuer = compiled.issuer.rfc4514_string()
        if issuer == held.issuer:
            number = int(held.crl_number or 0)
            if compiled.number < number:
                return Failed("crl_number_rollback", f"cRLNumber {compiled.number} is lower than the "
                              f"{number} already held (a replayed or rolled-back CRL)")
            if compiled.number == number:
                return Failed("crl_number_reused", f"cRLNumber {number} is already held with other content")
    status = resources_pb2.CrlSourceStatus(
        trust_store=source.trust_store, uri=source.uri, distribution_point=source.distribution_point,
        der_crl=der, crl_sha256=hashlib.sha256(der).hexdigest(), crl_number=str(compiled.number),
        revoked_count=len(compiled.revoked), issuer=compiled.issuer.rfc4514_string())
    _timestamp(compiled.this_update, status.this_update)
    if compiled.next_update is not None:
        _timestamp(compiled.next_update, status.next_update)
    status.fetch_time.FromNanoseconds(int(now * 1e9))
    return Accepted(status)


def der_from_pem_crl(pem: bytes) -> bytes:
    """For tools and tests that have a PEM CRL: its DER."""
    return x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------- is a source a problem?


def problem(held: resources_pb2.CrlSourceStatus | None, runtime: Runtime | None, now: float) -> str:
    """Non-empty when a source needs a person: the CRL it should keep fresh has run out (past nextUpdate:
    with requireFreshCrl its issuer's clients are refused), or it is failing and has failed for longer than
    its CRL's validity period, or it has never delivered a CRL at all."""
    failing = runtime is not None and runtime.failures > 0
    why = ""
    if failing:
        assert runtime is not None
        why = (f"failing for {now - runtime.failing_since:.0f}s "
               f"({runtime.last_error_reason}: {runtime.last_error})")
    if held is None or not held.der_crl:
        return f"no CRL fetched yet; {why}" if failing else ""
    if not held.HasField("next_update"):
        return ""
    next_update = held.next_update.ToNanoseconds() / 1e9
    if now > next_update:
        cause = why if failing else "the source still serves it (the CA stopped publishing new CRLs)"
        return f"held CRL (cRLNumber {held.crl_number}) expired at {held.next_update.ToJsonString()}; {cause}"
    validity = next_update - held.this_update.ToNanoseconds() / 1e9
    if failing and now - runtime.failing_since > validity:  # type: ignore[union-attr]
        return f"{why}, longer than the CRL's validity period ({validity:.0f}s)"
    return ""


def age_seconds(held: resources_pb2.CrlSourceStatus | None, now: float) -> float | None:
    if held is None or not held.der_crl:
        return None
    return max(0.0, now - held.this_update.ToNanoseconds() / 1e9)


def held_for(tc: resources_pb2.TrustConfig, uri: str) -> resources_pb2.CrlSourceStatus | None:
    for status in tc.crl_source_status:
        if status.uri == uri:
            return status
    return None


def with_status(tc: resources_pb2.TrustConfig, status: resources_pb2.CrlSourceStatus) -> resources_pb2.TrustConfig:
    """A copy of `tc` holding `status` for its URI (replacing any earlier one)."""
    out = resources_pb2.TrustConfig()
    out.CopyFrom(tc)
    kept = [s for s in out.crl_source_status if s.uri != status.uri]
    del out.crl_source_status[:]
    out.crl_source_status.extend([*kept, status])
    return out


def carry_over(new: resources_pb2.TrustConfig, existing: resources_pb2.TrustConfig | None,
               keep: Sequence[str] | None = None) -> None:
    """A person's write never carries CRL source status (it is output only): keep what the stored
    TrustConfig holds for every source the new one still has, re-pointed at its (maybe moved) store —
    so that re-applying a manifest does not drop fetched CRLs until the next fetch."""
    del new.crl_source_status[:]
    if existing is None:
        return
    wanted = {s.uri: s for s in sources_of(new)}
    for status in existing.crl_source_status:
        source = wanted.get(status.uri)
        if source is None or (keep is not None and status.uri not in keep):
            continue
        copy = resources_pb2.CrlSourceStatus()
        copy.CopyFrom(status)
        copy.trust_store = source.trust_store
        copy.distribution_point = source.distribution_point
        new.crl_source_status.append(copy)
