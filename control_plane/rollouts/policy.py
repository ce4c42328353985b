"""RolloutPolicy rules (pure): what a valid policy is, with bounds, and its defaults."""

from __future__ import annotations

from mtlsgate.v1 import rollouts_pb2

from data_plane.validation.resources import FieldViolation

MAX_WAVES = 20
MAX_WAVE_NODES = 100_000
MAX_SELECTOR_LABELS = 16
MAX_BAKE_SECONDS = 24 * 3600


def no_nack(policy: rollouts_pb2.RolloutPolicy) -> bool:
    return policy.gates.no_nack if policy.gates.HasField("no_nack") else True


def revocation_fast_path(policy: rollouts_pb2.RolloutPolicy) -> bool:
    return policy.revocation_fast_path if policy.HasField("revocation_fast_path") else True


def max_reject_increase(policy: rollouts_pb2.RolloutPolicy) -> float | None:
    return policy.gates.max_reject_increase if policy.gates.HasField("max_reject_increase") else None


def wave_bake(policy: rollouts_pb2.RolloutPolicy, index: int) -> float:
    wave = policy.waves[index]
    chosen = wave.bake if wave.HasField("bake") else policy.bake
    return chosen.seconds + chosen.nanos / 1e9


def _bake_problem(seconds: float) -> str:
    if seconds < 0:
        return "must not be negative"
    if seconds > MAX_BAKE_SECONDS:
        return f"at most {MAX_BAKE_SECONDS}s (24 h)"
    return ""


def validate_rollout_policy(policy: rollouts_pb2.RolloutPolicy) -> list[FieldViolation]:
    problems: list[FieldViolation] = []
    if not policy.waves:
        problems.append(FieldViolation("waves", "at least one wave is required (e.g. [{nodes: 1}, {percent: 100}])"))
    if len(policy.waves) > MAX_WAVES:
        problems.append(FieldViolation("waves", f"{len(policy.waves)} waves; at most {MAX_WAVES}"))
    bake = policy.bake.seconds + policy.bake.nanos / 1e9
    if problem := _bake_problem(bake):
        problems.append(FieldViolation("bake", problem))
    last_percent = 0.0
    for i, wave in enumerate(policy.waves[:MAX_WAVES]):
        where = f"waves[{i}]"
        given = [k for k, present in (("nodes", wave.nodes != 0), ("percent", wave.percent != 0),
                                      ("selector", bool(wave.selector))) if present]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            problems.append(FieldViolation(where, f"needs exactly one of nodes, percent or selector (got {what})"))
            continue
        if wave.nodes and not 0 < wave.nodes <= MAX_WAVE_NODES:
            problems.append(FieldViolation(f"{where}.nodes", f"must be between 1 and {MAX_WAVE_NODES}"))
        if wave.percent:
            if not 0 < wave.percent <= 100:
                problems.append(FieldViolation(f"{where}.percent", "must be more than 0 and at most 100"))
            elif wave.percent < last_percent:
                problems.append(FieldViolation(f"{where}.percent", f"{wave.percent:g} is below an earlier wave's "
                                               f"{last_percent:g} (percent is the share reached by the end of "
                                               "the wave)"))
            last_percent = max(last_percent, wave.percent)
        if len(wave.selector) > MAX_SELECTOR_LABELS:
            problems.append(FieldViolation(f"{where}.selector", f"at most {MAX_SELECTOR_LABELS} labels"))
        if wave.HasField("bake") and (problem := _bake_problem(wave.bake.seconds + wave.bake.nanos / 1e9)):
            problems.append(FieldViolation(f"{where}.bake", problem))
    if policy.gates.HasField("max_reject_increase") and not 0 <= policy.gates.max_reject_increase <= 1:
        problems.append(FieldViolation("gates.maxRejectIncrease",
                                       "a fraction of handshakes between 0 and 1 (0.02 = 2 percentage points)"))
    return problems
