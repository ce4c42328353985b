"""Node reports (SPEC §12), pure: what a report may contain (`report_problem`), and what the kept reports
add up to — handshake totals for the roll-out gates (`handshake_totals`) and the client inventory
(`client_inventory`). No I/O: the report servicer and the API call these with what the store returned."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mtlsgate.v1 import reports_pb2

# Bounds of one report (SPEC §12: at most 1,000 client certificates per node per report).
MAX_REPORT_BYTES = 512 * 1024
MAX_LISTENERS = 256
MAX_CLIENTS = 1_000
MAX_COUNT_ENTRIES = 256  # handshake / request entries per listener
# Shadow entries per listener: a node itemises at most 64 (data_plane/workers/shadow_tally.py), its judged
# counts and overflow sums included; more can only come from a node inflating `shadow status`.
MAX_SHADOW_ENTRIES = 64
MAX_STRING = 1_024  # any one string field (names, errors, subjects)
MAX_REVALIDATIONS = 64
MAX_CLOSED_FINGERPRINTS = 1_000
FINGERPRINT_LENGTH = 64  # lowercase hex SHA-256
MAX_SERVICE_ENDPOINTS = 100  # backend endpoint health (issue 16): per BackendService, as write validation
MAX_ENDPOINT_ENTRIES = 1_000  # … and per report


@dataclass(frozen=True)
class StoredReport:
    node_id: str
    received_at: float  # control plane clock
    report: reports_pb2.NodeReport


def report_problem(report: reports_pb2.NodeReport, stream_node: str, size: int) -> str:
    """Why a report is refused ("" = it may be kept). `stream_node`: the node the stream was admitted as."""
    if size > MAX_REPORT_BYTES:
        return f"report of {size} bytes is over the {MAX_REPORT_BYTES}-byte bound"
    if report.node_id != stream_node:
        return f"report is about node {report.node_id[:64]!r}; this stream reports for node {stream_node!r} only"
    if len(report.listeners) > MAX_LISTENERS:
        return f"{len(report.listeners)} listeners in one report (at most {MAX_LISTENERS})"
    clients = sum(len(entry.clients) for entry in report.listeners)
    if clients > MAX_CLIENTS:
        return f"{clients} client certificates in one report (at most {MAX_CLIENTS})"
    if len(report.revalidations) > MAX_REVALIDATIONS or any(
            len(r.closed_fingerprints) > MAX_CLOSED_FINGERPRINTS for r in report.revalidations):
        return f"too many revalidations or closed fingerprints (at most {MAX_REVALIDATIONS} / {MAX_CLOSED_FINGERPRINTS})"
    for done in report.revalidations:
        if max(len(done.type_url), len(done.version)) > MAX_STRING or any(
                len(f) > FINGERPRINT_LENGTH for f in done.closed_fingerprints):
            return (f"revalidations: type_url/version over {MAX_STRING} characters or a closed fingerprint "
                    f"over {FINGERPRINT_LENGTH} (SHA-256 hex)")
        if done.closed < 0 or done.checked < 0:
            return "revalidations: a negative count"
    problem = _backend_health_problem(report)
    if problem:
        return problem
    for entry in report.listeners:
        if max(len(entry.handshakes), len(entry.requests)) > MAX_COUNT_ENTRIES:
            return f"listener {entry.listener[:64]!r}: more than {MAX_COUNT_ENTRIES} count entries"
        if len(entry.shadow_disagreements) > MAX_SHADOW_ENTRIES:
            return f"listener {entry.listener[:64]!r}: more than {MAX_SHADOW_ENTRIES} shadow entries"
        strings = [entry.listener, entry.config_version, *(h.error for h in entry.handshakes),
                   *(s for c in entry.clients for s in (c.fingerprint_sha256, c.subject, c.issuer, c.serial, c.error)),
                   *(s for d in entry.shadow_disagreements
                     for s in (d.candidate, d.candidate_version, d.fingerprint_sha256, d.active_error, d.candidate_error))]
        if any(len(s) > MAX_STRING for s in strings):
            return f"listener {entry.listener[:64]!r}: a string field over {MAX_STRING} characters"
        counts = [*(h.count for h in entry.handshakes), *(r.count for r in entry.requests),
                  *(c.count for c in entry.clients), *(d.count for d in entry.shadow_disagreements),
                  entry.revalidation_closed, entry.shadow_judged]
        if any(n < 0 for n in counts):
            return f"listener {entry.listener[:64]!r}: a negative count"
    return ""


def _backend_health_problem(report: reports_pb2.NodeReport) -> str:
    sizes = [len(s.endpoints) for s in report.backend_services]
    if len(sizes) > MAX_ENDPOINT_ENTRIES or sum(sizes) > MAX_ENDPOINT_ENTRIES or max(sizes, default=0) > MAX_SERVICE_ENDPOINTS:
        return (f"{sum(sizes)} backend endpoints of {len(sizes)} services in one report (at most "
                f"{MAX_SERVICE_ENDPOINTS} per service and {MAX_ENDPOINT_ENTRIES} in all)")
    for service in report.backend_services:
        strings = [service.backend_service, *(s for e in service.endpoints for s in (e.address, e.last_error))]
        if any(len(s) > MAX_STRING for s in strings):
            return f"backend service {service.backend_service[:64]!r}: a string field over {MAX_STRING} characters"
        if any(e.failures < 0 or e.ejections < 0 for e in service.endpoints):
            return f"backend service {service.backend_service[:64]!r}: a negative count"
    return ""


@dataclass
class HandshakeTotals:
    judged: int = 0  # handshakes the listener's policy judged
    rejected: int = 0  # … of which the policy did not accept
    reports: int = 0  # reports that counted


def _selected(stored: Iterable[StoredReport], node_ids: Sequence[str] | None, since: float | None,
              until: float | None) -> Iterable[StoredReport]:
    wanted = None if node_ids is None else set(node_ids)
    for s in stored:
        if wanted is not None and s.node_id not in wanted:
            continue
        if (since is not None and s.received_at < since) or (until is not None and s.received_at >= until):
            continue
        yield s


def handshake_totals(stored: Iterable[StoredReport], *, node_ids: Sequence[str] | None = None,
                     listener: str | None = None, since: float | None = None,
                     until: float | None = None) -> HandshakeTotals:
    """Handshakes judged and rejected on `listener` (all listeners when None) by the given nodes, over
    reports received in [since, until)."""
    out = HandshakeTotals()
    for s in _selected(stored, node_ids, since, until):
        counted = False
        for entry in s.report.listeners:
            if listener is not None and entry.listener != listener:
                continue
            counted = True
            for h in entry.handshakes:
                out.judged += h.count
                out.rejected += 0 if h.accepted else h.count
        out.reports += counted
    return out


@dataclass
class ClientRow:
    """One client certificate across the fleet (the inventory, SPEC §12)."""

    fingerprint_sha256: str
    subject: str = ""
    issuer: str = ""
    serial: str = ""
    not_after: float = 0.0  # 0 = no certificate / unknown
    verified: bool = False
    accepted: bool = False
    error: str = ""
    allowlisted: bool = False
    first_seen: float = 0.0
    last_seen: float = 0.0
    count: int = 0
    nodes: set[str] = field(default_factory=set)
    listeners: set[str] = field(default_factory=set)
    expired: bool = False  # past notAfter at the inventory's `now`

    def days_to_expiry(self, now: float) -> float | None:
        return (self.not_after - now) / 86_400 if self.not_after else None

    @property
    def expired_allowlisted(self) -> bool:
        """Allowlisted and expired: GCP accepts these silently; we flag them."""
        return self.allowlisted and self.expired


def client_inventory(stored: Iterable[StoredReport], *, now: float, listener: str = "",
                     rejected_only: bool = False, expiring_within: float | None = None) -> list[ClientRow]:
    """Every client certificate the reports saw, one row per certificate and listener (a certificate can be
    refused on one listener and let through on another), merged over nodes with the latest verdict,
    newest last-seen first. `expiring_within`: seconds; keeps certificates whose notAfter is before now + that."""
    rows: dict[tuple[str, str], ClientRow] = {}
    for s in stored:
        for entry in s.report.listeners:
            if listener and entry.listener != listener:
                continue
            for c in entry.clients:
                row = rows.setdefault((c.fingerprint_sha256, entry.listener), ClientRow(c.fingerprint_sha256))
                last = c.last_seen.ToNanoseconds() / 1e9 if c.HasField("last_seen") else s.received_at
                first = c.first_seen.ToNanoseconds() / 1e9 if c.HasField("first_seen") else last
                if last >= row.last_seen:  # the newest sighting's verdict and details
                    row.subject, row.issuer, row.serial = c.subject, c.issuer, c.serial
                    row.not_after = c.not_after.ToNanoseconds() / 1e9 if c.HasField("not_after") else 0.0
                    row.verified, row.accepted, row.error, row.allowlisted = c.verified, c.accepted, c.error, c.allowlisted
                    row.last_seen = last
                row.first_seen = min(row.first_seen or first, first)
                row.count += c.count
                row.nodes.add(s.node_id)
                row.listeners.add(entry.listener)
    out = []
    for row in rows.values():
        row.expired = bool(row.not_after) and row.not_after < now
        if rejected_only and row.accepted:
            continue
        if expiring_within is not None and not (row.not_after and row.not_after < now + expiring_within):
            continue
        out.append(row)
    out.sort(key=lambda r: (-r.last_seen, r.fingerprint_sha256, sorted(r.listeners)))
    return out
