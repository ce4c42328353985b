"""The revocation tracker (B6), pure: publication from state diffs, ACKs, revalidation reports, bounds."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mtlsgate.v1 import reports_pb2, resources_pb2

from control_plane.fleet import revocations as rv
from control_plane.fleet.aggregate import report_problem
from control_plane.fleet.revocations import RevocationTracker

_KEY = ec.generate_private_key(ec.SECP256R1())
_NAME = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "test CA")])


def _crl(serials: list[int]) -> str:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    builder = x509.CertificateRevocationListBuilder().issuer_name(_NAME).last_update(start).next_update(
        start + dt.timedelta(days=1))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start).build())
    return builder.sign(_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _tc(serials: list[int], name: str = "trustConfigs/demo") -> dict[str, resources_pb2.TrustConfig]:
    tc = resources_pb2.TrustConfig(name=name)
    tc.trust_stores.add().crls.add(pem_crl=_crl(serials))
    return {name: tc}


def _serving(*nodes: str):
    return lambda names: list(nodes)


def _published(tracker: RevocationTracker, nodes=("a", "b")) -> rv.Revocation:
    assert tracker.on_state(1, 100.0, _tc([1]), _serving(*nodes)) is None  # baseline: nothing revoked "now"
    revocation = tracker.on_state(2, 200.0, _tc([1, 0xBEEF]), _serving(*nodes))
    assert revocation is not None
    return revocation


def test_a_write_that_adds_serials_is_published_with_the_nodes_serving_it() -> None:
    tracker = RevocationTracker()
    revocation = _published(tracker)
    assert (revocation.revision, revocation.published_at, revocation.serials, revocation.serial_count) == \
        (2, 200.0, ("beef",), 1)
    assert revocation.trust_configs == ("trustConfigs/demo",) and sorted(revocation.nodes) == ["a", "b"]
    # Other writes (same CRL, a removed serial, a new TrustConfig) revoke nothing.
    assert tracker.on_state(3, 300.0, _tc([1, 0xBEEF]), _serving("a")) is None
    assert tracker.on_state(4, 400.0, _tc([0xBEEF]), _serving("a")) is None
    assert tracker.on_state(5, 500.0, {**_tc([0xBEEF]), **_tc([7], "trustConfigs/new")}, _serving("a")) is None


def test_ack_then_revalidation_enforces_and_the_time_stays_within_publication_and_ack() -> None:
    tracker = RevocationTracker()
    revocation = _published(tracker)
    assert tracker.on_ack("a", "v1", 1, 150.0) == []  # an older revision's bundle: not this revocation's ACK
    assert not revocation.nodes["a"].acked_at
    assert tracker.on_ack("a", "v2", 2, 200.5) == []
    enforced = tracker.on_revalidation("a", "v2", 200.3, 2, 3, ["f" * 64, "e" * 64], 200.6)
    assert [(e.node.node_id, round(e.seconds, 3), e.node.closed, e.node.checked) for e in enforced] == \
        [("a", 0.3, 2, 3)]
    # A node clock ahead of ours: never later than the ACK; behind: never before publication.
    tracker.on_ack("b", "v2", 2, 200.4)
    (late,) = tracker.on_revalidation("b", "v2", 999.0, 0, 0, [], 200.5)
    assert late.seconds == pytest.approx(0.4)
    assert tracker.on_revalidation("b", "v2", 1.0, 0, 0, [], 200.5) == []  # already enforced: once only


def test_a_report_that_overtakes_its_ack_counts_once_the_ack_arrives() -> None:
    tracker = RevocationTracker()
    revocation = _published(tracker)
    assert tracker.on_revalidation("a", "v2", 200.2, 1, 1, [], 200.3) == []
    (enforced,) = tracker.on_ack("a", "v2", 2, 200.4)
    assert enforced.seconds == pytest.approx(0.2) and revocation.nodes["a"].closed == 1


def test_revalidation_for_a_version_the_node_never_acked_is_ignored() -> None:
    """Attacker: node b reports done for the version node a ACKed, and for one nobody ACKed."""
    tracker = RevocationTracker()
    revocation = _published(tracker)
    tracker.on_ack("a", "v2", 2, 200.5)
    assert tracker.on_revalidation("b", "v2", 200.1, 5, 5, [], 200.6) == []
    assert tracker.on_revalidation("a", "forged", 200.1, 5, 5, [], 200.6) == []
    assert not revocation.nodes["b"].enforced_at and not revocation.nodes["a"].enforced_at
    # … and a node that was not serving the TrustConfig never gets a row, whatever it ACKs.
    tracker.on_ack("c", "v2", 2, 200.7)
    assert tracker.on_revalidation("c", "v2", 200.1, 0, 0, [], 200.8) == [] and "c" not in revocation.nodes
    # The early report of b expires: an ACK long after does not bring it back.
    assert tracker.on_ack("b", "v2", 2, 200.6 + rv.EARLY_SECONDS + 1) == []


def test_bounds_revocations_nodes_fingerprints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rv, "MAX_NODES", 3)
    tracker = RevocationTracker()
    tracker.on_state(1, 1.0, _tc([]), _serving())
    for i in range(rv.MAX_REVOCATIONS + 5):
        tracker.on_state(2 + i, 2.0 + i, _tc(list(range(1, i + 2))), _serving("a", "b", "c", "d", "e"))
    assert len(tracker.latest) == rv.MAX_REVOCATIONS and tracker.latest[0].sequence == rv.MAX_REVOCATIONS + 5
    assert len(tracker.latest[0].nodes) == 3 and tracker.latest[0].untracked == 2
    assert len(tracker.list(5)) == 5
    tracker.on_ack("a", "v", 10_000, 50.0)
    enforced = tracker.on_revalidation("a", "v", 49.0, 2_000, 2_000, ["f" * 64] * 2_000, 50.0)
    assert enforced and all(len(e.node.closed_fingerprints) == rv.MAX_FINGERPRINTS for e in enforced)


def test_reports_with_oversized_or_negative_revalidations_are_refused() -> None:
    """Attacker: the bounds on RevalidationDone (count of fingerprints, their length, negative counts)."""
    def report(**fields) -> reports_pb2.NodeReport:
        r = reports_pb2.NodeReport(node_id="a")
        r.revalidations.add(type_url="t", version="v", **fields)
        return r

    assert report_problem(report(closed=1, closed_fingerprints=["f" * 64]), "a", 10) == ""
    assert "closed fingerprints" in report_problem(report(closed_fingerprints=["f" * 64] * 1_001), "a", 10)
    assert "over 64" in report_problem(report(closed_fingerprints=["f" * 65]), "a", 10)
    assert "negative" in report_problem(report(closed=-1), "a", 10)
    assert "negative" in report_problem(report(checked=-1), "a", 10)
    assert "this stream reports for node 'a' only" in report_problem(reports_pb2.NodeReport(node_id="b"), "a", 10)


def test_a_bundle_version_that_carries_the_revocation_counts_whatever_revision_it_was_pushed_with() -> None:
    """A node held at a roll-out's base revision gets the revocation merged into base snapshots (numbered
    with the base's revision): their version is declared to carry it, so that node's ACK counts."""
    tracker = RevocationTracker()
    revocation = _published(tracker)
    tracker.cover("base+revocation", 2)
    tracker.on_ack("a", "base+revocation", 1, 200.2)
    tracker.on_ack("b", "base-only", 1, 200.3)
    assert revocation.nodes["a"].acked_at == 200.2 and not revocation.nodes["b"].acked_at


def test_an_ack_counts_once_per_row_and_covers_every_revocation_up_to_its_revision() -> None:
    """Each revocation counts the rows still waiting for an ACK (an ACK skips the ones with none: at 10,000
    nodes a push brings 10,000 ACKs, each otherwise a look-up in every kept revocation)."""
    tracker = RevocationTracker()
    first = _published(tracker)
    second = tracker.on_state(3, 300.0, _tc([1, 0xBEEF, 0xCAFE]), _serving("a", "b"))
    assert second is not None and (first.unacked, second.unacked) == (2, 2)
    tracker.on_ack("a", "v2", 2, now=250.0)  # covers the first only
    assert (first.unacked, second.unacked) == (1, 2) and first.nodes["a"].acked_at == 250.0
    assert not second.nodes["a"].acked_at
    tracker.on_ack("a", "v3", 3, now=350.0)
    tracker.on_ack("a", "v3", 3, now=360.0)  # a repeated ACK changes nothing
    assert (first.unacked, second.unacked) == (1, 1)
    assert (first.nodes["a"].acked_at, second.nodes["a"].acked_at, second.nodes["a"].acked_version) == \
        (250.0, 350.0, "v3")
    tracker.on_ack("b", "v3", 3, now=370.0)
    assert (first.unacked, second.unacked) == (0, 0)
    assert first.nodes["b"].acked_at == second.nodes["b"].acked_at == 370.0


def test_node_rows_are_bounded_over_all_kept_revocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """With many nodes fewer revocations are kept: the oldest go first once the rows of all of them pass
    MAX_ROWS (at 10,000 nodes, 32 revocations of full rows were ~150 MB: B4's memory)."""
    monkeypatch.setattr(rv, "MAX_ROWS", 10)
    tracker = RevocationTracker()
    tracker.on_state(1, 1.0, _tc([]), _serving())
    nodes = [f"n{i}" for i in range(4)]
    for i in range(6):
        tracker.on_state(2 + i, 2.0 + i, _tc(list(range(1, i + 2))), _serving(*nodes))
    assert [r.sequence for r in tracker.latest] == [6, 5]  # two of 4 rows fit in 10, a third would not
    big = [f"m{i}" for i in range(25)]  # a revocation larger than the bound alone is still kept
    tracker.on_state(9, 9.0, _tc(list(range(1, 10))), _serving(*big))
    assert [r.sequence for r in tracker.latest] == [7] and len(tracker.latest[0].nodes) == 25
    tracker.on_state(10, 10.0, _tc(list(range(1, 11))), _serving(*nodes))
    assert [r.sequence for r in tracker.latest] == [8]
