"""SPEC §10 B1/B2/B7: new mTLS handshakes/s and kept-alive proxied requests/s through one mtlsgate node
(WorkerPool, 2 workers) vs nginx (2 workers), same certificates (ECDSA P-256 and RSA-2048), same load
generator (bench/mtls_load.c, compiled here), same backend (a static nginx server), in one run; and B7,
the same node build with the §11 bounds lifted (MTLSGATE_PROXY_BOUNDS=off) for the CPU per request the
bounds cost.

    .venv/bin/python bench/proxy.py [--seconds 5] [--hs-procs 4] [--ka-procs 8] [--modes hs,ka]

Installs nginx (apt-get) and compiles the load generator (gcc, libssl-dev) when missing.
Both servers: TLS 1.3, no session tickets or cache, client certificate required and verified against the
same root + intermediate, upstream keep-alive to the backend.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from control_plane.pki import crl_pem, issue, make_crl  # noqa: E402


def ensure_tools(work: Path) -> Path:
    if shutil.which("nginx") is None:
        print("installing nginx-light with apt-get …", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    if not Path("/usr/include/openssl/ssl.h").exists():
        subprocess.run(["apt-get", "install", "-y", "-qq", "gcc", "libssl-dev"], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    binary = work / "mtls_load"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(ROOT / "bench" / "mtls_load.c"), "-lssl", "-lcrypto"],
                   check=True)
    return binary


def make_pki(work: Path, key: str) -> dict[str, Path]:
    """Root → intermediate → server and client certificates, all with `key` (ec-p256 / rsa-2048)."""
    root = issue(f"bench root {key}", ca=True, key=key)
    inter = issue(f"bench intermediate {key}", issuer=root, ca=True, path_length=0, key=key)
    server = issue("bench server", issuer=inter, key=key, eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
                   dns=("localhost",), ips=("127.0.0.1",))
    client = issue("bench client", issuer=inter, key=key, uris=("spiffe://bench/client",))
    files = {
        "ca": root.cert_pem, "cas": root.cert_pem + inter.cert_pem, "intermediate": inter.cert_pem,
        "server_cert": server.cert_pem + inter.cert_pem, "server_key": server.key_pem,
        "client_cert": client.cert_pem + inter.cert_pem, "client_key": client.key_pem,
        # nginx checks CRLs for the whole chain (CRL_CHECK_ALL), so the root's is included too
        "crl": crl_pem(make_crl(inter, [12345])) + crl_pem(make_crl(root, [])),
    }
    out = {}
    for name, text in files.items():
        path = work / f"{key}-{name}.pem"
        path.write_text(text)
        out[name] = path
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def start_nginx(work: Path, name: str, body: str) -> subprocess.Popen[bytes]:
    prefix = work / name
    prefix.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp; fastcgi_temp_path {prefix}/tmp;
  uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;
  {body}
}}
""")
    (prefix / "tmp").mkdir(exist_ok=True)
    return subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def nginx_proxy_body(pki: dict[str, Path], port: int, backend_port: int) -> str:
    return f"""
  upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port} ssl reuseport;
    ssl_certificate {pki['server_cert']}; ssl_certificate_key {pki['server_key']};
    ssl_client_certificate {pki['cas']}; ssl_verify_client on; ssl_verify_depth 3;
    ssl_crl {pki['crl']};
    ssl_protocols TLSv1.3; ssl_session_tickets off; ssl_session_cache off;
    keepalive_requests 1000000; keepalive_timeout 60s;
    location / {{
      proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Client-Cert-Present true;
      proxy_set_header X-Client-Cert-Chain-Verified $ssl_client_verify;
      proxy_set_header X-Client-Cert-Serial-Number $ssl_client_serial;
      proxy_set_header X-Client-Cert-Hash $ssl_client_fingerprint;
      proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Forwarded-Proto https;
    }}
  }}"""


def node_config(pki: dict[str, Path], port: int, backend_port: int) -> object:
    """The NodeConfig both bench nodes serve: one listener, REJECT_INVALID against root + intermediate + CRL,
    the default header set (also used by bench/hot_path.py)."""
    from mtlsgate.v1 import resources_pb2, xds_pb2

    from data_plane.node.config import NodeConfig
    from data_plane.validation.bundle import trust_bundle_from_trust_config

    tc = resources_pb2.TrustConfig(name="trustConfigs/bench")
    store = tc.trust_stores.add()
    store.trust_anchors.add(pem_certificate=pki["ca"].read_text())
    store.intermediate_cas.add(pem_certificate=pki["intermediate"].read_text())
    store.crls.add(pem_crl=pki["crl"].read_text())
    policy = resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/bench")
    policy.mtls_policy.client_validation_mode = resources_pb2.MTLSPolicy.REJECT_INVALID
    policy.mtls_policy.client_validation_trust_config = tc.name
    listener = resources_pb2.Listener(name="listeners/bench", port=port, backend=f"127.0.0.1:{backend_port}",
                                      certificate="certificates/bench", server_tls_policy=policy.name)
    listener.resolved_server_tls_policy.CopyFrom(policy)
    cert = xds_pb2.ServerCertificate(name="certificates/bench", pem_certificate_chain=pki["server_cert"].read_text(),
                                     pem_private_key=pki["server_key"].read_text())
    return NodeConfig(versions={"bench": "1"}, listeners={listener.name: listener},
                      bundles={tc.name: trust_bundle_from_trust_config(tc)}, certificates={cert.name: cert})


class MtlsgateNode:
    """A WorkerPool with 2 workers (the node's data plane) on its own event loop thread."""

    def __init__(self, pki: dict[str, Path], port: int, backend_port: int, bounds: str | None = None) -> None:
        from data_plane.workers.pool import WorkerPool

        self.config = node_config(pki, port, backend_port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = WorkerPool(2, "127.0.0.1")
        previous = os.environ.pop("MTLSGATE_PROXY_BOUNDS", None)
        if bounds is not None:
            os.environ["MTLSGATE_PROXY_BOUNDS"] = bounds  # read by the workers it spawns
        try:
            self._run(self.pool.start())
        finally:
            os.environ.pop("MTLSGATE_PROXY_BOUNDS", None)
            if previous is not None:
                os.environ["MTLSGATE_PROXY_BOUNDS"] = previous
        self._run(self.pool.apply(self.config))

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)  # type: ignore[arg-type]

    def worker_pids(self) -> list[int]:
        return self.pool.pids()

    def close(self) -> None:
        self._run(self.pool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU of processes (and their reaped children) from /proc, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])
        except (OSError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def user_system_seconds(pids: list[int]) -> tuple[float, float]:
    user = system = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user, system = user + int(fields[11]), system + int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def profile_workers(out: Path, key: str, binary: Path, port: int, pids: list[int], args: argparse.Namespace,
                    pki: dict[str, Path]) -> None:
    """B2 under py-spy (Python frames only: time in C, syscalls included, is charged to the calling
    line, so `transport.write` lines are the send syscalls and `Runner.run` is uvloop's own C code)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    seconds = max(3, int(args.seconds))
    files = [out / f"{key}-worker{i}.txt" for i in range(len(pids))]
    spies = [subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "-f", "raw",
                               "-o", str(f), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for pid, f in zip(pids, files, strict=True)]
    user0, sys0 = user_system_seconds(pids)
    r = load(binary, port, "ka", args.ka_procs, seconds, pki)
    user1, sys1 = user_system_seconds(pids)
    for p in spies:
        p.wait(60)
    ops = max(r["ok"], 1)
    print(f"{key:9} profile: {r['rate']:.1f}/s; per request user {1e6 * (user1 - user0) / ops:.0f} us, "
          f"system {1e6 * (sys1 - sys0) / ops:.0f} us; raw py-spy samples in {out}")
    lines: collections.Counter[str] = collections.Counter()
    for f in files:
        for row in f.read_text().splitlines() if f.exists() else []:
            stack, _, count = row.rpartition(" ")
            lines[stack.rsplit(";", 1)[-1].strip()] += int(count)
    total = sum(lines.values()) or 1
    for frame, n in lines.most_common(12):
        print(f"{key:9}   {100 * n / total:5.1f}%  {frame}")


def nginx_worker_pids(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def load(binary: Path, port: int, mode: str, procs: int, seconds: float, pki: dict[str, Path]) -> dict:
    out = subprocess.run([str(binary), "127.0.0.1", str(port), mode, str(procs), str(seconds),
                          str(pki["client_cert"]), str(pki["client_key"])],
                         capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements per server and mode, interleaved; medians are reported")
    parser.add_argument("--hs-procs", type=int, default=4, help="load processes for the handshake test")
    parser.add_argument("--ka-procs", type=int, default=8, help="kept-alive connections for the request test")
    parser.add_argument("--keys", default="ec-p256,rsa-2048")
    parser.add_argument("--modes", default="hs,ka", help="hs (B1 handshakes), ka (B2/B7 kept-alive requests)")
    parser.add_argument("--no-b7", action="store_true", help="skip the node with the bounds off (B7)")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the rounds, one more kept-alive run with py-spy on every mtlsgate worker: raw "
                             "samples in DIR, the hottest lines and the user/system CPU split printed")
    args = parser.parse_args()
    command = "python bench/proxy.py " + " ".join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="mtlsgate-bench-"))
    binary = ensure_tools(work)

    backend_port = free_port()
    backend = start_nginx(work, "backend", f"""
  server {{ listen 127.0.0.1:{backend_port} reuseport; keepalive_requests 1000000;
    location / {{ return 200 "ok\\n"; }} }}""")
    wait_port(backend_port)
    results: dict[str, dict[str, dict]] = {}
    try:
        for key in args.keys.split(","):
            pki = make_pki(work, key)
            results[key] = {}
            nginx_port, node_port = free_port(), free_port()
            nginx = start_nginx(work, f"nginx-{key}", nginx_proxy_body(pki, nginx_port, backend_port))
            node = MtlsgateNode(pki, node_port, backend_port)
            unbounded = None if args.no_b7 else MtlsgateNode(pki, unbounded_port := free_port(), backend_port, "off")
            try:
                wait_port(nginx_port)
                wait_port(node_port)
                servers = {"nginx": (nginx_port, lambda master=nginx.pid: nginx_worker_pids(master)),
                           "mtlsgate": (node_port, node.worker_pids)}
                if unbounded is not None:
                    wait_port(unbounded_port)
                    servers["mtlsgate-unbounded"] = (unbounded_port, unbounded.worker_pids)
                for port, _ in servers.values():
                    load(binary, port, "ka", 2, 1.0, pki)  # warm up (imports, caches, upstream pool)
                runs: dict[str, list[dict]] = {}
                # Interleaved rounds (alternating which server goes first): the machine is shared, so
                # load from elsewhere falls on both servers alike; medians are reported.
                for round_no in range(args.rounds):
                    order = list(servers.items()) if round_no % 2 == 0 else list(reversed(servers.items()))
                    for mode, procs in (("hs", args.hs_procs), ("ka", args.ka_procs)):
                        if mode not in args.modes.split(","):
                            continue
                        for name, (port, pids) in order:
                            if mode == "hs" and name == "mtlsgate-unbounded":
                                continue  # the bounds are per connection and request, not per handshake
                            cpu_before = cpu_seconds(pids())
                            r = load(binary, port, mode, procs, args.seconds, pki)
                            r["server_cpu_ms_per_op"] = round(
                                1000 * (cpu_seconds(pids()) - cpu_before) / max(r["ok"], 1), 3)
                            runs.setdefault(f"{name}_{mode}", []).append(r)
                            print(f"{key:9} round {round_no + 1} {name:18} {mode}: {r['rate']:9.1f}/s  "
                                  f"errors {r['errors']}  server CPU {r['server_cpu_ms_per_op']} ms/op", flush=True)
                if args.profile:
                    profile_workers(Path(args.profile), key, binary, node_port, node.worker_pids(), args, pki)
                for label, rs in runs.items():
                    results[key][label] = {
                        "rate": statistics.median(r["rate"] for r in rs),
                        "server_cpu_ms_per_op": statistics.median(r["server_cpu_ms_per_op"] for r in rs),
                        "errors": sum(r["errors"] for r in rs),
                    }
            finally:
                node.close()
                if unbounded is not None:
                    unbounded.close()
                nginx.terminate()
                nginx.wait(10)
    finally:
        backend.terminate()
        backend.wait(10)

    print("\nSPEC §10 (one run, one 2-core machine shared by client, proxy and backend)")
    print(f"{'key':9} {'metric (median)':28} {'mtlsgate':>10} {'nginx':>10} {'ratio':>7}   server CPU/op ours vs nginx")
    summary = {}
    for key, r in results.items():
        for mode, label in (("hs", "B1 new mTLS handshakes/s"), ("ka", "B2 kept-alive requests/s")):
            if f"mtlsgate_{mode}" not in r:
                continue
            ours, theirs = r[f"mtlsgate_{mode}"]["rate"], r[f"nginx_{mode}"]["rate"]
            ratio = ours / theirs if theirs else 0.0
            cpu_ours, cpu_theirs = r[f"mtlsgate_{mode}"]["server_cpu_ms_per_op"], r[f"nginx_{mode}"]["server_cpu_ms_per_op"]
            summary[f"{key}_{mode}"] = {"mtlsgate": ours, "nginx": theirs, "ratio": round(ratio, 2),
                                        "cpu_ms_per_op": {"mtlsgate": cpu_ours, "nginx": cpu_theirs}}
            print(f"{key:9} {label:28} {ours:10.1f} {theirs:10.1f} {ratio:7.2f}   "
                  f"{cpu_ours:.3f} ms vs {cpu_theirs:.3f} ms")
        if "mtlsgate-unbounded_ka" in r:
            on, off = r["mtlsgate_ka"], r["mtlsgate-unbounded_ka"]
            cost = on["server_cpu_ms_per_op"] / off["server_cpu_ms_per_op"] if off["server_cpu_ms_per_op"] else 0.0
            summary[f"{key}_b7"] = {"cpu_ms_per_op_bounds_on": on["server_cpu_ms_per_op"],
                                    "cpu_ms_per_op_bounds_off": off["server_cpu_ms_per_op"], "ratio": round(cost, 3),
                                    "rate_bounds_off": off["rate"]}
            print(f"{key:9} {'B7 CPU/request bounds on/off':28} {on['server_cpu_ms_per_op']:10.4f} "
                  f"{off['server_cpu_ms_per_op']:10.4f} {cost:7.3f}   (ms/request; ≤ 1.05 is the target)")
    print(f"\ncommand: {command}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
