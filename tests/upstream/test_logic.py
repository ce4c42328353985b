"""The pure upstream logic (data_plane/upstream/): weighted round robin shares, least request, panic
routing, outlier ejection and return, the health-check state machine and status-line verdicts."""

from __future__ import annotations

import collections

from data_plane.upstream.balancer import LEAST_REQUEST, ROUND_ROBIN, Balancer, Endpoint, EndpointState
from data_plane.upstream.health import HealthPolicy, HealthState, check_verdict
from data_plane.upstream.outlier import OutlierPolicy, OutlierState


def _endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"127.0.0.1:{9000 + i}", ("127.0.0.1", 9000 + i), w, EndpointState())
            for i, w in enumerate(weights)]


def test_round_robin_gives_each_endpoint_exactly_its_weight_share_interleaved() -> None:
    eps = _endpoints(1, 2, 3)
    balancer = Balancer(ROUND_ROBIN, eps)
    picks = [balancer.pick(0.0) for _ in range(600)]
    counts = collections.Counter(p.address for p in picks if p is not None)
    assert [counts[e.address] for e in eps] == [100, 200, 300]
    # smooth: the heaviest never gets more than its share in a row
    assert max(len(list(g)) for g in _runs(picks)) <= 2


def _runs(picks: list[Endpoint | None]) -> list[list[Endpoint | None]]:
    runs: list[list[Endpoint | None]] = []
    for p in picks:
        if runs and runs[-1][-1] is p:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def test_unavailable_endpoints_are_skipped_and_all_are_used_when_none_is_left() -> None:
    eps = _endpoints(1, 1, 1)
    balancer = Balancer(ROUND_ROBIN, eps)
    eps[0].state.healthy = False
    eps[1].state.outlier.ejected_until = 10.0
    assert {balancer.pick(5.0).address for _ in range(10)} == {eps[2].address}  # type: ignore[union-attr]
    assert {balancer.pick(11.0).address for _ in range(10)} == {eps[1].address, eps[2].address}  # type: ignore[union-attr]
    eps[2].state.healthy = False
    eps[1].state.healthy = False
    assert len({balancer.pick(11.0).address for _ in range(10)}) == 3  # type: ignore[union-attr]  # panic
    assert balancer.pick(11.0, exclude=eps[0]) is not eps[0]
    assert Balancer(ROUND_ROBIN, eps[:1]).pick(0.0, exclude=eps[0]) is None


def test_least_request_prefers_fewest_in_flight_per_weight_and_rotates_ties() -> None:
    eps = _endpoints(1, 1, 2)
    balancer = Balancer(LEAST_REQUEST, eps)
    eps[0].state.in_flight = 3
    eps[1].state.in_flight = 1
    eps[2].state.in_flight = 2  # (2+1)/2 = 1.5 < (1+1)/1 = 2
    assert balancer.pick(0.0) is eps[2]
    for e in eps:
        e.state.in_flight = 0
    eps[2].weight = 1
    assert {balancer.pick(0.0).address for _ in range(3)} == {e.address for e in eps}  # type: ignore[union-attr]


def test_outlier_ejects_after_consecutive_errors_and_returns_after_the_ejection_time() -> None:
    policy = OutlierPolicy(consecutive_errors=3, base_ejection_seconds=2.0)
    state = OutlierState()
    assert not state.failure(0.0, policy) and not state.failure(0.1, policy)
    state.success(0.2)  # not consecutive any more
    assert not state.failure(0.3, policy) and not state.failure(0.4, policy)
    assert state.failure(0.5, policy)
    assert state.ejected(2.4) and not state.ejected(2.6)
    # a second ejection lasts twice as long
    for t in (3.0, 3.1):
        state.failure(t, policy)
    assert state.failure(3.2, policy) and state.ejected(7.1) and not state.ejected(7.3)
    assert state.ejections_total == 2


def test_health_state_needs_consecutive_results_to_change() -> None:
    policy = HealthPolicy("/healthz", healthy_threshold=2, unhealthy_threshold=3)
    state = HealthState()
    assert state.healthy
    assert [state.observe(False, policy, "refused") for _ in range(3)] == [False, False, True]
    assert not state.healthy and state.last_error == "refused"
    assert not state.observe(True, policy) and not state.observe(False, policy, "x") and not state.observe(True, policy)
    assert state.observe(True, policy) and state.healthy


def test_status_line_verdicts() -> None:
    assert check_verdict(b"HTTP/1.1 200 OK\r\n") == (True, "")
    assert check_verdict(b"HTTP/1.0 204 No Content\r\n")[0]
    assert check_verdict(b"HTTP/1.1 503 Service Unavailable\r\n") == (False, "status 503")
    assert not check_verdict(b"SSH-2.0-OpenSSH\r\n")[0]
    assert not check_verdict(b"HTTP/1.1 2000 OK\r\n")[0]
    assert not check_verdict(b"")[0]
