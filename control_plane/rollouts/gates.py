"""Roll-out gates (pure): `gate(GateInput) → GateDecision` — go on to the next wave, wait, or halt.

Inputs, all about the wave's nodes:
- `nodes`: per node whether it is connected, has ACKed the new configuration, or NACKed it (xDS status);
- `rejects_before` / `rejects_during`: handshakes and rejected handshakes from node reports (SPEC §12),
  under the previous revision over a window before the wave (as long as the bake) and since the wave got
  the new revision. The reject rate is rejected / handshakes; the gate halts when the rate during the
  bake exceeds the rate before by more than `maxRejectIncrease` (a fraction: 0.02 = 2 points). `None`
  means no reports were available: a configured gate then halts at the end of the bake rather than pass
  blind; zero handshakes (no client came) passes;
- `shadow_new_rejects`: handshakes shadow evaluation says the new configuration would newly reject;
  `None` (no evaluation available) makes a configured `shadowNoNewRejects` halt at the end of the bake,
  like a missing report for `maxRejectIncrease`: a gate never passes blind.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

# Fewer handshakes than this during the bake are not enough to halt early on a rate; at the end of the
# bake any number counts.
MIN_EARLY_HANDSHAKES = 20


@dataclass(frozen=True)
class NodeProgress:
    node_id: str
    connected: bool
    acked: bool  # has ACKed every type of the new configuration it subscribes to
    nack: str = ""  # its NACK of the new configuration ("Listener version V: error"), "" if none


@dataclass(frozen=True)
class RejectWindow:
    handshakes: int
    rejected: int

    @property
    def rate(self) -> float:
        return self.rejected / self.handshakes if self.handshakes else 0.0


@dataclass(frozen=True)
class GateInput:
    now: float
    wave_started: float
    bake_seconds: float
    nodes: Sequence[NodeProgress]
    no_nack: bool = True
    ack_timeout: float = 30.0  # a connected node that has not ACKed by then halts the roll-out
    max_reject_increase: float | None = None
    rejects_before: RejectWindow | None = None
    rejects_during: RejectWindow | None = None
    shadow_no_new_rejects: bool = False
    shadow_new_rejects: int | None = None


class Verdict(enum.Enum):
    WAIT = "wait"
    GO = "go"
    HALT = "halt"


@dataclass(frozen=True)
class GateDecision:
    verdict: Verdict
    reason: str = ""


def _reject_problem(max_increase: float, before: RejectWindow | None, during: RejectWindow) -> str:
    base = before.rate if before is not None else 0.0
    increase = during.rate - base
    if increase <= max_increase:
        return ""
    before_text = (f"{before.rejected}/{before.handshakes} = {before.rate:.1%}" if before is not None and
                   before.handshakes else "no handshakes")
    return (f"gate maxRejectIncrease: reject rate {during.rejected}/{during.handshakes} = {during.rate:.1%} on "
            f"the wave's nodes, up {increase * 100:.1f} points from {before_text} before the wave "
            f"(allowed: {max_increase * 100:.1f} points)")


def gate(given: GateInput) -> GateDecision:
    if given.no_nack:
        for node in given.nodes:
            if node.nack:
                return GateDecision(Verdict.HALT, f"gate noNack: node {node.node_id} rejected {node.nack}")
    elapsed = given.now - given.wave_started
    early = given.rejects_during
    if given.max_reject_increase is not None and early is not None and early.handshakes >= MIN_EARLY_HANDSHAKES \
            and (problem := _reject_problem(given.max_reject_increase, given.rejects_before, early)):
        return GateDecision(Verdict.HALT, problem)
    if given.shadow_no_new_rejects and given.shadow_new_rejects:
        return GateDecision(Verdict.HALT, f"gate shadowNoNewRejects: shadow evaluation saw "
                                          f"{given.shadow_new_rejects} new rejects on the wave's nodes")
    waiting = [n.node_id for n in given.nodes if n.connected and not n.acked]
    if waiting:
        if elapsed >= max(given.ack_timeout, given.bake_seconds):
            return GateDecision(Verdict.HALT, f"node {waiting[0]} did not ACK the new configuration within "
                                              f"{max(given.ack_timeout, given.bake_seconds):g}s")
        return GateDecision(Verdict.WAIT, f"waiting for {len(waiting)} node(s) to ACK ({waiting[0]} first)")
    if elapsed < given.bake_seconds:
        return GateDecision(Verdict.WAIT, f"baking: {given.bake_seconds - elapsed:.0f}s left")
    if given.shadow_no_new_rejects and given.shadow_new_rejects is None:
        return GateDecision(Verdict.HALT, "gate shadowNoNewRejects: no shadow evaluation for the wave's nodes "
                                          "during the bake (the gate needs it to judge)")
    if given.max_reject_increase is not None:
        during = given.rejects_during
        if during is None:
            return GateDecision(Verdict.HALT, "gate maxRejectIncrease: no node reports for the wave's nodes "
                                              "during the bake (the gate needs them to judge)")
        if during.handshakes and (problem := _reject_problem(given.max_reject_increase, given.rejects_before,
                                                             during)):
            return GateDecision(Verdict.HALT, problem)
    return GateDecision(Verdict.GO, "gates passed")
