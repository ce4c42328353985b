"""One proxy worker process: accepts on every listener port (SO_REUSEPORT, so the kernel spreads new
connections over the workers), swaps in each configuration version the pool sends, revalidates open
connections when a policy asks for it, reports counters, and drains on request.

Messages from the pool (over a multiprocessing pipe): ("config", WireConfig), ("drain", seconds).
Messages to the pool: ("applied", version, status), ("rejected", version, message), ("stats", snapshot,
gauges, client rows) — see client_tally.py for the rows — and, before "applied" when revalidation ran,
("revalidated", version, connections checked, closed leaves' SHA-256 (bounded), closed, wall-clock time).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import resource
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from data_plane.http.admission import Admission
from data_plane.http.bounds import Bounds, from_environment
from data_plane.upstream.balancer import EndpointState
from data_plane.workers.backend import BackendPool
from data_plane.workers.client_tally import ClientTally
from data_plane.workers.http_proxy import ClientConnection
from data_plane.workers.listeners import (
    ListenerConfigError,
    ListenerRuntime,
    ServiceRuntime,
    WireConfig,
    compile_listeners,
    compile_services,
)
from data_plane.workers.observability import WorkerCounters, log_event
from data_plane.workers.shadow_tally import ShadowTally

STATS_INTERVAL = 1.0
LISTEN_BACKLOG = 1024


class Worker:
    """State of one worker process. `connections` and `draining` are read by ClientConnection."""

    def __init__(self, pipe: Connection, worker_id: int, listen_address: str, bounds: Bounds | None = None) -> None:
        self.pipe = pipe
        self.worker_id = worker_id
        self.listen_address = listen_address
        self.bounds = bounds or from_environment(os.environ)
        self.counters = WorkerCounters()
        self.clients = ClientTally()  # client certificates seen since the last stats message (node reports)
        self.shadow = ShadowTally()  # shadow candidates' judgements since the last stats message (SPEC §12)
        self.backends = BackendPool(self.bounds)
        self.admission: Admission[ClientConnection] = Admission(self.bounds.max_connections,
                                                                self.bounds.max_connections_per_ip)
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.version = ""
        self.by_port: dict[int, ListenerRuntime] = {}
        self.services: dict[str, ServiceRuntime] = {}
        # (service, address) → what this worker knows of the endpoint; kept while it stays configured
        self.endpoint_states: dict[tuple[str, str], EndpointState] = {}
        self.health: dict[tuple[str, str], bool] = {}  # the node's active health checks, from the supervisor
        self.servers: dict[int, asyncio.Server] = {}
        self._done = asyncio.Event()
        self._apply_lock = asyncio.Lock()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._on_pipe)
        # The supervisor owns shutdown: SIGINT from a terminal goes to the whole group, SIGTERM is ours.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(self.drain(10.0)))
        stats = loop.create_task(self._report_stats())
        sweeper = loop.create_task(self._sweep())
        await self._done.wait()
        stats.cancel()
        sweeper.cancel()
        self._send_stats()

    # ---- pipe

    def _on_pipe(self) -> None:
        try:
            message = self.pipe.recv()
        except (EOFError, OSError):
            # The supervisor is gone: nobody can reconfigure or restart us; stop serving.
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            asyncio.get_running_loop().create_task(self.drain(5.0))
            return
        kind = message[0]
        if kind == "config":
            asyncio.get_running_loop().create_task(self._apply(message[1]))
        elif kind == "health":
            self._apply_health(message[1])
        elif kind == "drain":
            asyncio.get_running_loop().create_task(self.drain(float(message[1])))

    def _send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.pipe.send(message)

    def _send_stats(self) -> None:
        self._send(("stats", self.counters.snapshot(), {"connections": len(self.connections)}, self.clients.take()))
        if len(self.shadow):
            self._send(("shadow", self.shadow.take()))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.bounds.sweep_interval)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_deadlines(now)

    async def _report_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            self._send_stats()

    # ---- configuration

    async def _apply(self, wire: WireConfig) -> None:
        try:
            # one at a time, in arrival order: a restart's catch-up config and a new one may both be queued
            async with self._apply_lock:
                await self.apply(wire)
        except ListenerConfigError as exc:
            self._send(("rejected", wire.version, str(exc)))
            return
        self._send(("applied", wire.version, self.status()))
        self._send_stats()

    async def apply(self, wire: WireConfig) -> None:
        """Compile, open new ports, swap, close unused ports, revalidate. Raises ListenerConfigError with
        nothing changed when the configuration cannot be served."""
        fresh: dict[tuple[str, str], EndpointState] = {}

        def state(service: str, address: str) -> EndpointState:
            key = (service, address)
            found = self.endpoint_states.get(key) or fresh.get(key)
            if found is None:
                found = fresh[key] = EndpointState(healthy=self.health.get(key, True))
            return found

        services = compile_services(wire, state)
        runtimes = compile_listeners(wire, services)
        by_port: dict[int, ListenerRuntime] = {}
        for runtime in runtimes.values():
            other = by_port.get(runtime.port)
            if other is not None:
                raise ListenerConfigError(f"{runtime.name}: port {runtime.port} is also used by {other.name}")
            by_port[runtime.port] = runtime
        opened: dict[int, asyncio.Server] = {}
        if not self.draining:
            for port in sorted(set(by_port) - set(self.servers)):
                try:
                    opened[port] = await self._listen(port)
                except OSError as exc:
                    for server in opened.values():
                        server.close()
                    raise ListenerConfigError(
                        f"{by_port[port].name}: port {port} cannot be opened on {self.listen_address}: "
                        f"{exc.strerror or exc}") from None
        previous = self.by_port
        self.by_port = by_port
        self.services = services
        self.endpoint_states = {(s.name, e.address): e.state for s in services.values() for e in s.endpoints}
        self.servers.update(opened)
        self.version = wire.version
        for port in sorted(set(self.servers) - set(by_port)):
            self.servers.pop(port).close()
        revalidated = self._revalidate(previous, runtimes)
        if revalidated is not None:
            self._send(("revalidated", wire.version, *revalidated, time.time()))

    def _apply_health(self, health: dict[tuple[str, str], bool]) -> None:
        self.health = dict(health)
        for key, state in self.endpoint_states.items():
            state.healthy = health.get(key, True)

    async def _listen(self, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: ClientConnection(self, lambda: self.by_port.get(port)),
            host=self.listen_address, port=port, reuse_port=True, backlog=LISTEN_BACKLOG,
        )

    def _revalidate(self, previous: dict[int, ListenerRuntime], runtimes: dict[str, ListenerRuntime]
                    ) -> tuple[int, list[str], int] | None:
        """revalidateOnUpdate: re-run validation for open connections under the new configuration and close
        those that would now be refused (SPEC §6); in ALLOW mode the new verdict just replaces the old one.
        Returns (connections checked, closed leaves' SHA-256 — bounded, closed), None when no listener
        revalidates (the node's report says when revocations were enforced on live connections, B6)."""
        if not previous or not any(r.revalidate_on_update and r.mtls for r in runtimes.values()):
            return None
        checked, closed = 0, 0
        fingerprints: list[str] = []
        for conn in list(self.connections):
            old = conn.listener
            if old is None or conn.verdict is None or conn.tls is None or not conn.tls.handshake_done:
                continue
            new = runtimes.get(old.name)
            if new is None or not new.revalidate_on_update or not new.mtls:
                continue
            checked += 1
            verdict = new.validate(conn.tls.chain)
            refused = not verdict.accepted and (new.reject_at_http or (new.tls.client_auth is not None
                                                 and new.tls.client_auth.reject_at_tls))
            if refused:
                self.counters.inc("mtlsgate_connections_closed_by_revalidation_total", new.name)
                log_event("client_rejected", listener=new.name, peer=conn.peer[0], worker=self.worker_id,
                          rejected_at="revalidation", error=verdict.error, reason=verdict.reason)
                conn.close()
                closed += 1
                if len(fingerprints) < 1_000 and conn.tls.chain:
                    fingerprints.append(hashlib.sha256(conn.tls.chain[0]).hexdigest())
            else:
                conn.verdict = verdict
        return checked, fingerprints, closed

    def status(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "version": self.version,
            "draining": self.draining,
            "connections": len(self.connections),
            "bounds": self.bounds.as_dict(),
            "listeners": {r.name: r.summary for r in sorted(self.by_port.values(), key=lambda r: r.name)},
            "backend_services": {name: s.summary(time.monotonic()) for name, s in sorted(self.services.items())},
        }

    # ---- shutdown

    async def drain(self, seconds: float) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish until the deadline."""
        if self.draining:
            return
        self.draining = True
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for conn in list(self.connections):
                if conn.idle():
                    conn.close()
            if not self.connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        self.backends.close()
        self._done.set()


def worker_main(pipe: Connection, worker_id: int, listen_address: str) -> None:
    """Entry point of a worker process (started by WorkerPool with the spawn method)."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    # Modules and startup objects never die: freezing them keeps every collection from re-walking
    # them (perf: gc 2.5 % -> 1.7 % of a worker's CPU under kept-alive load; raising the gen-0
    # threshold instead made it worse, 3-9 %).
    gc.freeze()
    # Every client connection is a descriptor: the connection cap (SPEC §11) must be reachable.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Worker(pipe, worker_id, listen_address).run())
