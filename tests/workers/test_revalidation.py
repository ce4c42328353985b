"""Node side of revocation latency (B6), pure: worker results merged per version, the report's
RevalidationDone, and the reporter's pace under the control plane's rate bound."""

from __future__ import annotations

import itertools

from mtlsgate import resource_types as rt

from data_plane.node.report import build_report
from data_plane.node.reporter import PACE_BURST, Pace
from data_plane.workers import revalidation as rv
from data_plane.workers.revalidation import Revalidations


def test_worker_results_merge_into_one_per_version_and_are_bounded() -> None:
    r = Revalidations()
    r.add("w1", 3, ["a" * 64], 1, 10.2)
    r.add("w1", 2, ["a" * 64, "b" * 64], 2, 10.4)  # the same leaf on two workers: listed once
    r.add("other", 1, [], 0, 9.0)
    done = r.seal("w1", {rt.TRUST_BUNDLE: "tb1", rt.LISTENER: "l1"}.items(), 10.0)
    assert done is not None and r.pending()
    assert (done.checked, done.closed, done.closed_fingerprints, done.done_time) == (5, 3, ("a" * 64, "b" * 64), 10.4)
    assert r.seal("never-revalidated", (), 11.0) is None
    assert r.take() == [done] and r.take() == []
    r.add("big", 5_000, [f"{i:064x}" for i in range(5_000)], 5_000, 1.0)
    assert len(r.seal("big", (), 0.5).closed_fingerprints) == rv.MAX_FINGERPRINTS
    for i in range(rv.MAX_VERSIONS + 10):
        r.add(f"v{i}", 1, [], 0, 1.0)
    assert r.seal("v0", (), 0.0) is None  # the oldest unsealed versions were dropped


def test_the_report_carries_revalidation_done_under_the_trust_bundle_version() -> None:
    r = Revalidations()
    r.add("w", 1, ["c" * 64], 1, 20.5)
    done = r.seal("w", {rt.TRUST_BUNDLE: "tb9"}.items(), 20.0)
    report = build_report("n", 1, 21.0, 5.0, {}, [], {rt.TRUST_BUNDLE: "tb9"}, revalidations=[done])
    (entry,) = report.revalidations
    assert (entry.type_url, entry.version, entry.closed, entry.checked) == (rt.TRUST_BUNDLE, "tb9", 1, 1)
    assert list(entry.closed_fingerprints) == ["c" * 64]
    assert entry.applied_time.ToNanoseconds() == 20_000_000_000 and entry.done_time.ToNanoseconds() == 20_500_000_000


def test_the_reporters_pace_stays_under_the_control_planes_bound() -> None:
    """Burst of 5 then 1/s at the control plane: the reporter sends at most 4 at once, then 1/s."""
    pace = Pace(0.0)
    sent = []
    now = 0.0
    while now < 10.0:
        wait = pace.wait(now)
        now += wait
        pace.take(now)
        sent.append(now)
    assert sent[:int(PACE_BURST)] == [0.0] * int(PACE_BURST)
    later = sent[int(PACE_BURST):]
    assert all(b - a >= 0.999 for a, b in itertools.pairwise(later))
    # The control plane's bucket (burst 5, 1/s) accepts every one of them.
    tokens, at = 5.0, 0.0
    for t in sent:
        tokens = min(5.0, tokens + (t - at))
        at = t
        assert tokens >= 1
        tokens -= 1
