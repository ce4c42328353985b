"""Simulated xDS nodes in several processes (bench/convergence.py B3/B4, tests/xds/test_scale.py).

A simulated node holds one ADS stream, subscribes like a real node (Listener wildcard, the demo's
TrustBundle and ServerCertificate by name) and ACKs every response at once. The simulator must not be the
bottleneck at 10,000 streams on a 2-core machine, so the nodes are spread over worker processes, each with
its own event loop and its own channels (each channel one TCP connection, `STREAMS_PER_CHANNEL` streams).

Each worker writes one JSON line to stdout whenever its state changed (at most every `--every` seconds):
`{"nodes": N, "streaming": S, "acked": A, "bundles": {version: count}, "errors": {"CODE: details": count}}`
— `acked` counts nodes that ACKed all three types, `errors` streams that ended with a gRPC error. The
parent (`SimFleet`) sums the workers' last lines.

    .venv/bin/python -m tests.xds.sim_fleet --server 127.0.0.1:18000 --nodes 3000 --procs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from mtlsgate import resource_types as rt

ROOT = Path(__file__).resolve().parents[2]
STREAMS_PER_CHANNEL = 50
SUBSCRIPTIONS = {rt.LISTENER: [], rt.TRUST_BUNDLE: ["trustConfigs/demo"],
                 rt.SERVER_CERTIFICATE: ["certificates/edge"]}


class SimNode:
    """One simulated node's ADS stream."""

    def __init__(self, node_id: str, cluster: str, channel: grpc.aio.Channel) -> None:
        self.node = base_pb2.Node(id=node_id, cluster=cluster)
        self.node.metadata.update({"zone": "a"})
        self.channel = channel
        self.versions: dict[str, str] = {}
        self.streaming = False
        self.error: str | None = None

    async def run(self, changed: asyncio.Event) -> None:
        outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        for i, (type_url, names) in enumerate(SUBSCRIPTIONS.items()):
            request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
            if i == 0:
                request.node.CopyFrom(self.node)
            outbox.put_nowait(request)

        async def requests():  # type: ignore[no-untyped-def]
            while True:
                yield await outbox.get()

        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources(requests())
        try:
            async for response in call:
                self.streaming = True
                self.versions[response.type_url] = response.version_info
                outbox.put_nowait(discovery_pb2.DiscoveryRequest(
                    type_url=response.type_url, version_info=response.version_info,
                    response_nonce=response.nonce, resource_names=SUBSCRIPTIONS[response.type_url]))
                changed.set()
            self.error = "OK: the control plane ended the stream"
        except grpc.aio.AioRpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.streaming = False
            changed.set()


def summary(nodes: list[SimNode]) -> dict[str, object]:
    return {
        "nodes": len(nodes),
        "streaming": sum(n.streaming for n in nodes),
        "acked": sum(len(n.versions) == len(SUBSCRIPTIONS) for n in nodes),
        "bundles": dict(Counter(n.versions.get(rt.TRUST_BUNDLE, "") for n in nodes)),
        "errors": dict(Counter(n.error for n in nodes if n.error)),
    }


async def worker(server: str, cluster: str, first: int, count: int, every: float) -> None:
    channels = [grpc.aio.insecure_channel(server, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(-(-count // STREAMS_PER_CHANNEL))]
    nodes = [SimNode(f"{cluster}-{first + i:05d}", cluster, channels[i // STREAMS_PER_CHANNEL])
             for i in range(count)]
    changed = asyncio.Event()
    tasks = [asyncio.create_task(n.run(changed)) for n in nodes]
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # parent gone = stop
    last = None
    while not stdin_closed.done():
        await asyncio.wait([asyncio.ensure_future(changed.wait()), stdin_closed],
                           return_when=asyncio.FIRST_COMPLETED)
        changed.clear()
        line = json.dumps(summary(nodes), sort_keys=True)
        if line != last:
            print(line, flush=True)
            last = line
        await asyncio.sleep(every)  # coalesce: at most one line per interval
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class SimFleet:
    """`nodes` simulated nodes named `{cluster}-NNNNN` over `procs` worker processes."""

    server: str
    nodes: int
    cluster: str = "scale"
    procs: int = 2
    every: float = 0.02
    _latest: dict[int, dict] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> SimFleet:
        share, extra = divmod(self.nodes, self.procs)
        first = 0
        for p in range(self.procs):
            count = share + (p < extra)
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.xds.sim_fleet", "--worker", "--server", self.server, "--cluster", self.cluster,
                 "--first", str(first), "--nodes", str(count), "--every", str(self.every)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self._workers.append(proc)
            threading.Thread(target=self._read, args=(p, proc), daemon=True).start()
            first += count
        return self

    def _read(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            with self._lock:
                self._latest[index] = json.loads(raw)

    def state(self) -> dict[str, object]:
        """The workers' last lines summed."""
        with self._lock:
            lines = list(self._latest.values())
        bundles: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for line in lines:
            bundles.update(line["bundles"])
            errors.update(line["errors"])
        return {"reporting": len(lines), "streaming": sum(line["streaming"] for line in lines),
                "acked": sum(line["acked"] for line in lines), "bundles": dict(bundles), "errors": dict(errors)}

    def wait(self, condition, timeout: float, what: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if condition(state):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s; simulator state {state}")
            if any(w.poll() is not None for w in self._workers):
                raise RuntimeError(f"a simulator worker exited while waiting for {what}; state {state}")
            time.sleep(0.01)

    def stop(self) -> None:
        for proc in self._workers:
            if proc.stdin:
                proc.stdin.close()
        for proc in self._workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="control plane HOST:PORT (plaintext, --insecure)")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2, help="worker processes")
    parser.add_argument("--cluster", default="scale")
    parser.add_argument("--every", type=float, default=0.02, help="seconds between a worker's state lines")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for every node to ACK")
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker(args.server, args.cluster, args.first, args.nodes, args.every))
        return 0
    started = time.monotonic()
    with SimFleet(args.server, args.nodes, args.cluster, args.procs, args.every) as fleet:
        state = fleet.wait(lambda s: s["acked"] >= args.nodes or s["acked"] + sum(s["errors"].values()) >= args.nodes,
                           args.timeout, f"{args.nodes} simulated nodes to ACK")
        print(json.dumps({**state, "seconds": round(time.monotonic() - started, 2)}, sort_keys=True))
    return 0 if state["acked"] >= args.nodes else 1


if __name__ == "__main__":
    sys.exit(main())
