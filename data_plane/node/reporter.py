"""The node's report stream (SPEC §12): every `interval` seconds, one NodeReport of what the workers
counted since the last one (report.py builds it), on `mtlsgate.v1.NodeReportService/Report` to the control
plane the xDS agent is streaming from, with the agent's credentials. Nothing here runs per request: the
workers count, the pool sums once a second, this takes deltas once per interval. A failed stream is
retried with jittered backoff; the proxy never waits on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from typing import Any

import grpc
from mtlsgate.v1 import reports_pb2_grpc

from data_plane.node.backend_report import backend_health
from data_plane.node.report import CounterKey, LeafDetails, build_report, delta, leaf_details

log = logging.getLogger("mtlsgate.node.reports")

INTERVAL = 5.0
# The control plane takes a burst of 5 reports, then 1/s per node: the reporter keeps under it (one token
# spare) so a report sent early for a revalidation (B6) is never refused.
PACE_BURST = 4.0
PACE_PER_SECOND = 1.0
MAX_DETAILS = 4_096  # parsed client certificates remembered (parsing happens once per distinct leaf)


class Pace:
    """A token bucket mirroring the control plane's report rate bound (times are monotonic seconds)."""

    def __init__(self, now: float, burst: float = PACE_BURST, per_second: float = PACE_PER_SECOND) -> None:
        self.burst, self.per_second, self.tokens, self.at = burst, per_second, burst, now

    def wait(self, now: float) -> float:
        """Seconds until a report may be sent."""
        tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.per_second

    def take(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second) - 1
        self.at = now


class NodeReporter:
    def __init__(self, agent: Any, pool: Any, node_id: str, *, interval: float = INTERVAL) -> None:
        self.agent = agent
        self.pool = pool
        self.node_id = node_id
        self.interval = interval
        self.sequence = 0
        self.sent = 0  # reports the control plane stored (acknowledged without error)
        self.last_error = ""
        self._before: Counter[CounterKey] = Counter()
        self._taken_at = time.time()
        self._details: dict[bytes, LeafDetails] = {}
        self._pace = Pace(time.monotonic())

    def _detail(self, der: bytes) -> LeafDetails:
        found = self._details.get(der)
        if found is None:
            if len(self._details) >= MAX_DETAILS:
                self._details.clear()
            found = self._details[der] = leaf_details(der)
        return found

    def next_report(self) -> Any:
        now = time.time()
        totals = self.pool.metrics.totals()
        counts = delta(totals, self._before)
        self._before = totals
        self.sequence += 1
        active = self.agent.active
        revalidations = self.pool.revalidations.take() if hasattr(self.pool, "revalidations") else []
        report = build_report(self.node_id, self.sequence, now, now - self._taken_at, counts, self.pool.clients.take(),
                              dict(active.versions) if active is not None else {}, self._detail,
                              shadow=self.pool.shadow.take(),
                              revalidations=revalidations)
        config, checker = getattr(self.pool, "current_config", None), getattr(self.pool, "health", None)
        report.backend_services.extend(backend_health(
            getattr(config, "backend_services", {}), checker.status() if checker is not None else (), counts))
        self._taken_at = now
        return report

    async def run(self) -> None:
        failures = 0
        while True:
            endpoint = getattr(self.agent, "endpoint", None) if self.agent.connected else None
            if endpoint is None:
                await asyncio.sleep(min(1.0, self.interval))
                continue
            try:
                await self._stream(endpoint)
                failures = 0
            except grpc.aio.AioRpcError as exc:
                failures += 1
                self.last_error = f"{exc.code().name}: {exc.details()}"
                log.warning("report stream to %s ended: %s", endpoint.label, self.last_error)
            except (OSError, ConnectionError) as exc:
                failures += 1
                self.last_error = repr(exc)
            await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0))

    async def _stream(self, endpoint: Any) -> None:
        async with self.agent.channel_for(endpoint) as channel:
            call = reports_pb2_grpc.NodeReportServiceStub(channel).Report()

            async def acks() -> None:
                async for ack in call:
                    if ack.error:
                        self.last_error = ack.error
                        log.warning("report %d refused by the control plane: %s", ack.sequence, ack.error)
                    else:
                        self.sent += 1

            reader = asyncio.create_task(acks())
            try:
                while getattr(self.agent, "endpoint", None) == endpoint and not reader.done():
                    await asyncio.sleep(self._pace.wait(time.monotonic()))
                    self._pace.take(time.monotonic())
                    await call.write(self.next_report())
                    await self._until_due(reader)
                if reader.done():
                    reader.result()  # the stream's error, if any
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await reader
                call.cancel()

    async def _until_due(self, reader: asyncio.Task[None]) -> None:
        """Until the next report is due: `interval` after this one, or as soon as the pool has a finished
        revalidation to tell (B6), or when the stream ends."""
        event = getattr(self.pool, "revalidated", None)
        if event is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), timeout=self.interval)
            return
        waker = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({reader, waker}, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
        event.clear()
