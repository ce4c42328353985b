"""Attacker tests for shadow evaluation's report fields (SPEC §12): a report may carry at most 64 shadow
entries per listener (what an honest node sends: shadow_tally.MAX_ENTRIES); a node that sends more is
refused with one line naming the bound, and nothing of that report reaches `shadow status` or the
roll-out gate."""

from __future__ import annotations

import queue
import threading

import grpc
from mtlsgate.v1 import reports_pb2, reports_pb2_grpc, shadow_pb2, shadow_pb2_grpc

from control_plane.fleet.aggregate import report_problem
from data_plane.workers.shadow_tally import MAX_ENTRIES as MAX_SHADOW_ENTRIES
from tests.support import wait_until
from tests.xds.fleet_config import certificate, strict_policy, trust_config
from tests.xds.test_shadow_distribution import other_root_trust


def _report(node: str, candidate_etag: str, entries: int, sequence: int = 1) -> reports_pb2.NodeReport:
    report = reports_pb2.NodeReport(node_id=node, sequence=sequence, interval_seconds=5)
    listener = report.listeners.add(listener="listeners/a", config_version="x")
    listener.shadow_disagreements.add(candidate="trustConfigs/demo", candidate_version=candidate_etag, count=entries)
    for i in range(entries - 1):
        listener.shadow_disagreements.add(candidate="trustConfigs/demo", candidate_version=candidate_etag,
                                          direction=reports_pb2.ShadowDisagreement.WOULD_NEWLY_REJECT,
                                          fingerprint_sha256=f"{i:064x}", candidate_error="x", count=1)
    listener.shadow_judged = entries
    return report


def _send(address: str, reports: list[reports_pb2.NodeReport]) -> list[reports_pb2.ReportAck]:
    out: queue.Queue = queue.Queue()
    done = threading.Event()

    def requests():
        yield from reports
        done.wait(10)

    with grpc.insecure_channel(address) as channel:
        call = reports_pb2_grpc.NodeReportServiceStub(channel).Report(requests(), timeout=20)
        acks = []
        for ack in call:
            acks.append(ack)
            if len(acks) == len(reports):
                done.set()
                break
        out.put(acks)
    return out.get()


def test_a_report_with_more_shadow_entries_than_the_bound_is_refused(control_plane, api, demo_pki):
    api.put(trust_config(demo_pki))
    api.put(strict_policy())
    api.put(certificate(demo_pki))
    with grpc.insecure_channel(control_plane.address) as channel:
        shadows = shadow_pb2_grpc.ShadowServiceStub(channel)
        etag = shadows.ApplyShadow(shadow_pb2.ApplyShadowRequest(trust_config=other_root_trust(demo_pki)),
                                   timeout=10).candidate_etag
        acks = _send(control_plane.address, [_report("raw-x", etag, MAX_SHADOW_ENTRIES + 1),
                                             _report("raw-x", etag, MAX_SHADOW_ENTRIES, sequence=2)])
        assert f"more than {MAX_SHADOW_ENTRIES} shadow entries" in acks[0].error, acks[0]
        assert len(acks[0].error.splitlines()) == 1
        assert acks[1].error == ""  # the bound itself is fine
        status = wait_until(lambda: (s := shadows.GetShadowStatus(shadow_pb2.ShadowRequest(name="trustConfigs/demo"),
                                                                  timeout=10)).judged and s,
                            timeout=15, message="the accepted report reaches shadow status")
    # only the second report counts
    assert status.judged == MAX_SHADOW_ENTRIES, status
    assert status.would_newly_reject == MAX_SHADOW_ENTRIES - 1


def test_report_problem_counts_shadow_entries_on_their_own():
    ok = _report("n", "e", MAX_SHADOW_ENTRIES)
    assert report_problem(ok, "n", ok.ByteSize()) == ""
    over = _report("n", "e", MAX_SHADOW_ENTRIES + 1)
    assert "shadow entries" in report_problem(over, "n", over.ByteSize())
