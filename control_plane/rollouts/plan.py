"""Wave planning (pure): `plan(nodes, policy) → waves`. Deterministic: nodes are taken in node-ID order,
so the same fleet and policy always give the same waves (and `rollout status` can show them up front)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mtlsgate.v1 import rollouts_pb2

from control_plane.rollouts.policy import wave_bake


@dataclass(frozen=True)
class PlannedWave:
    node_ids: tuple[str, ...]
    bake_seconds: float
    source: str  # which policy wave made it: `waves[0]`, or `rest` for the nodes no wave took


def plan(nodes: Mapping[str, Mapping[str, str]], policy: rollouts_pb2.RolloutPolicy) -> list[PlannedWave]:
    """`nodes`: the targeted nodes (ID → labels). Waves that would be empty are left out; targeted nodes
    no wave takes form a last wave (`rest`, no bake), so a roll-out always ends with every node reached."""
    remaining = sorted(nodes)
    total = len(remaining)
    reached = 0
    waves: list[PlannedWave] = []
    for i, wave in enumerate(policy.waves):
        taken: Sequence[str]
        if wave.nodes:
            taken = remaining[: wave.nodes]
        elif wave.percent:
            want = min(total, math.ceil(total * wave.percent / 100 - 1e-9))
            taken = remaining[: max(0, want - reached)]
        else:
            taken = [n for n in remaining if all(nodes[n].get(k) == v for k, v in wave.selector.items())]
        if not taken:
            continue
        chosen = set(taken)
        remaining = [n for n in remaining if n not in chosen]
        reached += len(taken)
        waves.append(PlannedWave(tuple(taken), wave_bake(policy, i), f"waves[{i}]"))
    if remaining:
        waves.append(PlannedWave(tuple(remaining), 0.0, "rest"))
    return waves
