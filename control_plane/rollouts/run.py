"""The roll-out run as a small state machine (pure): each function takes a `RolloutRun` and returns the
next one (a copy) with an event saying what happened. The driver stores the result."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import timestamp_pb2
from mtlsgate.v1 import rollouts_pb2
from mtlsgate.v1.rollouts_pb2 import RolloutRun as Run

from control_plane.rollouts.plan import PlannedWave
from control_plane.rollouts.serving import copy_run

MAX_EVENTS = 50
PREPARE_SECONDS = 120.0  # `apply --rollout` must commit within this; an abandoned run is aborted


class TransitionError(ValueError):
    """The operation does not apply to the run in its state (the message says why, in one line)."""


def state_name(state: int) -> str:
    return Run.State.Name(state)  # type: ignore[arg-type]


def _ts(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _event(run: Run, now: float, text: str) -> None:
    run.events.add(time=_ts(now), text=text)
    del run.events[:-MAX_EVENTS]


def new_run(name: str, policy_name: str, policy: rollouts_pb2.RolloutPolicy, base_revision: int, actor: str,
            now: float, description: str = "") -> Run:
    run = Run(name=name, policy_name=policy_name, state=Run.PREPARING, base_revision=base_revision, actor=actor,
              current_wave=-1, description=description)
    run.policy.CopyFrom(policy)
    for meta in ("etag", "create_time", "update_time"):
        run.policy.ClearField(meta)
    run.prepare_deadline.CopyFrom(_ts(now + PREPARE_SECONDS))
    run.reason = f"opened by {actor}: every node keeps revision {base_revision} until its wave"
    _event(run, now, run.reason)
    return run


def committed(run: Run, target_revision: int, changed: Sequence[str], targeted: Sequence[str],
              waves: Sequence[PlannedWave], now: float, *, revocations_only: bool = False) -> Run:
    if run.state != Run.PREPARING:
        raise TransitionError(f"{run.name} is {state_name(run.state)}, not PREPARING: it was committed already")
    out = copy_run(run)
    out.target_revision = target_revision
    out.changed[:] = list(changed)
    out.targeted[:] = list(targeted)
    for wave in waves:
        entry = out.waves.add(node_ids=list(wave.node_ids))
        entry.bake.FromNanoseconds(int(wave.bake_seconds * 1e9))
    if not changed or not waves:
        out.state = Run.COMPLETED
        out.reason = ("only revocations: they went to every node at once (revocationFastPath)" if revocations_only
                      else "nothing to roll out: no node's configuration changes" if changed
                      else "nothing to roll out: the changes alter no served resource")
        _event(out, now, out.reason)
        return out
    out.state = Run.RUNNING
    _event(out, now, f"committed at revision {target_revision}: {len(changed)} resource(s) change for "
                     f"{len(targeted)} node(s), in {len(waves)} wave(s)")
    return start_wave(out, 0, now)


def start_wave(run: Run, index: int, now: float) -> Run:
    out = copy_run(run)
    wave = out.waves[index]
    out.current_wave = index
    wave.started.CopyFrom(_ts(now))
    out.reached.extend(n for n in wave.node_ids if n not in out.reached)
    out.reason = f"wave {index + 1} of {len(out.waves)}: {', '.join(wave.node_ids)}"
    _event(out, now, f"wave {index + 1} of {len(out.waves)} started: {', '.join(wave.node_ids)}")
    return out


def passed(run: Run, now: float) -> Run:
    """The current wave's gates passed: the next wave starts, or the run completes."""
    index = run.current_wave
    if index + 1 < len(run.waves):
        return start_wave(run, index + 1, now)
    out = copy_run(run)
    out.state = Run.COMPLETED
    out.reason = f"completed: every one of the {len(out.targeted)} targeted node(s) has the new revision"
    _event(out, now, out.reason)
    return out


def halted(run: Run, reason: str, now: float) -> Run:
    """A gate failed: the wave's nodes go back to the base revision; earlier waves keep the new one."""
    out = copy_run(run)
    wave = set(out.waves[out.current_wave].node_ids) if out.current_wave >= 0 else set()
    out.reached[:] = [n for n in out.reached if n not in wave]
    out.state = Run.HALTED
    out.reason = (f"halted in wave {out.current_wave + 1}: {reason}; the wave's nodes are back on revision "
                  f"{out.base_revision}")
    _event(out, now, out.reason)
    return out


def paused(run: Run, who: str, why: str, now: float) -> Run:
    if run.state != Run.RUNNING:
        raise TransitionError(f"{run.name} is {state_name(run.state)}; only a RUNNING roll-out can be paused")
    out = copy_run(run)
    out.state = Run.PAUSED
    out.reason = f"paused by {who}" + (f": {why}" if why else "")
    _event(out, now, out.reason)
    return out


def resumed(run: Run, who: str, why: str, now: float) -> Run:
    """PAUSED: the current wave bakes again from now. HALTED: the failed wave is tried again."""
    if run.state not in (Run.PAUSED, Run.HALTED):
        raise TransitionError(f"{run.name} is {state_name(run.state)}; only a PAUSED or HALTED roll-out can be "
                              "resumed")
    out = copy_run(run)
    out.state = Run.RUNNING
    out = start_wave(out, max(0, out.current_wave), now)
    out.reason = f"resumed by {who}" + (f": {why}" if why else "") + f"; {out.reason}"
    _event(out, now, out.reason)
    return out


def returning(run: Run) -> Run:
    """First step of abort/undo on an active run: every node back on the base revision (still active)."""
    out = copy_run(run)
    del out.reached[:]
    return out


def finished_back(run: Run, who: str, why: str, problems: Sequence[str], now: float) -> Run:
    """Abort (an active run) or undo (a completed or halted one): the store holds the base content again."""
    out = copy_run(run)
    del out.reached[:]
    verb = "undone" if run.state in (Run.COMPLETED, Run.HALTED) else "aborted"
    out.state = Run.UNDONE if verb == "undone" else Run.ABORTED
    out.reason = (f"{verb} by {who}" + (f": {why}" if why else "")
                  + f"; every node is back on revision {out.base_revision}'s content")
    if problems:
        out.reason += f" (not restored: {'; '.join(problems)})"
    _event(out, now, out.reason)
    return out
