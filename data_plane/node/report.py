"""One NodeReport from what the workers counted (SPEC §12) — pure: counter deltas and client rows in, a
`reports_pb2.NodeReport` out. The reporter (reporter.py) does the timing and the stream."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp
from mtlsgate import resource_types as rt
from mtlsgate.v1 import reports_pb2

from data_plane.workers.client_tally import Row
from data_plane.workers.observability import REPORT_HANDSHAKES
from data_plane.workers.revalidation import Revalidation
from data_plane.workers.shadow_tally import MAX_ENTRIES as MAX_SHADOW_ENTRIES
from data_plane.workers.shadow_tally import NO_DISAGREEMENT, OVERFLOW
from data_plane.workers.shadow_tally import Row as ShadowRow

REQUESTS = "mtlsgate_requests_total"
REVALIDATION_CLOSED = "mtlsgate_connections_closed_by_revalidation_total"
MAX_STRING = 1_024  # the control plane's bound on one string field
MAX_CLIENTS = 1_000  # per report (SPEC §12), newest kept

CounterKey = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class LeafDetails:
    fingerprint_sha256: str
    subject: str = ""
    issuer: str = ""
    serial: str = ""
    not_after: float = 0.0


def leaf_details(der: bytes) -> LeafDetails:
    """What the inventory shows of a client certificate; a DER we cannot parse keeps its fingerprint."""
    if not der:
        return LeafDetails("")
    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        cert = x509.load_der_x509_certificate(der)
        return LeafDetails(fingerprint, cert.subject.rfc4514_string()[:MAX_STRING],
                           cert.issuer.rfc4514_string()[:MAX_STRING], format(cert.serial_number, "x"),
                           cert.not_valid_after_utc.timestamp())
    except ValueError:
        return LeafDetails(fingerprint)


def config_version(versions: Mapping[str, str]) -> str:
    """The node's configuration as one string: `Listener=…,TrustBundle=…` (sorted by type)."""
    return ",".join(f"{rt.short_type(t)}={v}" for t, v in sorted(versions.items()))[:MAX_STRING]


def delta(now: Mapping[CounterKey, int], before: Mapping[CounterKey, int]) -> Counter[CounterKey]:
    """What the monotonic counters added since `before` (a counter that went down — a worker's restart
    lost nothing: the pool keeps a dead worker's counts — is taken as it is now)."""
    out: Counter[CounterKey] = Counter()
    for key, value in now.items():
        added = value - before.get(key, 0)
        if added > 0:
            out[key] = added
    return out


def _ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def shadow_entries(rows: Iterable[ShadowRow], limit: int = MAX_SHADOW_ENTRIES
                   ) -> dict[str, list[reports_pb2.ShadowDisagreement]]:
    """Per listener, at most `limit` ShadowDisagreement entries (the control plane's bound): first one per
    candidate with direction UNSPECIFIED whose count is the handshakes judged under it (the convention
    control_plane/fleet/shadow.py reads), then the most frequent disagreements; those that do not fit are
    summed into one OVERFLOW entry per (candidate, revision, direction), so no count is lost."""
    by_listener: dict[str, list[ShadowRow]] = {}
    for row in rows:
        by_listener.setdefault(row[0], []).append(row)
    out: dict[str, list[reports_pb2.ShadowDisagreement]] = {}
    for listener, mine in by_listener.items():
        judged = [r for r in mine if r[3] == NO_DISAGREEMENT]
        items = sorted((r for r in mine if r[3] != NO_DISAGREEMENT), key=lambda r: (r[6] == OVERFLOW, -r[7]))
        space = limit - len(judged)
        if len(items) > space:
            groups = {r[1:4] for r in items}
            kept, folded = items[:max(0, space - len(groups))], items[max(0, space - len(groups)):]
            sums: dict[tuple[str, str, int], int] = {}
            for r in folded:
                sums[r[1:4]] = sums.get(r[1:4], 0) + r[7]
            items = kept + [(listener, *g, "", "", OVERFLOW, n) for g, n in sorted(sums.items())]
        out[listener] = [reports_pb2.ShadowDisagreement(
            candidate=candidate[:MAX_STRING], candidate_version=version[:MAX_STRING], direction=way,  # type: ignore[arg-type]
            fingerprint_sha256=fingerprint[:MAX_STRING], active_error=active_error[:MAX_STRING],
            candidate_error=candidate_error[:MAX_STRING], count=count)
            for _, candidate, version, way, fingerprint, active_error, candidate_error, count in judged + items][:limit]
    return out


def build_report(node_id: str, sequence: int, now: float, interval: float, counts: Mapping[CounterKey, int],
                 clients: Iterable[Row], versions: Mapping[str, str],
                 details: Callable[[bytes], LeafDetails] = leaf_details, *,
                 shadow: Iterable[ShadowRow] = (), revalidations: Iterable[Revalidation] = ()) -> reports_pb2.NodeReport:
    """A report of one interval: `counts` is the counters' delta over it, `clients` the tally's rows,
    `shadow` the shadow tally's rows (shadow_tally.Row), `revalidations` what revalidation on update did
    for the versions applied since the last report."""
    report = reports_pb2.NodeReport(node_id=node_id, sequence=sequence, interval_seconds=interval)
    report.time.CopyFrom(_ts(now))
    version = config_version(versions)
    listeners: dict[str, reports_pb2.ListenerReport] = {}

    def entry(name: str) -> reports_pb2.ListenerReport:
        if name not in listeners:
            listeners[name] = reports_pb2.ListenerReport(listener=name[:MAX_STRING], config_version=version)
        return listeners[name]

    classes: dict[str, Counter[str]] = {}
    for (metric, labels), n in sorted(counts.items()):
        if metric == REPORT_HANDSHAKES and len(labels) == 5:
            name, present, verified, accepted, error = labels
            entry(name).handshakes.add(present=bool(present), verified=bool(verified), accepted=bool(accepted),
                                       error=error[:MAX_STRING], count=n)
        elif metric == REQUESTS and len(labels) == 2:
            entry(labels[0])
            classes.setdefault(labels[0], Counter())[f"{labels[1][:1]}xx"] += n
        elif metric == REVALIDATION_CLOSED and len(labels) == 1:
            entry(labels[0]).revalidation_closed += n
    for name, by_class in classes.items():
        for status_class, n in sorted(by_class.items()):
            listeners[name].requests.add(status_class=status_class, count=n)
    rows = list(clients)[-MAX_CLIENTS:]  # the tally keeps the oldest sighting first: newest kept
    for listener, leaf, first, last, count, was_verified, was_accepted, error, allowlisted in rows:
        leaf_info = details(leaf)
        seen = entry(listener).clients.add(
            fingerprint_sha256=leaf_info.fingerprint_sha256, subject=leaf_info.subject, issuer=leaf_info.issuer,
            serial=leaf_info.serial, verified=was_verified, accepted=was_accepted, error=error[:MAX_STRING],
            count=count, allowlisted=allowlisted)
        if leaf_info.not_after:
            seen.not_after.CopyFrom(_ts(leaf_info.not_after))
        seen.first_seen.CopyFrom(_ts(first))
        seen.last_seen.CopyFrom(_ts(last))
    for name, entries in shadow_entries(shadow).items():
        entry(name).shadow_disagreements.extend(entries)
        entry(name).shadow_judged = sum(d.count for d in entries if d.direction == NO_DISAGREEMENT)
    report.listeners.extend(listeners[name] for name in sorted(listeners))
    for done in revalidations:  # B6: revoked serials are judged by the TrustBundle version they came with
        bundle_version = dict(done.versions).get(rt.TRUST_BUNDLE, "")
        entry_done = report.revalidations.add(type_url=rt.TRUST_BUNDLE, version=bundle_version, closed=done.closed,
                                              checked=done.checked, closed_fingerprints=done.closed_fingerprints)
        entry_done.applied_time.CopyFrom(_ts(done.applied_time))
        entry_done.done_time.CopyFrom(_ts(done.done_time))
    return report
