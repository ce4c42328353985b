"""Node reports' pure parts (SPEC §12): bounds, totals for the roll-out gates, the inventory merge, the
worker's bounded tally and the node's report builder."""

from __future__ import annotations

from types import SimpleNamespace

from mtlsgate.v1 import reports_pb2

from control_plane.fleet.aggregate import (
    MAX_CLIENTS,
    StoredReport,
    client_inventory,
    handshake_totals,
    report_problem,
)
from data_plane.node.report import build_report, delta
from data_plane.workers.client_tally import ClientTally
from data_plane.workers.observability import REPORT_HANDSHAKES


def _report(node: str, listener: str = "listeners/a", accepted: int = 0, rejected: int = 0) -> reports_pb2.NodeReport:
    r = reports_pb2.NodeReport(node_id=node)
    e = r.listeners.add(listener=listener)
    e.handshakes.add(present=True, verified=True, accepted=True, count=accepted)
    e.handshakes.add(present=True, verified=False, accepted=False, error="client_cert_revoked", count=rejected)
    return r


def test_handshake_totals_count_only_the_chosen_nodes_listener_and_window() -> None:
    stored = [StoredReport("a", 10.0, _report("a", accepted=8, rejected=2)),
              StoredReport("b", 11.0, _report("b", accepted=5, rejected=5)),
              StoredReport("a", 20.0, _report("a", "listeners/other", accepted=1)),
              StoredReport("a", 30.0, _report("a", accepted=100))]
    t = handshake_totals(stored, node_ids=["a"], listener="listeners/a", since=5, until=30)
    assert (t.judged, t.rejected, t.reports) == (10, 2, 1)
    t = handshake_totals(stored, since=0, until=31)
    assert (t.judged, t.rejected, t.reports) == (121, 7, 4)


def test_report_problem_names_what_crosses_a_bound() -> None:
    ok = _report("a", accepted=1)
    assert report_problem(ok, "a", ok.ByteSize()) == ""
    assert "for node 'a' only" in report_problem(_report("b"), "a", 10)
    assert "byte bound" in report_problem(ok, "a", 10**7)
    many = _report("a")
    for i in range(MAX_CLIENTS + 1):
        many.listeners[0].clients.add(fingerprint_sha256=f"{i:064x}")
    assert "client certificates in one report" in report_problem(many, "a", 10)
    negative = _report("a", accepted=-5)
    assert "negative" in report_problem(negative, "a", 10)
    long = _report("a")
    long.listeners[0].handshakes[0].error = "e" * 5000
    assert "string field" in report_problem(long, "a", 10)


def test_the_inventory_merges_nodes_keeps_the_latest_verdict_and_flags_expired_allowlisted() -> None:
    def seen(node: str, at: float, **fields: object) -> StoredReport:
        r = reports_pb2.NodeReport(node_id=node)
        c = r.listeners.add(listener="listeners/a").clients.add(fingerprint_sha256="f", count=2, **fields)
        c.last_seen.FromSeconds(int(at))
        c.first_seen.FromSeconds(int(at))
        c.not_after.FromSeconds(1000)
        return StoredReport(node, at, r)

    rows = client_inventory([seen("a", 100, accepted=False, error="expired"),
                             seen("b", 200, accepted=True, allowlisted=True)], now=2000)
    [row] = rows
    assert row.nodes == {"a", "b"} and row.count == 4 and row.first_seen == 100 and row.last_seen == 200
    assert row.accepted and row.expired and row.expired_allowlisted
    assert client_inventory([seen("a", 100)], now=2000, rejected_only=True) != []
    assert client_inventory([seen("a", 100, accepted=True)], now=2000, rejected_only=True) == []
    assert client_inventory([seen("a", 100)], now=500, expiring_within=100) == []
    assert len(client_inventory([seen("a", 100)], now=500, expiring_within=1000)) == 1


def test_the_worker_tally_is_bounded_and_keeps_the_newest() -> None:
    tally = ClientTally(limit=3)
    for i in range(5):
        tally.saw("l", SimpleNamespace(leaf=bytes([i]), chain_verified=True, accepted=True, error="", reason=""), i)
    tally.saw("l", SimpleNamespace(leaf=bytes([2]), chain_verified=False, accepted=False, error="x", reason=""), 9)
    rows = tally.take()
    assert [r[1] for r in rows] == [b"\x03", b"\x04", b"\x02"] and len(tally) == 0
    assert rows[-1][4] == 2 and rows[-1][7] == "x"  # two sightings, the latest verdict
    pool = ClientTally()
    pool.merge(rows)
    pool.merge(rows)
    assert [r[4] for r in pool.take()] == [2, 2, 4]


def test_the_node_builds_one_report_per_interval_from_counter_deltas() -> None:
    before = {(REPORT_HANDSHAKES, ("listeners/a", "1", "1", "1", "")): 5}
    now = {(REPORT_HANDSHAKES, ("listeners/a", "1", "1", "1", "")): 8,
           (REPORT_HANDSHAKES, ("listeners/a", "1", "", "", "client_cert_revoked")): 2,
           ("mtlsgate_requests_total", ("listeners/a", "200")): 4, ("mtlsgate_requests_total", ("listeners/a", "204")): 1,
           ("mtlsgate_requests_total", ("listeners/a", "403")): 1,
           ("mtlsgate_connections_closed_by_revalidation_total", ("listeners/a",)): 2}
    report = build_report("n", 7, 100.0, 5.0, delta(now, before), [], {"type.googleapis.com/mtlsgate.v1.Listener": "v1"})
    [entry] = report.listeners
    assert report.node_id == "n" and report.sequence == 7 and entry.config_version == "Listener=v1"
    assert sorted((h.accepted, h.error, h.count) for h in entry.handshakes) == [(False, "client_cert_revoked", 2),
                                                                               (True, "", 3)]
    assert {r.status_class: r.count for r in entry.requests} == {"2xx": 5, "4xx": 1}
    assert entry.revalidation_closed == 2


def test_a_certificate_refused_on_one_listener_and_let_through_on_another_is_two_rows() -> None:
    r = reports_pb2.NodeReport(node_id="a")
    r.listeners.add(listener="listeners/strict").clients.add(fingerprint_sha256="f", accepted=False,
                                                             error="client_cert_revoked", count=1)
    r.listeners.add(listener="listeners/permissive").clients.add(fingerprint_sha256="f", accepted=True,
                                                                 error="client_cert_revoked", count=1)
    rows = client_inventory([StoredReport("a", 10.0, r)], now=20)
    assert sorted((sorted(row.listeners)[0], row.accepted) for row in rows) == [
        ("listeners/permissive", True), ("listeners/strict", False)]
    [rejected] = client_inventory([StoredReport("a", 10.0, r)], now=20, rejected_only=True)
    assert rejected.listeners == {"listeners/strict"}


# ---------------------------------------------------------------- backend endpoint health (issue 16, fields 80-99)


def test_report_problem_bounds_backend_endpoint_health() -> None:
    from control_plane.fleet.aggregate import MAX_ENDPOINT_ENTRIES, MAX_SERVICE_ENDPOINTS

    ok = _report("a")
    service = ok.backend_services.add(backend_service="backendServices/app")
    for i in range(MAX_SERVICE_ENDPOINTS):
        service.endpoints.add(address=f"10.0.0.1:{8000 + i}", checked=True, healthy=i % 2 == 0, failures=3)
    assert report_problem(ok, "a", ok.ByteSize()) == ""
    wide = reports_pb2.NodeReport()
    wide.CopyFrom(ok)
    wide.backend_services[0].endpoints.add(address="10.0.0.2:1")  # 101 in one service
    assert report_problem(wide, "a", 10) \
        == "101 backend endpoints of 1 services in one report (at most 100 per service and 1000 in all)"
    many = _report("a")
    for j in range(MAX_ENDPOINT_ENTRIES // MAX_SERVICE_ENDPOINTS + 1):  # 1,100 in all, 100 per service
        many.backend_services.add().CopyFrom(service)
        many.backend_services[-1].backend_service = f"backendServices/s{j}"
    assert "1100 backend endpoints of 11 services" in report_problem(many, "a", 10)
    empty_services = _report("a")
    for j in range(MAX_ENDPOINT_ENTRIES + 1):
        empty_services.backend_services.add(backend_service=f"backendServices/s{j}")
    assert "of 1001 services" in report_problem(empty_services, "a", 10)
    negative = _report("a")
    negative.backend_services.add(backend_service="backendServices/x").endpoints.add(address="h:1", failures=-1)
    assert "backendServices/x" in report_problem(negative, "a", 10) and "negative" in report_problem(negative, "a", 10)
    long = _report("a")
    long.backend_services.add(backend_service="backendServices/x").endpoints.add(address="h:1", last_error="e" * 2000)
    assert "string field" in report_problem(long, "a", 10)


def test_latest_backend_health_is_each_nodes_newest_report() -> None:
    from control_plane.fleet.backend_health import latest_backend_health

    def report(node: str, at: float, healthy: bool, service: str = "backendServices/app") -> StoredReport:
        r = reports_pb2.NodeReport(node_id=node)
        r.backend_services.add(backend_service=service).endpoints.add(address="h:1", checked=True, healthy=healthy)
        return StoredReport(node, at, r)

    stored = [report("b", 5, True), report("a", 10, False), report("a", 20, True), report("c", 7, True, "backendServices/other"),
              StoredReport("d", 30, reports_pb2.NodeReport(node_id="d"))]  # d runs no backend service
    rows = latest_backend_health(stored)
    assert [(r.node_id, r.received_at, r.services[0].endpoints[0].healthy) for r in rows] == \
        [("a", 20, True), ("b", 5, True), ("c", 7, True)]
    assert [r.node_id for r in latest_backend_health(stored, backend_service="backendServices/other")] == ["c"]


def test_the_node_reports_every_configured_endpoint_with_its_checks_and_counts_bounded() -> None:
    from mtlsgate.v1 import backends_pb2

    from data_plane.node.backend_report import EJECTIONS, FAILURES, MAX_ENDPOINT_ENTRIES, backend_health

    app = backends_pb2.BackendService(name="backendServices/app")
    app.endpoints.add(address="10.0.0.1:80")
    app.endpoints.add(address="10.0.0.2:80")
    plain = backends_pb2.BackendService(name="backendServices/plain")
    plain.endpoints.add(address="10.0.0.3:80")
    checks = [{"backend_service": "backendServices/app", "endpoint": "10.0.0.2:80", "healthy": False,
               "last_error": "cannot connect: refused", "last_check": 1000.5},
              {"backend_service": "backendServices/app", "endpoint": "10.0.0.1:80", "healthy": True,
               "last_error": "", "last_check": 1000.0}]
    counts = {(FAILURES, ("backendServices/app", "10.0.0.2:80")): 4, (EJECTIONS, ("backendServices/app", "10.0.0.2:80")): 1}
    out = backend_health({"backendServices/plain": plain, "backendServices/app": app}, checks, counts)
    assert [s.backend_service for s in out] == ["backendServices/app", "backendServices/plain"]
    first, second = out[0].endpoints
    assert (first.address, first.checked, first.healthy, first.failures) == ("10.0.0.1:80", True, True, 0)
    assert (second.healthy, second.last_error, second.failures, second.ejections) == \
        (False, "cannot connect: refused", 4, 1)
    assert second.last_check.ToNanoseconds() == 1000_500_000_000
    [unchecked] = out[1].endpoints
    assert not unchecked.checked and unchecked.healthy and not unchecked.HasField("last_check")
    # bounded as the control plane bounds it: never more than 1,000 entries, 100 per service
    big = {f"backendServices/s{j:02d}": backends_pb2.BackendService(
        endpoints=[backends_pb2.BackendEndpoint(address=f"10.0.{j}.{i}:80") for i in range(150)]) for j in range(12)}
    report = reports_pb2.NodeReport(node_id="a", backend_services=backend_health(big, [], {}))
    assert sum(len(s.endpoints) for s in report.backend_services) == MAX_ENDPOINT_ENTRIES
    assert max(len(s.endpoints) for s in report.backend_services) == 100
    assert report_problem(report, "a", report.ByteSize()) == ""
