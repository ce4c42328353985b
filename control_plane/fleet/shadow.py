"""Shadow status (pure): what the fleet's node reports say about one shadow candidate (SPEC §12) — the
handshakes judged under it and where its verdict differs from the active one, summed across nodes and
listeners, for the candidate revision (etag) now stored. Reports about older revisions do not count."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mtlsgate.v1 import reports_pb2

Direction = reports_pb2.ShadowDisagreement.Direction
MAX_FINDINGS = 100  # distinct (direction, fingerprint, errors) shown by status, most frequent first


@dataclass(frozen=True)
class Finding:
    direction: int
    fingerprint_sha256: str
    active_error: str
    candidate_error: str
    count: int
    nodes: tuple[str, ...]
    listeners: tuple[str, ...]
    last_seen: float


@dataclass(frozen=True)
class ShadowSummary:
    judged: int = 0
    would_newly_reject: int = 0
    would_newly_accept: int = 0
    findings: tuple[Finding, ...] = ()
    nodes: tuple[str, ...] = ()


@dataclass
class _Acc:
    count: int = 0
    nodes: set[str] = field(default_factory=set)
    listeners: set[str] = field(default_factory=set)
    last_seen: float = 0.0


def summarise(reports: Iterable[tuple[str, float, reports_pb2.NodeReport]], candidate: str,
              candidate_version: str, *, max_findings: int = MAX_FINDINGS) -> ShadowSummary:
    """`reports`: (node_id, received_at, report) as the store keeps them; the node ID is the one the stream
    authenticated, so a report never speaks for another node. `candidate`: trustConfigs/ID or
    serverTlsPolicies/ID; `candidate_version`: its etag now."""
    judged = 0
    judging: set[str] = set()
    acc: dict[tuple[int, str, str, str], _Acc] = {}
    for node_id, received_at, report in reports:
        for listener in report.listeners:
            mine = [d for d in listener.shadow_disagreements
                    if d.candidate == candidate and d.candidate_version == candidate_version]
            for d in mine:
                # Per candidate, a node sends one entry with direction UNSPECIFIED whose count is the
                # handshakes it judged under it (shadow_judged is the listener's total over its candidates).
                if d.direction == Direction.DIRECTION_UNSPECIFIED:
                    judged += max(0, d.count)
                    judging.add(node_id)
            mine = [d for d in mine if d.direction != Direction.DIRECTION_UNSPECIFIED]
            for d in mine:
                key = (int(d.direction), d.fingerprint_sha256, d.active_error, d.candidate_error)
                entry = acc.setdefault(key, _Acc())
                entry.count += max(0, d.count)
                entry.nodes.add(node_id)
                entry.listeners.add(listener.listener)
                entry.last_seen = max(entry.last_seen, received_at)
    findings = sorted((Finding(k[0], k[1], k[2], k[3], a.count, tuple(sorted(a.nodes)), tuple(sorted(a.listeners)),
                               a.last_seen) for k, a in acc.items()),
                      key=lambda f: (-f.count, f.direction, f.fingerprint_sha256, f.candidate_error))
    reject = sum(f.count for f in findings if f.direction == Direction.WOULD_NEWLY_REJECT)
    accept = sum(f.count for f in findings if f.direction == Direction.WOULD_NEWLY_ACCEPT)
    return ShadowSummary(judged, reject, accept, tuple(findings[:max_findings]), tuple(sorted(judging)))


def new_rejects(reports: Iterable[tuple[str, float, reports_pb2.NodeReport]], node_ids: Iterable[str]) -> int:
    """The roll-out gate shadowNoNewRejects' input: handshakes any shadow candidate would newly reject on
    these nodes, in these reports."""
    wanted = set(node_ids)
    return sum(d.count for node_id, _, report in reports if node_id in wanted
               for listener in report.listeners for d in listener.shadow_disagreements
               if d.direction == Direction.WOULD_NEWLY_REJECT)
