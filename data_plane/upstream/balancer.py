"""Choosing an endpoint for one request: smooth weighted round robin (nginx's algorithm: over any run of
requests each endpoint gets its weight's share, interleaved) or least request (fewest requests in flight on
this worker per unit of weight; ties go round robin). Only endpoints that are healthy (active checks) and
not ejected (outlier detection) are chosen; when none is left, every endpoint is (Envoy's panic routing: a
guess beats a certain 503)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from data_plane.upstream.outlier import OutlierState

ROUND_ROBIN = "ROUND_ROBIN"
LEAST_REQUEST = "LEAST_REQUEST"


@dataclass(slots=True, eq=False)
class EndpointState:
    """What is known about one endpoint on this worker; kept across configuration versions while the
    endpoint stays in its service."""

    healthy: bool = True  # the node's active health checks (pushed by the supervisor)
    in_flight: int = 0
    outlier: OutlierState = field(default_factory=OutlierState)
    requests: int = 0
    failures: int = 0

    def available(self, now: float) -> bool:
        return self.healthy and not self.outlier.ejected(now)


@dataclass(slots=True, eq=False)
class Endpoint:
    address: str  # HOST:PORT as configured
    key: tuple[object, ...]  # the keep-alive pool's key: (host, port) or (host, port, service) for TLS
    weight: int
    state: EndpointState
    current: int = 0  # smooth round robin's running score (per configuration version)


class Balancer:
    def __init__(self, policy: str, endpoints: Sequence[Endpoint]) -> None:
        if not endpoints:
            raise ValueError("a backend service needs at least one endpoint")
        self.policy = policy
        self.endpoints = list(endpoints)
        self._next = 0  # least request's tie-break rotation

    def pick(self, now: float, exclude: Endpoint | None = None) -> Endpoint | None:
        candidates = [e for e in self.endpoints if e is not exclude and e.state.available(now)]
        if not candidates:
            candidates = [e for e in self.endpoints if e is not exclude]  # panic: none is known good
            if not candidates:
                return None
        if len(candidates) == 1:
            return candidates[0]
        if self.policy == LEAST_REQUEST:
            return self._least_request(candidates)
        return self._round_robin(candidates)

    def _round_robin(self, candidates: Sequence[Endpoint]) -> Endpoint:
        total = 0
        best = candidates[0]
        for e in candidates:
            e.current += e.weight
            total += e.weight
            if e.current > best.current:
                best = e
        best.current -= total
        return best

    def _least_request(self, candidates: Sequence[Endpoint]) -> Endpoint:
        n = len(candidates)
        start = self._next % n
        self._next += 1
        best = candidates[start]
        best_load = (best.state.in_flight + 1) / best.weight
        for i in range(1, n):
            e = candidates[(start + i) % n]
            load = (e.state.in_flight + 1) / e.weight
            if load < best_load:
                best, best_load = e, load
        return best
