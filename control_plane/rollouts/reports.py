"""The maxRejectIncrease gate's input from node reports (glue): the handshakes the store's reports
(SPEC §12, `NodeReportService`) count for given nodes between two times, summed over listeners, through
`control_plane.fleet.aggregate.handshake_totals`. Until the store keeps reports there is nothing to read:
the source answers None and a configured gate halts at the end of the bake rather than pass blind."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from control_plane.rollouts.gates import RejectWindow

log = logging.getLogger("mtlsgate.rollouts")


def store_rejects(store: Any) -> Any:
    """A `RejectSource` over `store.reports(since, node_ids)`, or None when the store keeps no reports."""
    if not callable(getattr(store, "reports", None)):
        return None
    try:
        from mtlsgate.v1 import reports_pb2  # type: ignore[attr-defined]

        from control_plane.fleet.aggregate import StoredReport, handshake_totals  # type: ignore[import-not-found]
    except ImportError:
        return None

    def rejects(node_ids: Sequence[str], since: float, until: float) -> RejectWindow | None:
        try:
            stored = []
            for node_id, received_at, data in store.reports(since=since, node_ids=list(node_ids)):
                if received_at >= until:
                    continue
                report = reports_pb2.NodeReport()
                report.ParseFromString(data)
                stored.append(StoredReport(node_id, received_at, report))
            if not stored:
                return None
            listeners = sorted({entry.listener for s in stored for entry in s.report.listeners})
            totals = [handshake_totals(stored, node_ids=list(node_ids), listener=name, since=since, until=until)
                      for name in listeners]
            if not any(t.reports for t in totals):
                return None
            return RejectWindow(sum(t.judged for t in totals), sum(t.rejected for t in totals))
        except Exception:  # a report the aggregation cannot read must not stop the driver: no evidence
            log.exception("reading node reports for the maxRejectIncrease gate failed")
            return None

    return rejects


def store_shadow_rejects(store: Any) -> Any:
    """The shadowNoNewRejects gate's input over `store.reports`: handshakes any shadow candidate would
    newly reject on the wave's nodes between two times (`control_plane.fleet.shadow.new_rejects`), or None
    when none of them judged a handshake under a candidate then (no evidence: the gate halts rather than
    pass blind). None when the store keeps no reports."""
    if not callable(getattr(store, "reports", None)):
        return None
    from mtlsgate.v1 import reports_pb2

    from control_plane.fleet.shadow import new_rejects

    def shadow(node_ids: Sequence[str], since: float, until: float) -> int | None:
        try:
            stored = []
            for node_id, received_at, data in store.reports(since=since, node_ids=list(node_ids)):
                if received_at < until:
                    stored.append((node_id, received_at, reports_pb2.NodeReport.FromString(data)))
            if not any(entry.shadow_judged for _, _, report in stored for entry in report.listeners):
                return None
            return new_rejects(stored, node_ids)
        except Exception:  # a report the aggregation cannot read must not stop the driver: no evidence
            log.exception("reading node reports for the shadowNoNewRejects gate failed")
            return None

    return shadow
