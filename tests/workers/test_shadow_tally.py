"""The shadow tally and its report entries (SPEC §12), pure: bounded per listener, totals never lost, the
judged-count convention control_plane/fleet/shadow.py reads, and the control plane's summary of them."""

from __future__ import annotations

from mtlsgate.v1 import reports_pb2

from control_plane.fleet.aggregate import report_problem
from control_plane.fleet.shadow import summarise
from data_plane.node.report import build_report, shadow_entries
from data_plane.workers.shadow_tally import (
    MAX_ENTRIES,
    OVERFLOW,
    WOULD_NEWLY_ACCEPT,
    WOULD_NEWLY_REJECT,
    ShadowTally,
)

TC = "trustConfigs/demo"


def test_the_tally_itemises_at_most_the_bound_and_counts_the_rest():
    tally = ShadowTally(limit=4)
    for i in range(10):
        tally.judged("listeners/a", TC, "e1")
        tally.disagreed("listeners/a", TC, "e1", WOULD_NEWLY_REJECT, f"fp{i}", "", "unknown root")
    tally.disagreed("listeners/b", TC, "e1", WOULD_NEWLY_ACCEPT, "fpb", "untrusted", "")
    rows = tally.take()
    a = [r for r in rows if r[0] == "listeners/a" and r[3]]
    assert len(a) == 5 and sum(r[7] for r in a) == 10  # 4 itemised + one overflow entry
    assert next(r for r in a if r[6] == OVERFLOW)[7] == 6
    assert [r[7] for r in rows if r[0] == "listeners/a" and r[3] == 0] == [10]
    assert [r for r in rows if r[0] == "listeners/b"] == [("listeners/b", TC, "e1", 2, "fpb", "untrusted", "", 1)]
    assert tally.take() == [] and len(tally) == 0


def test_merging_workers_keeps_the_bound_and_the_sums():
    pool = ShadowTally(limit=3)
    for worker in range(3):
        t = ShadowTally(limit=3)
        for i in range(3):
            t.judged("listeners/a", TC, "e1")
            t.disagreed("listeners/a", TC, "e1", WOULD_NEWLY_REJECT, f"w{worker}-{i}", "", "x")
        pool.merge(t.take())
    rows = pool.take()
    assert sum(r[7] for r in rows if r[3] == 0) == 9
    assert sum(r[7] for r in rows if r[3] == WOULD_NEWLY_REJECT) == 9
    assert len([r for r in rows if r[3]]) == 4


def test_report_entries_are_bounded_and_lose_no_count():
    rows = [("listeners/a", TC, "e1", 0, "", "", "", 500), ("listeners/a", "serverTlsPolicies/p", "e2", 0, "", "", "", 500)]
    rows += [("listeners/a", TC, "e1", WOULD_NEWLY_REJECT, f"{i:064x}", "", "err", 1 + i % 3) for i in range(100)]
    rows += [("listeners/a", "serverTlsPolicies/p", "e2", WOULD_NEWLY_ACCEPT, f"{i:064x}", "bad", "", 1) for i in range(100)]
    entries = shadow_entries(rows)["listeners/a"]
    assert len(entries) == MAX_ENTRIES
    rejects = sum(d.count for d in entries if d.direction == WOULD_NEWLY_REJECT)
    accepts = sum(d.count for d in entries if d.direction == WOULD_NEWLY_ACCEPT)
    assert rejects == sum(1 + i % 3 for i in range(100)) and accepts == 100
    assert [d.count for d in entries[:2]] == [500, 500]  # the judged entries come first, always kept

    report = build_report("n1", 1, 100.0, 5.0, {}, [], {}, shadow=rows)
    listener, = report.listeners
    assert listener.shadow_judged == 1000 and len(listener.shadow_disagreements) == MAX_ENTRIES
    assert report_problem(report, "n1", report.ByteSize()) == ""
    summary = summarise([("n1", 100.0, report)], TC, "e1")
    assert summary.judged == 500 and summary.would_newly_reject == rejects and summary.nodes == ("n1",)
    assert summary.findings[0].candidate_error in ("err", OVERFLOW)


def test_a_report_without_candidates_has_no_shadow_fields():
    report = build_report("n1", 1, 100.0, 5.0, {}, [], {})
    assert list(report.listeners) == []
    assert reports_pb2.ListenerReport().shadow_judged == 0
