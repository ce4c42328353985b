"""`mtlsgate rollout status [NAME] | pause | resume | abort | undo` (SPEC §12): follow and steer staged
roll-outs started with `mtlsgate apply --rollout POLICY`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import Any

import grpc
from google.protobuf import json_format
from mtlsgate.v1 import api_pb2, api_pb2_grpc, rollouts_pb2, rollouts_pb2_grpc

from control_plane.cli.client import add_client_arguments, open_channel, rpc_error

TIMEOUT = 30.0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rollout", help="follow and steer staged roll-outs (apply --rollout POLICY)",
        description="status shows a roll-out's waves, which nodes serve the new or the previous revision, its "
        "gates and why it is in its state. pause freezes it; resume continues (a halted wave is tried again); "
        "abort stops a running one and returns every node to the previous revision; undo does the same for a "
        "completed or halted one. NAME defaults to the newest roll-out.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("status", "show a roll-out (default: the newest)"),
                         ("pause", "freeze a running roll-out where it is"),
                         ("resume", "continue a paused roll-out, or retry a halted wave"),
                         ("abort", "stop a roll-out and return every reached node to the previous revision"),
                         ("undo", "return every node of a completed or halted roll-out to the previous revision")):
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument("name", nargs="?", default="", help="rollouts/ID or ID (default: the newest)")
        if action == "status":
            sub.add_argument("-o", "--output", choices=["table", "json"], default="table")
        else:
            sub.add_argument("--reason", default="", help="recorded in the roll-out and the audit log")
        add_client_arguments(sub)
        sub.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    request = rollouts_pb2.RolloutRequest(name=args.name, reason=getattr(args, "reason", ""))
    try:
        with open_channel(args) as channel:
            stub = rollouts_pb2_grpc.RolloutServiceStub(channel)
            if args.action == "status":
                found = stub.GetRollout(request, timeout=TIMEOUT)
                fleet = api_pb2_grpc.FleetServiceStub(channel).ListNodes(api_pb2.ListNodesRequest(),
                                                                          timeout=TIMEOUT)
                if args.output == "json":
                    out = json_format.MessageToDict(found)
                    out["nodeVersions"] = _node_versions(found, fleet)
                    print(json.dumps(out, indent=2))
                else:
                    print(render(found, fleet))
                return 0
            call = {"pause": stub.PauseRollout, "resume": stub.ResumeRollout, "abort": stub.AbortRollout,
                    "undo": stub.UndoRollout}[args.action]
            result = call(request, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None
    print(f"{result.name} {state(result)}: {result.reason}")
    return 0


def state(run: rollouts_pb2.RolloutRun) -> str:
    return rollouts_pb2.RolloutRun.State.Name(run.state)


def _seconds(d: Any) -> float:
    return float(d.seconds + d.nanos / 1e9)


def describe_waves(policy: rollouts_pb2.RolloutPolicy) -> str:
    parts = []
    for wave in policy.waves:
        if wave.nodes:
            text = f"{wave.nodes} node{'s' if wave.nodes != 1 else ''}"
        elif wave.percent:
            text = f"{wave.percent:g}%"
        else:
            text = ",".join(f"{k}={v}" for k, v in sorted(wave.selector.items()))
        bake = _seconds(wave.bake) if wave.HasField("bake") else _seconds(policy.bake)
        parts.append(f"{text} (bake {bake:g}s)" if bake else text)
    return " → ".join(parts)


def describe_gates(policy: rollouts_pb2.RolloutPolicy) -> str:
    gates = policy.gates
    parts = [] if gates.HasField("no_nack") and not gates.no_nack else ["noNack"]
    if gates.HasField("max_reject_increase"):
        parts.append(f"maxRejectIncrease {gates.max_reject_increase:g}")
    if gates.shadow_no_new_rejects:
        parts.append("shadowNoNewRejects")
    if policy.HasField("revocation_fast_path") and not policy.revocation_fast_path:
        parts.append("no revocation fast path")
    return ", ".join(parts) or "-"


def _node_versions(run: rollouts_pb2.RolloutRun, fleet: api_pb2.ListNodesResponse) -> dict[str, Any]:
    """Per node: whether the run has reached it, and the Listener version it has acked."""
    out = {}
    for node in fleet.nodes:
        listener = next((t for t in node.types if t.type_url.endswith(".Listener")), None)
        out[node.id] = {"reached": node.id in run.reached, "connected": node.connected,
                        "ackedListenerVersion": listener.acked_version if listener else "",
                        "state": api_pb2.SyncState.Name(node.state)}
    return out


def render(run: rollouts_pb2.RolloutRun, fleet: api_pb2.ListNodesResponse) -> str:
    lines = [f"{run.name}  {state(run)}  policy {run.policy_name.partition('/')[2]}  revision "
             f"{run.base_revision} → {run.target_revision or '…'}  started by {run.actor}",
             f"  {run.reason}",
             f"  policy: {describe_waves(run.policy)}; gates: {describe_gates(run.policy)}"]
    if run.changed:
        lines.append(f"  changes: {', '.join(run.changed)}")
    now = time.time()
    if run.waves:
        lines.append("  WAVE  STATE      BAKE   NODES")
        for i, wave in enumerate(run.waves):
            if i < run.current_wave or (i == run.current_wave and run.state == rollouts_pb2.RolloutRun.COMPLETED):
                where = "passed"
            elif i == run.current_wave:
                started = _seconds(wave.started)
                where = {rollouts_pb2.RolloutRun.RUNNING: f"baking {now - started:.0f}s",
                         rollouts_pb2.RolloutRun.PAUSED: "paused", rollouts_pb2.RolloutRun.HALTED: "HALTED",
                         }.get(run.state, state(run).lower())
            else:
                where = "pending"
            lines.append(f"  {i + 1:<4}  {where:<9}  {_seconds(wave.bake):>4g}s  {', '.join(wave.node_ids)}")
    versions = _node_versions(run, fleet)
    if versions:
        lines.append("  NODE  SERVES  LISTENER VERSION  STATE")
        width = max(len(n) for n in versions)
        lines[-1] = f"  {'NODE':<{width}}  SERVES    LISTENER VERSION  STATE"
        active = run.state in (rollouts_pb2.RolloutRun.PREPARING, rollouts_pb2.RolloutRun.RUNNING,
                               rollouts_pb2.RolloutRun.PAUSED, rollouts_pb2.RolloutRun.HALTED)
        for node_id, v in sorted(versions.items()):
            serves = ("new" if v["reached"] else "previous") if active else "current"
            lines.append(f"  {node_id:<{width}}  {serves:<8}  {v['ackedListenerVersion'] or '-':<16}  {v['state']}")
    if run.events:
        lines.append("  events:")
        for event in run.events[-10:]:
            when = event.time.ToDatetime(tzinfo=dt.UTC).strftime("%H:%M:%S")
            lines.append(f"    {when}  {event.text}")
    return "\n".join(lines)


def print_started(run: rollouts_pb2.RolloutRun) -> None:
    print(f"{run.name} {state(run)}: {run.reason}")
    for i, wave in enumerate(run.waves):
        print(f"  wave {i + 1}: {', '.join(wave.node_ids)} (bake {_seconds(wave.bake):g}s)")
    if run.state == rollouts_pb2.RolloutRun.RUNNING:
        print(f"follow it with: mtlsgate rollout status {run.name.partition('/')[2]}")
