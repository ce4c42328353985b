"""The garbage collector of a control plane that holds thousands of long-lived xDS streams (SPEC §10 B4).

With CPython's default thresholds (700, 10, 10) a control plane with 10,000 open streams spent most of
a push in the collector: every push allocates a few objects per stream, enough to set off a full
collection, and a full collection walks every stream's objects (≈1 s at 10,000 streams; 18 to 20 s of
collector pauses over one `bench/convergence.py --only b4 --scale 10000` run). Here:

- `tune()` freezes what start-up built (modules, the store's first state: never garbage) and raises the
  thresholds so that young collections are rarer and full ones are left to `FullCollections`.
- `FullCollections` asks for a full collection after every `every` ended streams: a stream's objects
  that were old enough to be promoted and then left in reference cycles are only reclaimed by a full
  collection, so that memory stays bounded by the churn since the last one (a disconnect storm costs one
  pause, at its end, instead of a pause every few pushes).
- `FanOut` holds collections off while a push is being written to the streams (at most 5 s), then
  freezes what the push left alive: each stream's waiting coroutines and futures, ~22 objects per stream
  made anew at every wake, which a collection would walk only to find them alive (one such collection
  took 150 to 180 ms of every push at 10,000 streams). They are freed by reference counting as usual; only
  reference cycles among frozen objects wait for the next full collection, which `collect_full()` makes
  see everything (it unfreezes first), after `FULL_COLLECTION_EVERY` ended streams or
  `FULL_COLLECTION_PUSHES` pushes, whichever comes first.
- `observe_pauses()` exports every collection's pause as `mtlsgate_control_plane_gc_pause_seconds`.

`MTLSGATE_CONTROL_PLANE_GC=default` keeps CPython's settings (the benchmark's before/after).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import Histogram

# gen-0 collections after 10,000 net allocations (default 700); gen 1 every 20 of those; gen 2 left to
# FullCollections in practice (CPython also waits for 25 % growth of the old generation).
THRESHOLDS = (10_000, 20, 1_000)
FULL_COLLECTION_EVERY = 1_000  # ended streams
FULL_COLLECTION_PUSHES = 1_000  # pushes (each freezes what it left alive: see FanOut)
FAN_OUT_MOST_SECONDS = 5.0  # collections are held off for at most this long per push (FanOut)

GC_PAUSES = Histogram(
    "mtlsgate_control_plane_gc_pause_seconds", "Garbage-collector pauses of the control plane", ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


def tune(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """Freeze the objects alive now and set the thresholds (call once serving has started)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


class FullCollections:
    """Counts ended streams; `stream_ended()` is True once every `every` of them (then collect)."""

    def __init__(self, every: int = FULL_COLLECTION_EVERY) -> None:
        if every < 1:
            raise ValueError("every must be at least 1")
        self.every = every
        self.ended = 0

    def stream_ended(self) -> bool:
        self.ended += 1
        if self.ended >= self.every:
            self.ended = 0
            return True
        return False


def collect_full() -> None:
    """A full collection. In a tuned process it sees the frozen objects too (reference cycles that died
    since they were frozen are reclaimed), and what survives is frozen again."""
    if not _tuned:
        gc.collect()
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()


_started = 0.0


def _time_collection(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
    elif _started:
        GC_PAUSES.labels(str(info.get("generation", ""))).observe(time.perf_counter() - _started)
        _started = 0.0


_tuned = False  # configure() tuned this process (FanOut and collect_full act only then)


def observe_pauses() -> None:
    """Time every collection into GC_PAUSES (a callback per collection: two clock reads)."""
    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)


def configure(environ: Mapping[str, str]) -> str:
    """What `mtlsgate control-plane` does at start: `MTLSGATE_CONTROL_PLANE_GC=default` keeps CPython's
    settings (for before/after benchmarks); anything else tunes. Returns what was applied."""
    observe_pauses()
    if environ.get("MTLSGATE_CONTROL_PLANE_GC", "") == "default":
        return "default"
    global _tuned
    tune()
    _tuned = True
    return "tuned"


class FanOut:
    """Holds automatic collections off while a push is being written to the streams.

    A push to N streams keeps a few objects per stream alive until that stream's write is done: a
    collection in the middle of it walks them all (at 10,000 streams, collector pauses were ~0.5 s of
    every push). `started(n)` when n streams were offered a snapshot, `stream_done()` as each has
    written it; collections resume when the last has, or after `most` seconds whatever happens (a stream
    that never writes, one that ended). Reference counting frees garbage meanwhile as always. What the
    push left alive is then frozen (see the module doc), and every `full_every` pushes `collect_full()`
    runs instead. Only when `configure()` tuned the process (tests and `MTLSGATE_CONTROL_PLANE_GC=default`
    leave it alone)."""

    def __init__(self, most: float = FAN_OUT_MOST_SECONDS, full_every: int = FULL_COLLECTION_PUSHES) -> None:
        self.most = most
        self.full_every = full_every
        self.pending = 0
        self.pushes = 0
        self._timer: asyncio.TimerHandle | None = None

    def started(self, streams: int) -> None:
        if streams <= 0 or not _tuned:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.pending += streams
        if self._timer is None:
            gc.disable()
            self._timer = loop.call_later(self.most, self._resume)

    def stream_done(self) -> None:
        if self.pending > 0:
            self.pending -= 1
            if self.pending == 0:
                self._resume()

    def _resume(self) -> None:
        self.pending = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self.pushes += 1
            if self.pushes >= self.full_every:
                self.pushes = 0
                collect_full()
            else:
                gc.freeze()
            gc.enable()
