"""The control plane's collector settings (control_plane/gc_tuning.py, issue 17 B4): full collections come
after stream churn instead of every few pushes, and every pause is measured."""

from __future__ import annotations

import asyncio
import gc
import re
import time
import urllib.request

import pytest

from control_plane import gc_tuning
from control_plane.gc_tuning import FULL_COLLECTION_EVERY, FanOut, FullCollections
from tests.support import free_port, wait_until
from tests.xds.fleet_config import certificate, listener, strict_policy, trust_config
from tests.xds.sim_fleet import SimFleet


def test_a_full_collection_is_asked_for_once_every_so_many_ended_streams() -> None:
    policy = FullCollections(every=3)
    assert [policy.stream_ended() for _ in range(7)] == [False, False, True, False, False, True, False]
    with pytest.raises(ValueError, match="at least 1"):
        FullCollections(every=0)


@pytest.fixture
def tuned(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gc_tuning, "_tuned", True)
    yield
    gc.enable()


def test_collections_are_held_off_until_the_last_offered_stream_has_written(tuned) -> None:
    async def scenario() -> None:
        fan_out = FanOut(most=30)
        fan_out.started(3)
        assert not gc.isenabled()
        fan_out.started(2)  # a second push while the first is still going out: counted, one hold
        for _ in range(4):
            fan_out.stream_done()
            assert not gc.isenabled()
        fan_out.stream_done()
        assert gc.isenabled()
        fan_out.stream_done()  # a late one changes nothing
        assert gc.isenabled() and fan_out.pending == 0

    asyncio.run(scenario())


def test_a_stream_that_never_writes_holds_collections_off_for_at_most_the_limit(tuned) -> None:
    async def scenario() -> None:
        fan_out = FanOut(most=0.2)
        fan_out.started(2)
        fan_out.stream_done()
        assert not gc.isenabled()
        deadline = time.monotonic() + 10
        while not gc.isenabled():
            assert time.monotonic() < deadline, "collections never resumed"
            await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_nothing_is_held_off_unless_the_process_was_tuned() -> None:
    async def scenario() -> None:
        FanOut().started(5)
        assert gc.isenabled()

    asyncio.run(scenario())


def metric(metrics: str, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else -1.0


def test_stream_churn_ends_in_a_full_collection_and_pauses_are_exported(control_plane, api, demo_pki) -> None:
    pauses = "mtlsgate_control_plane_gc_pause_seconds_count"
    full = '{generation="2"}'
    # tune() itself collects once, observed: the pause histogram is there from the start
    assert metric(control_plane.metrics, pauses, full) >= 1, "gc pauses are not exported"
    api.put(trust_config(demo_pki))
    api.put(certificate(demo_pki))
    api.put(strict_policy())
    api.put(listener("listeners/a", free_port()))

    nodes = FULL_COLLECTION_EVERY + 50
    with SimFleet(control_plane.address, nodes, procs=2) as fleet:
        state = fleet.wait(lambda s: s["acked"] >= nodes or s["errors"], 120, f"{nodes} nodes to ACK")
        assert state["errors"] == {}
        wait_until(lambda: metric(control_plane.metrics, "mtlsgate_xds_connected_nodes") == nodes, timeout=30,
                   message=f"the control plane to count {nodes} connected nodes")
        before = max(0.0, metric(control_plane.metrics, pauses, full))
    # The simulators are gone: every stream ended, so at least one full collection followed.
    wait_until(lambda: metric(control_plane.metrics, "mtlsgate_xds_connected_nodes") == 0, timeout=30,
               message="every stream to end")
    wait_until(lambda: metric(control_plane.metrics, pauses, full) > before, timeout=30,
               message="a full collection after the streams ended")


@pytest.fixture
def unfrozen():  # type: ignore[no-untyped-def]
    yield
    gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_what_a_push_left_alive_is_frozen_and_a_full_collection_still_reclaims_it(tuned, unfrozen) -> None:
    """After a push the young objects it left (the streams' waiting coroutines and futures) are frozen, so
    no collection walks them; a cycle that dies among them is not leaked for good: collect_full() sees it."""
    import weakref

    async def scenario() -> weakref.ref[_Cycle]:
        fan_out = FanOut(most=30, full_every=1_000)
        frozen = gc.get_freeze_count()
        fan_out.started(1)
        cycle = _Cycle()  # made during the push, alive when it ends
        fan_out.stream_done()
        assert gc.isenabled() and gc.get_freeze_count() > frozen
        dead = weakref.ref(cycle)
        del cycle  # now garbage, but only a collection of frozen objects can find it
        gc.collect()
        assert dead() is not None
        return dead

    dead = asyncio.run(scenario())
    gc_tuning.collect_full()
    assert dead() is None and gc.get_freeze_count() > 0  # reclaimed, and the survivors frozen again


def test_every_so_many_pushes_end_in_a_full_collection_instead(tuned, unfrozen) -> None:
    import weakref

    async def push(fan_out: FanOut, keep: list[object]) -> None:
        fan_out.started(1)
        keep.append(_Cycle())
        fan_out.stream_done()

    async def scenario() -> None:
        fan_out = FanOut(most=30, full_every=3)
        keep: list[object] = []
        await push(fan_out, keep)
        dead = weakref.ref(keep.pop())  # frozen at the end of push 1, garbage from now on
        await push(fan_out, keep)
        assert dead() is not None  # push 2 only froze
        await push(fan_out, keep)
        assert dead() is None and fan_out.pushes == 0  # push 3 collected everything, frozen objects too

    asyncio.run(scenario())
