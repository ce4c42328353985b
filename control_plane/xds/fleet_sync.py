"""The fleet-sync task of one replica (SPEC §14): every heartbeat interval, and soon after its nodes'
status changes, it publishes this replica's heartbeat and the changed node statuses to the store's fleet
table and reads what the other replicas published. Glue only: what the rows mean is decided in
`control_plane.xds.replicas`; the SQL lives in the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from mtlsgate.v1 import api_pb2

from control_plane.store.base import FleetRead, FleetTable, ReplicaRow, StoreError
from control_plane.xds.fleet import Fleet
from control_plane.xds.replicas import HEARTBEAT_INTERVAL, MAX_ROWS, RemoteFleet, forgotten

log = logging.getLogger("mtlsgate.xds.fleet")

FLUSH_DELAY = 0.1  # after a change, wait this long so that a burst of ACKs is published as one batch
RETIRE_TIMEOUT = 3.0  # seconds a clean shutdown spends marking this replica stopped


class FleetSync:
    def __init__(self, table: FleetTable, replica: ReplicaRow, fleet: Fleet,
                 status_of: Callable[[str], api_pb2.NodeStatus | None], on_change: Callable[[], None],
                 interval: float = HEARTBEAT_INTERVAL) -> None:
        self.table = table
        self.replica = replica
        self.fleet = fleet
        self.remote = RemoteFleet()
        self._status_of = status_of
        self._on_change = on_change
        self._interval = interval
        self._offset = 0.0  # the database's clock minus ours
        self._alive: frozenset[str] = frozenset()
        self._wake = asyncio.Event()
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def now(self) -> float:
        """The database's clock, as of the last read (what heartbeats are compared with)."""
        return time.time() + self._offset

    def start(self) -> None:
        if self.table.shared and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-sync")

    def wake(self) -> None:
        """The local fleet changed: publish soon."""
        if self._task is not None:
            self._wake.set()

    async def close(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:  # the other replicas show this one's nodes as moving at once, not after STALE_AFTER
            await asyncio.wait_for(asyncio.to_thread(self.table.retire, self.replica.id), RETIRE_TIMEOUT)
        except (StoreError, TimeoutError) as exc:
            log.warning("could not mark replica %s stopped in the fleet table: %s", self.replica.name, exc)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bug must not end this replica's heartbeat for good
                log.exception("fleet sync failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
                await asyncio.sleep(FLUSH_DELAY)
            except TimeoutError:
                pass
            self._wake.clear()

    async def tick(self) -> None:
        """Publish what changed, read what the others published."""
        ids = self.fleet.drain_changed()
        rows = []
        for node_id in sorted(ids):
            status = self._status_of(node_id)
            rows.append((node_id, status.SerializeToString() if status is not None else b""))
        forget = forgotten(self.remote.replicas.values(), self.now())
        try:
            read = await asyncio.to_thread(self._exchange, rows, forget)
        except StoreError as exc:
            self.fleet.changed |= ids  # publish them with the next heartbeat that gets through
            if not self._failing:
                log.warning("fleet table unavailable (status shows this replica's last view of the "
                            "others): %s", exc)
                self._failing = True
            return
        if self._failing:
            log.info("fleet table reachable again")
            self._failing = False
        self._offset = read.now - time.time()
        changed = self.remote.apply_read(read)
        alive = self.remote.alive_ids(read.now)
        if changed or alive != self._alive:
            self._alive = alive
            self._on_change()

    def _exchange(self, rows: list[tuple[str, bytes]], forget: list[str]) -> FleetRead:
        self.table.publish(self.replica, rows, forget)
        return self.table.read(self.replica.id, self.remote.known(), MAX_ROWS)
