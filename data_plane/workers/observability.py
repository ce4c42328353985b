"""Worker-side counters (sent to the pool, which sums them for the node's /metrics) and JSON log lines.

Workers keep plain counters instead of prometheus-client's multiprocess mode: the pool already talks to
each worker over a pipe, and summing a few labelled counters there keeps the supervisor the single owner
of the registry.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Counted for node reports only (not exported): listener, present, verified, accepted ("1" or ""), error.
REPORT_HANDSHAKES = "report_handshakes"

# metric name -> label names, in order
COUNTERS: dict[str, tuple[str, ...]] = {
    "mtlsgate_handshakes_total": ("listener", "result", "error"),
    "mtlsgate_requests_total": ("listener", "code"),
    "mtlsgate_connections_closed_by_revalidation_total": ("listener",),
    "mtlsgate_connections_evicted_total": ("reason",),
    "mtlsgate_connections_refused_total": ("reason",),
    "mtlsgate_connections_timed_out_total": ("phase",),
    "mtlsgate_backend_ejections_total": ("backend_service", "endpoint"),
    "mtlsgate_backend_endpoint_failures_total": ("backend_service", "endpoint"),
}
COUNTER_HELP = {
    "mtlsgate_backend_ejections_total": "BackendService endpoints ejected by outlier detection (consecutive "
                                        "connect failures, timeouts or 5xx), per worker summed",
    "mtlsgate_backend_endpoint_failures_total": "Requests to a BackendService endpoint that failed (connect "
                                                "failure, timeout or 5xx)",
    "mtlsgate_handshakes_total": "TLS handshakes by listener, result (ok/rejected/failed) and client-certificate error",
    "mtlsgate_requests_total": "HTTP requests answered, by listener and status code",
    "mtlsgate_connections_closed_by_revalidation_total": "Connections closed because revalidateOnUpdate found their certificate invalid",
    "mtlsgate_connections_evicted_total": "Connections closed to admit a new one at the worker's cap, by reason "
                                          "(handshake_pending, idle_keepalive)",
    "mtlsgate_connections_refused_total": "New connections closed at once, by reason (per_ip_limit, worker_full)",
    "mtlsgate_connections_timed_out_total": "Connections closed by a deadline, by phase (handshake, head, body, "
                                            "response, keepalive)",
}

CounterKey = tuple[str, tuple[str, ...]]


class WorkerCounters:
    """Monotonic counters of one worker process."""

    def __init__(self) -> None:
        self.values: Counter[CounterKey] = Counter()
        # mtlsgate_requests_total by listener, then status: counted once per request, so no key tuple is
        # made and hashed each time (B2: 2,000 instructions fewer per request)
        self._requests: collections.defaultdict[str, Counter[int]] = collections.defaultdict(Counter)

    def inc(self, name: str, *labels: str) -> None:
        self.values[(name, labels)] += 1

    def request(self, listener: str, status: int) -> None:
        """One answered request: mtlsgate_requests_total{listener, code}."""
        self._requests[listener][status] += 1

    def snapshot(self) -> list[tuple[str, tuple[str, ...], int]]:
        requests = [("mtlsgate_requests_total", (listener, str(status)), value)
                    for listener, by_status in self._requests.items() for status, value in by_status.items()]
        return [(name, labels, value) for (name, labels), value in self.values.items()] + requests


class PoolMetrics:
    """Sums the latest counters of every worker, keeping what dead workers had counted, and exposes them
    as a prometheus-client collector: `REGISTRY.register(pool.metrics)`."""

    def __init__(self) -> None:
        self._live: dict[int, Counter[CounterKey]] = {}
        self._retired: Counter[CounterKey] = Counter()
        self.gauges: dict[int, dict[str, float]] = {}

    def update(self, slot: int, snapshot: Iterable[tuple[str, tuple[str, ...], int]],
               gauges: Mapping[str, float]) -> None:
        self._live[slot] = Counter({(n, tuple(lbl)): v for n, lbl, v in snapshot})
        self.gauges[slot] = dict(gauges)

    def retire(self, slot: int) -> None:
        """The worker in `slot` died: keep its counts, forget its gauges."""
        self._retired.update(self._live.pop(slot, Counter()))
        self.gauges.pop(slot, None)

    def totals(self) -> Counter[CounterKey]:
        # collect() runs in the admin server's thread while the event loop updates: iterate copies
        total = Counter(self._retired)
        for counts in list(self._live.values()):
            total.update(counts)
        return total

    def collect(self) -> Iterable[Any]:
        totals = self.totals()
        for name, label_names in COUNTERS.items():
            family = CounterMetricFamily(name.removesuffix("_total"), COUNTER_HELP[name], labels=label_names)
            for (metric, labels), value in sorted(totals.items()):
                if metric == name:
                    family.add_metric(list(labels), value)
            yield family
        connections = GaugeMetricFamily("mtlsgate_worker_connections", "Open client connections per worker",
                                        labels=("worker",))
        for slot, gauges in sorted(list(self.gauges.items())):
            connections.add_metric([str(slot)], gauges.get("connections", 0))
        yield connections


def log_event(event: str, *, stream: TextIO | None = None, **fields: Any) -> None:
    """One JSON object per line (SPEC §7). Callers never pass key material."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    print(json.dumps(record, default=str), file=stream or sys.stderr, flush=True)
