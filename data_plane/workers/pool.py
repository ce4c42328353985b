"""The node's worker processes: `WorkerPool` is the supervisor's `ConfigApplier`. It starts N workers,
hands each configuration version to all of them and returns once every worker runs it (so the node ACKs
only what is being enforced), restarts a worker that dies, sums worker counters for /metrics, reports what
each worker runs for /config_dump, and drains the workers on close.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from data_plane.node.apply import PortReservations
from data_plane.node.config import ConfigRejected
from data_plane.workers.client_tally import ClientTally
from data_plane.workers.health_checks import HealthChecker
from data_plane.workers.listeners import ListenerConfigError, WireConfig, compile_listeners, compile_services
from data_plane.workers.observability import PoolMetrics, log_event
from data_plane.workers.revalidation import Revalidations
from data_plane.workers.shadow_tally import ShadowTally
from data_plane.workers.worker import worker_main

log = logging.getLogger(__name__)

APPLY_TIMEOUT = 30.0  # a worker that just started needs ~1 s to import; this covers a loaded machine
DRAIN_TIMEOUT = 10.0
RESTART_BACKOFF_MAX = 5.0


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    pipe: Connection | None = None
    status: dict[str, Any] = field(default_factory=dict)
    waiters: dict[str, asyncio.Future[tuple[str, Any]]] = field(default_factory=dict)
    restarts: int = 0
    started_at: float = 0.0
    sent_version: str = ""


class WorkerPool:
    """N worker processes serving the node's listeners (see module docstring)."""

    def __init__(self, workers: int | None = None, listen_address: str = "0.0.0.0",
                 reservations: PortReservations | None = None) -> None:
        self.size = max(1, workers or os.cpu_count() or 1)
        self.listen_address = listen_address
        self.reservations = reservations or PortReservations(listen_address)
        self.metrics = PoolMetrics()
        self.clients = ClientTally()  # every worker's client rows, merged until the node reporter takes them
        self.shadow = ShadowTally()  # every worker's shadow judgements, likewise (SPEC §12)
        # What revalidation on update did per applied version, until the node reporter takes it (B6);
        # `revalidated` is set when one is ready, so the reporter can send it without waiting an interval.
        self.revalidations = Revalidations()
        self.revalidated = asyncio.Event()
        self.current: WireConfig | None = None
        self.current_config: Any = None
        self._slots = [_Slot(i) for i in range(self.size)]
        self._mp = multiprocessing.get_context("spawn")
        self._closing = False
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Active health checks of backend service endpoints: once per node, results sent to every worker.
        self.health = HealthChecker(self._broadcast_health)

    # ---- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        assert self._loop is not None
        parent, child = self._mp.Pipe()
        process = self._mp.Process(target=worker_main, args=(child, slot.index, self.listen_address),
                                   name=f"mtlsgate-worker-{slot.index}", daemon=True)
        process.start()
        child.close()
        slot.process, slot.pipe, slot.status, slot.started_at = process, parent, {}, time.monotonic()
        self._loop.add_reader(parent.fileno(), self._on_message, slot)
        self._loop.add_reader(process.sentinel, self._on_exit, slot)
        if self.current is not None:
            self._send_config(slot, self.current)
            self._send(slot, ("health", self.health.health()))

    def _on_exit(self, slot: _Slot) -> None:
        assert self._loop is not None
        process, pipe = slot.process, slot.pipe
        if process is None or pipe is None:
            return
        self._loop.remove_reader(process.sentinel)
        self._loop.remove_reader(pipe.fileno())
        process.join(0)
        pipe.close()
        slot.process, slot.pipe = None, None
        for waiter in slot.waiters.values():
            if not waiter.done():
                waiter.set_result(("died", f"worker {slot.index} exited with code {process.exitcode}"))
        slot.waiters.clear()
        self.metrics.retire(slot.index)
        if self._closing:
            return
        slot.restarts += 1
        # A worker that keeps dying right after start is restarted with a growing delay.
        delay = 0.0 if time.monotonic() - slot.started_at > 10 else min(RESTART_BACKOFF_MAX, 0.2 * slot.restarts)
        log_event("worker_restarted", worker=slot.index, exit_code=process.exitcode, delay=delay)
        self._loop.call_later(delay, lambda: None if self._closing else self._spawn(slot))

    def _on_message(self, slot: _Slot) -> None:
        pipe = slot.pipe
        if pipe is None:
            return
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(pipe.fileno())
            return
        kind = message[0]
        if kind == "stats":
            self.metrics.update(slot.index, message[1], message[2])
            self.clients.merge(message[3] if len(message) > 3 else ())
            slot.status["connections"] = message[2].get("connections", 0)
        elif kind == "shadow":
            self.shadow.merge(message[1])
        elif kind == "revalidated":
            self.revalidations.add(message[1], message[2], message[3], message[4], message[5])
        elif kind in ("applied", "rejected"):
            version = message[1]
            if kind == "applied":
                slot.status = message[2]
            waiter = slot.waiters.pop(version, None)
            if waiter is not None and not waiter.done():
                waiter.set_result((kind, message[2]))
            elif kind == "rejected":
                log_event("worker_config_rejected", worker=slot.index, version=version, message=message[2])

    def _send_config(self, slot: _Slot, wire: WireConfig) -> bool:
        sent = self._send(slot, ("config", wire))
        if sent:
            slot.sent_version = wire.version
        return sent

    def _send(self, slot: _Slot, message: tuple[Any, ...]) -> bool:
        if slot.pipe is None:
            return False
        try:
            slot.pipe.send(message)
            return True
        except (OSError, ValueError):
            return False

    # ---- ConfigApplier

    async def apply(self, config: Any) -> None:
        """Make `config` (a NodeConfig) active in every worker; raise ConfigRejected and keep the previous
        configuration when it cannot be served."""
        if self._loop is None:
            await self.start()
        async with self._lock:
            started = time.time()
            wire = WireConfig.from_node_config(config)
            try:
                services = compile_services(wire)  # the same compilation every worker does: refuse before
                compile_listeners(wire, services)  # touching them
            except ListenerConfigError as exc:
                raise ConfigRejected(str(exc)) from None
            self.reservations.update(config.listeners)
            results = await self._distribute(wire)
            failures = [detail for kind, detail in results if kind != "applied"]
            if failures:
                # back to the last good configuration (or nothing) everywhere, ports included
                self.reservations.update(self.current_config.listeners if self.current is not None else {})
                if self.current is not None:
                    await self._distribute(self.current)
                raise ConfigRejected(failures[0])
            self.current, self.current_config = wire, config
            if self.revalidations.seal(wire.version, wire.versions.items(), started) is not None:
                self.revalidated.set()
            self.health.update(getattr(config, "backend_services", {}), {n: s.tls for n, s in services.items()})
            self._broadcast_health(self.health.health())
            for slot in self._slots:
                # a worker restarted while this version was being distributed got the previous one
                if slot.process is not None and slot.sent_version != wire.version:
                    self._send_config(slot, wire)

    async def _distribute(self, wire: WireConfig) -> list[tuple[str, Any]]:
        assert self._loop is not None
        waiters = []
        for slot in self._slots:
            future: asyncio.Future[tuple[str, Any]] = self._loop.create_future()
            slot.waiters[wire.version] = future
            if not self._send_config(slot, wire):
                # Dead right now: the restart will bring the newest config; nothing to wait for.
                slot.waiters.pop(wire.version, None)
                continue
            waiters.append(future)
        try:
            return list(await asyncio.wait_for(asyncio.gather(*waiters), APPLY_TIMEOUT))
        except TimeoutError:
            return [("timeout", f"a worker did not apply version {wire.version} within {APPLY_TIMEOUT:g}s")]
        finally:
            for slot in self._slots:
                slot.waiters.pop(wire.version, None)

    def _broadcast_health(self, health: dict[tuple[str, str], bool]) -> None:
        for slot in self._slots:
            self._send(slot, ("health", health))

    async def close(self) -> None:
        """Drain every worker (stop accepting, finish in-flight requests up to DRAIN_TIMEOUT), then stop."""
        self._closing = True
        self.health.close()
        for slot in self._slots:
            self._send(slot, ("drain", DRAIN_TIMEOUT))
        deadline = time.monotonic() + DRAIN_TIMEOUT + 2
        while any(s.process is not None and s.process.is_alive() for s in self._slots) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for slot in self._slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()
            if slot.process is not None:
                self._on_exit(slot)
        self.reservations.close()

    # ---- what the admin endpoints show

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process is not None and s.process.pid is not None]

    def worker_status(self) -> list[dict[str, Any]]:
        """Per worker: pid, the configuration version it runs, its listeners (no key material)."""
        out = []
        for slot in self._slots:
            alive = slot.process is not None and slot.process.is_alive()
            entry = {"worker": slot.index, "alive": alive, "restarts": slot.restarts,
                     "pid": slot.process.pid if slot.process is not None else None}
            entry.update({k: v for k, v in slot.status.items() if k not in entry})
            out.append(entry)
        return out

    def running_version(self) -> str:
        return self.current.version if self.current is not None else ""

