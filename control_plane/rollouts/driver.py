"""The roll-out driver (glue): a task on the control plane's event loop that stores each run's next state
— commits plan the waves, baked waves pass their gates or halt — and the operations behind the
RolloutService. Decisions are the pure functions of `plan`, `gates`, `run` and `serving`; this module reads
the fleet's ACK/NACK status from the xDS server, writes runs (and, for abort and undo, the base content)
to the store, and audits every step with its reason."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf.message import Message
from mtlsgate.v1 import rollouts_pb2

from control_plane.api.integrity import check_write
from control_plane.resource_names import KINDS, ROLLOUT, ROLLOUT_POLICY, check_id, normalise_name
from control_plane.rollouts import run as runs
from control_plane.rollouts.gates import GateInput, NodeProgress, RejectWindow, Verdict, gate
from control_plane.rollouts.plan import plan
from control_plane.rollouts.policy import max_reject_increase, no_nack, revocation_fast_path
from control_plane.rollouts.serving import ACTIVE_STATES, active_run, changed_names, served_base
from control_plane.store.base import EtagMismatch, NotFound, Store, StoreError, content_etag

log = logging.getLogger("mtlsgate.rollouts")

ACTOR = "system:rollouts"
MAX_RUNS = 50  # runs kept in the store; the oldest finished ones are deleted
TICK_SECONDS = 0.25

# Node reports (SPEC §12): handshakes and rejected handshakes of these nodes between two times, or None
# when the control plane has no reports for them.
RejectSource = Callable[[Sequence[str], float, float], RejectWindow | None]


class RolloutConflict(StoreError):
    """The operation conflicts with a run's state (FAILED_PRECONDITION); the message says what to do."""


class RolloutDriver:
    def __init__(self, store: Store, xds: Any, rejects: RejectSource | None = None,
                 shadow: Callable[[Sequence[str], float, float], int | None] | None = None) -> None:
        self.store = store
        self.xds = xds
        self.rejects = rejects
        self.shadow = shadow
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    # ------------------------------------------------------------ task

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="rollout-driver")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                self.tick(time.time())
            except Exception:
                log.exception("roll-out driver step failed; retrying")
            await asyncio.sleep(TICK_SECONDS)

    def tick(self, now: float) -> None:
        run = active_run(self.store.state())
        if run is None:
            return
        if run.state == runs.Run.PREPARING and now > runs.seconds(run.prepare_deadline):
            self._back(run, "system:rollouts", f"not committed within {runs.PREPARE_SECONDS:g}s (did "
                       "`apply --rollout` stop half-way?)", now)
            return
        if run.state != runs.Run.RUNNING or run.current_wave < 0:
            return
        self.xds.refresh()  # the fleet's desired versions must include the run's latest step
        decision = gate(self.gate_input(run, now))
        if decision.verdict is Verdict.GO:
            self._save(runs.passed(run, now), decision.reason)
        elif decision.verdict is Verdict.HALT:
            halted = runs.halted(run, decision.reason, now)
            log.warning("%s %s", run.name, halted.reason)
            self._save(halted, halted.reason)

    # ------------------------------------------------------------ gate input

    def _node_labels(self) -> dict[str, Mapping[str, str]]:
        """Every node the control plane knows: connected ones (their labels as admitted) and registered ones."""
        out: dict[str, Mapping[str, str]] = {}
        for name, node in self.store.state().nodes.items():
            out[name.partition("/")[2]] = dict(node.labels)
        for status in self.xds.fleet.list():
            if status.connected:
                out[status.id] = dict(status.labels)
        return out

    def gate_input(self, run: rollouts_pb2.RolloutRun, now: float) -> GateInput:
        wave = run.waves[run.current_wave]
        started = runs.seconds(wave.started)
        bake = wave.bake.seconds + wave.bake.nanos / 1e9
        statuses = {s.id: s for s in self.xds.node_statuses()}
        progress = []
        for node_id in wave.node_ids:
            status = statuses.get(node_id)
            if status is None or not status.connected:
                progress.append(NodeProgress(node_id, connected=False, acked=False))
                continue
            target = self.xds.versions(status.labels, base=False)
            acked, nack = True, ""
            for entry in status.types:
                wanted = target.get(entry.type_url, "")
                if not entry.desired_version or not wanted:
                    continue
                if entry.acked_version != wanted:
                    acked = False
                for rejected in entry.nack_history:
                    if rejected.version == wanted:
                        nack = f"{entry.type_url.rsplit('.', 1)[-1]} version {wanted}: {rejected.error}"
            progress.append(NodeProgress(node_id, connected=True, acked=acked, nack=nack))
        policy = run.policy
        limit = max_reject_increase(policy)
        before = during = None
        if limit is not None and self.rejects is not None:
            window = max(bake, 5.0)
            before = self.rejects(list(wave.node_ids), started - window, started)
            during = self.rejects(list(wave.node_ids), started, now)
        shadow_count = None
        if policy.gates.shadow_no_new_rejects and self.shadow is not None:
            shadow_count = self.shadow(list(wave.node_ids), started, now)
        return GateInput(now=now, wave_started=started, bake_seconds=bake, nodes=progress, no_nack=no_nack(policy),
                         max_reject_increase=limit, rejects_before=before, rejects_during=during,
                         shadow_no_new_rejects=policy.gates.shadow_no_new_rejects, shadow_new_rejects=shadow_count)

    # ------------------------------------------------------------ store

    def _save(self, run: rollouts_pb2.RolloutRun, detail: str, actor: str = ACTOR, role: str = "system"
              ) -> rollouts_pb2.RolloutRun:
        result = self.store.update(run, actor=actor, role=role, expected_etag=run.etag, detail=detail[:1000])
        assert isinstance(result.resource, rollouts_pb2.RolloutRun)
        return result.resource

    def get(self, name: str = "") -> rollouts_pb2.RolloutRun:
        state = self.store.state()
        if not name:
            if not state.rollouts:
                raise NotFound("no roll-out has run yet")
            newest = max(state.rollouts.values(), key=lambda r: (r.create_time.seconds, r.create_time.nanos, r.name))
            return newest
        full = self._name(name)
        run = state.rollouts.get(full)
        if run is None:
            raise NotFound(f"{full} not found")
        return run

    @staticmethod
    def _name(name: str) -> str:
        return normalise_name(name, ROLLOUT)

    # ------------------------------------------------------------ operations (RolloutService)

    def begin(self, policy_name: str, actor: str, role: str, description: str = "") -> rollouts_pb2.RolloutRun:
        full = normalise_name(policy_name, ROLLOUT_POLICY)
        for _ in range(5):
            state = self.store.state()
            policy = state.rollout_policies.get(full)
            if policy is None:
                raise NotFound(f"{full} not found (create it first: kind: RolloutPolicy)")
            current = active_run(state)
            if current is not None:
                raise RolloutConflict(
                    f"{current.name} is {runs.state_name(current.state)}: one roll-out at a time; "
                    f"`mtlsgate rollout {'undo' if current.state == runs.Run.HALTED else 'abort'} "
                    f"{current.name.partition('/')[2]}` or wait for it to finish")
            self._trim(state)
            base = state.revision
            run_id = f"r{base + 1}"
            check_id(run_id)
            run = runs.new_run(ROLLOUT.name(run_id), full, policy, base, actor, time.time(), description)

            def same_base(at: Any, _new: Message | None, base: int = base) -> None:
                if at.revision != base:
                    raise EtagMismatch("the store moved on while the roll-out was being opened")

            try:
                result = self.store.create(run, actor=actor, role=role, check=same_base, detail=run.reason)
            except EtagMismatch:
                continue
            log.info("%s opened by %s with %s at revision %d", run.name, actor, full, base)
            assert isinstance(result.resource, rollouts_pb2.RolloutRun)
            return result.resource
        raise RolloutConflict("the store kept changing while the roll-out was being opened; try again")

    def _trim(self, state: Any) -> None:
        finished = sorted((r for r in state.rollouts.values() if r.state not in ACTIVE_STATES),
                          key=lambda r: r.base_revision)
        for old in finished[: max(0, len(state.rollouts) + 1 - MAX_RUNS)]:
            with contextlib.suppress(StoreError):
                self.store.delete(old.name, actor=ACTOR, role="system", detail="keeping the newest roll-outs")

    def commit(self, name: str, actor: str, role: str) -> rollouts_pb2.RolloutRun:
        run = self.get(name)
        if run.state != runs.Run.PREPARING:
            raise RolloutConflict(f"{run.name} is {runs.state_name(run.state)}, not PREPARING: nothing to commit")
        self.xds.refresh()
        target_state = self.store.state()
        base = self.store.state_at(run.base_revision)
        fast = revocation_fast_path(run.policy)
        served = served_base(base, target_state, fast)
        changed = changed_names(served, target_state)
        revocations_only = not changed and bool(changed_names(base, target_state))
        nodes = self._node_labels()
        targeted = {n: labels for n, labels in nodes.items()
                    if self.xds.versions(labels, base=True) != self.xds.versions(labels, base=False)}
        waves = plan(targeted, run.policy) if changed else []
        nxt = runs.committed(run, target_state.revision, changed, sorted(targeted), waves, time.time(),
                             revocations_only=revocations_only)
        saved = self._save(nxt, nxt.events[-1].text, actor, role)
        log.info("%s: %s", saved.name, saved.reason)
        return saved

    def pause(self, name: str, actor: str, role: str, why: str) -> rollouts_pb2.RolloutRun:
        run = self.get(name)
        nxt = runs.paused(run, actor, why, time.time())
        return self._save(nxt, nxt.reason, actor, role)

    def resume(self, name: str, actor: str, role: str, why: str) -> rollouts_pb2.RolloutRun:
        run = self.get(name)
        nxt = runs.resumed(run, actor, why, time.time())
        return self._save(nxt, nxt.reason, actor, role)

    def abort(self, name: str, actor: str, role: str, why: str) -> rollouts_pb2.RolloutRun:
        run = self.get(name)
        if run.state not in (runs.Run.PREPARING, runs.Run.RUNNING, runs.Run.PAUSED):
            raise RolloutConflict(f"{run.name} is {runs.state_name(run.state)}; abort stops a PREPARING, RUNNING "
                                  "or PAUSED roll-out (undo returns a finished one)")
        return self._back(run, actor, why, time.time(), role)

    def undo(self, name: str, actor: str, role: str, why: str) -> rollouts_pb2.RolloutRun:
        run = self.get(name)
        if run.state in (runs.Run.ABORTED, runs.Run.UNDONE):
            raise RolloutConflict(f"{run.name} is {runs.state_name(run.state)} already")
        if run.state == runs.Run.COMPLETED:
            newer = [r.name for r in self.store.state().rollouts.values()
                     if r.base_revision > run.base_revision and r.state not in (runs.Run.ABORTED, runs.Run.UNDONE)]
            if newer:
                raise RolloutConflict(f"{newer[0]} ran after {run.name}: undo that one first")
        return self._back(run, actor, why, time.time(), role)

    def _back(self, run: rollouts_pb2.RolloutRun, actor: str, why: str, now: float, role: str = "system"
              ) -> rollouts_pb2.RolloutRun:
        """Abort or undo: hold every node at the base, put the base content back in the store, finish."""
        verb = "undo" if run.state in (runs.Run.COMPLETED, runs.Run.HALTED) else "abort"
        if run.state != runs.Run.COMPLETED and run.reached:
            run = self._save(runs.returning(run), f"{verb}: every node back to revision {run.base_revision}",
                             actor, role)
        problems = self._restore(run, f"{verb} of {run.name} by {actor}" + (f": {why}" if why else ""), actor, role)
        final = runs.finished_back(run, actor, why, problems, now)
        log.info("%s %s", run.name, final.reason)
        return self._save(final, final.reason, actor, role)

    def _restore(self, run: rollouts_pb2.RolloutRun, detail: str, actor: str, role: str) -> list[str]:
        """Write the base content of every resource the run changed (what held-back nodes served)."""
        state = self.store.state()
        base = served_base(self.store.state_at(run.base_revision), state, revocation_fast_path(run.policy))
        names = run.changed if run.state != runs.Run.PREPARING else changed_names(base, state)
        rank = {k.collection: i for i, k in enumerate(KINDS)}
        ordered = sorted(names, key=lambda n: rank.get(n.partition("/")[0], 99))
        problems = []
        upserts = [n for n in ordered if base.get(n) is not None]
        deletes = [n for n in reversed(ordered) if base.get(n) is None]
        for name in upserts + deletes:
            want = base.get(name)
            have = self.store.state().get(name)
            try:
                if want is None:
                    if have is not None:
                        self.store.delete(name, actor=actor, role=role, detail=detail,
                                          check=lambda s, new, n=name: check_write(s, n, new))
                elif have is None or content_etag(have) != content_etag(want):
                    self.store.update(want, actor=actor, role=role, allow_missing=True, detail=detail,
                                      check=lambda s, new, n=name: check_write(s, n, new))
            except StoreError as exc:
                problems.append(f"{name}: {exc}")
                log.warning("%s: could not restore %s: %s", run.name, name, exc)
        return problems
