"""Shadow evaluation's cost on handshake CPU (SPEC §12, issue 12 part 3; target ≤ +10 %): the server CPU
per new mTLS handshake of one node (WorkerPool, 2 workers) without a shadow candidate, with a candidate
that agrees with the active trust config (it adds an anchor: the usual case, the verdict cache answers
it), and with one anchored on another root (it rejects every client: the worst case, since failures are
not cached and each handshake runs the candidate's full path search). Same load generator and backend as
bench/proxy.py (B1), interleaved rounds, medians.

    .venv/bin/python bench/shadow.py [--seconds 5] [--rounds 5] [--hs-procs 4] [--keys ec-p256,rsa-2048]

Installs nginx (the static backend) and compiles the load generator when missing, like bench/proxy.py.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proxy import (  # noqa: E402
    cpu_seconds,
    ensure_tools,
    free_port,
    load,
    make_pki,
    node_config,
    start_nginx,
    wait_port,
)

from control_plane.pki import issue  # noqa: E402

VARIANTS = ("none", "agreeing", "rejecting")


class ShadowNode:
    """bench/proxy.py's node (same TrustConfig, policy and certificate), with or without a candidate."""

    def __init__(self, pki: dict[str, Path], port: int, backend_port: int, variant: str, other_root_pem: str) -> None:
        from mtlsgate.v1 import resources_pb2

        from data_plane.validation.bundle import trust_bundle_from_trust_config
        from data_plane.workers.pool import WorkerPool

        base = node_config(pki, port, backend_port)  # bench/proxy.py's listener, policy and active bundle
        listener = next(iter(base.listeners.values()))
        bundles = dict(base.bundles)
        if variant != "none":
            anchors = [pki["ca"].read_text(), other_root_pem] if variant == "agreeing" else [other_root_pem]
            candidate = resources_pb2.TrustConfig(name="shadowTrustConfigs/bench")
            store = candidate.trust_stores.add()
            for pem in anchors:
                store.trust_anchors.add(pem_certificate=pem)
            store.intermediate_cas.add(pem_certificate=pki["intermediate"].read_text())
            store.crls.add(pem_crl=pki["crl"].read_text())
            bundles[candidate.name] = trust_bundle_from_trust_config(candidate)
            bundles[candidate.name].name = candidate.name
            shadow_policy = resources_pb2.ServerTlsPolicy()
            shadow_policy.CopyFrom(listener.resolved_server_tls_policy)
            shadow_policy.mtls_policy.client_validation_trust_config = candidate.name
            active = listener.resolved_server_tls_policy.mtls_policy.client_validation_trust_config
            listener.shadow_policies.add(candidate=active, candidate_version="bench", server_tls_policy=shadow_policy)
        self.config = dataclasses.replace(base, versions={"bench": variant}, bundles=bundles)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = WorkerPool(2, "127.0.0.1")
        self._run(self.pool.start())
        self._run(self.pool.apply(self.config))

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)  # type: ignore[arg-type]

    def judged(self) -> int:
        """Handshakes judged under the candidate so far (the pool's tally, drained)."""
        async def take() -> list:
            return self.pool.shadow.take()
        rows = self._run(take())
        return sum(r[7] for r in rows if r[3] == 0)  # type: ignore[union-attr]

    def close(self) -> None:
        self._run(self.pool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    parser.add_argument("--hs-procs", type=int, default=4, help="load processes (new handshakes)")
    parser.add_argument("--keys", default="ec-p256,rsa-2048")
    args = parser.parse_args()
    command = "python bench/shadow.py " + " ".join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="mtlsgate-bench-shadow-"))
    binary = ensure_tools(work)
    backend_port = free_port()
    backend = start_nginx(work, "backend", f"""
  server {{ listen 127.0.0.1:{backend_port} reuseport; keepalive_requests 1000000;
    location / {{ return 200 "ok\\n"; }} }}""")
    wait_port(backend_port)
    summary: dict[str, dict] = {}
    try:
        for key in args.keys.split(","):
            pki = make_pki(work, key)
            other_root = issue(f"bench other root {key}", ca=True, key=key).cert_pem
            nodes = {}
            try:
                for variant in VARIANTS:
                    nodes[variant] = ShadowNode(pki, free_port(), backend_port, variant, other_root)
                    wait_port(int(nodes[variant].config.listeners["listeners/bench"].port))
                runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
                for node in nodes.values():
                    load(binary, node.config.listeners["listeners/bench"].port, "hs", 2, 1.0, pki)  # warm up
                    node.judged()
                for round_no in range(args.rounds):
                    order = list(VARIANTS) if round_no % 2 == 0 else list(reversed(VARIANTS))
                    for variant in order:
                        node = nodes[variant]
                        pids = node.pool.pids()
                        before = cpu_seconds(pids)
                        r = load(binary, node.config.listeners["listeners/bench"].port, "hs", args.hs_procs,
                                 args.seconds, pki)
                        r["server_cpu_ms_per_hs"] = round(1000 * (cpu_seconds(pids) - before) / max(r["ok"], 1), 4)
                        r["judged"] = node.judged() if variant != "none" else 0
                        runs[variant].append(r)
                        print(f"{key:9} round {round_no + 1} {variant:10} {r['rate']:8.1f} handshakes/s  errors "
                              f"{r['errors']}  server CPU {r['server_cpu_ms_per_hs']} ms/handshake  judged "
                              f"{r['judged']}", flush=True)
                base = statistics.median(r["server_cpu_ms_per_hs"] for r in runs["none"])
                summary[key] = {"cpu_ms_per_handshake_no_candidate": base}
                for variant in VARIANTS[1:]:
                    cpu = statistics.median(r["server_cpu_ms_per_hs"] for r in runs[variant])
                    summary[key][f"cpu_ms_per_handshake_{variant}"] = cpu
                    summary[key][f"{variant}_vs_none"] = round(cpu / base, 3) if base else 0.0
                    # the tally reaches the pool once a second, so a round's last second counts in the next one
                    summary[key][f"{variant}_judged_per_handshake"] = round(
                        sum(r["judged"] for r in runs[variant]) / max(1, sum(r["ok"] for r in runs[variant])), 3)
                summary[key]["errors"] = sum(r["errors"] for rs in runs.values() for r in rs)
            finally:
                for node in nodes.values():
                    node.close()
    finally:
        backend.terminate()
        backend.wait(10)

    print("\nShadow evaluation: server CPU per new mTLS handshake (median of interleaved rounds)")
    for key, s in summary.items():
        print(f"{key:9} none {s['cpu_ms_per_handshake_no_candidate']:.4f} ms   agreeing candidate "
              f"{s['cpu_ms_per_handshake_agreeing']:.4f} ms ({s['agreeing_vs_none']:.3f}x)   rejecting candidate "
              f"{s['cpu_ms_per_handshake_rejecting']:.4f} ms ({s['rejecting_vs_none']:.3f}x)   target <= 1.10x")
    print(f"\ncommand: {command}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
