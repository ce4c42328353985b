"""B2's per-request work without the network: the real worker objects (ClientConnection, the listener's
ServerTls and validation verdict, Exchange, BackendPool) driven in one process with in-memory transports,
so a change to the kept-alive path can be judged on its own, away from the load generator and the
scheduler that make `bench/proxy.py`'s figures swing ±15 % on a shared 2-core machine.

    .venv/bin/python bench/hot_path.py [--requests 40000] [--repeat 5] [--keys ec-p256]
    .venv/bin/python bench/hot_path.py --instructions      # instructions per request under valgrind (exact)

One mTLS connection (bench/proxy.py's certificates and listener: REJECT_INVALID, the default header set)
sends the load generator's GET; the bytes the node writes to the backend are checked once, then an nginx-
like kept-alive answer is fed back and the client decrypts it. Reported: µs per request (best of
`--repeat`) for the whole path and for the TLS records alone (decrypt one request, encrypt one response),
so the difference is our HTTP/1.1 work. `--instructions` runs the same under `valgrind --tool=callgrind`
twice (N and 4N requests) and prints the instruction count per request: deterministic, so a change of
1 % shows. Needs valgrind (apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: mtls_load\r\n\r\n"  # bench/mtls_load.c's
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 14:40:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")
BACKEND = ("127.0.0.1", 9)


class MemoryTransport:
    """What a protocol needs of an asyncio transport; writes are kept in `out`."""

    def __init__(self, peer: tuple[str, int] | None = None) -> None:
        self.out: list[bytes] = []
        self.peer = peer
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        return data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def measure(key: str, requests: int, repeat: int, tls_only: bool, records_made: int = 0) -> float:
    import proxy as bench_proxy
    from OpenSSL import SSL

    from data_plane.workers.backend import BackendConnection
    from data_plane.workers.http_proxy import ClientConnection
    from data_plane.workers.listeners import WireConfig, compile_listeners, compile_services
    from data_plane.workers.worker import Worker

    pki = bench_proxy.make_pki(Path(tempfile.mkdtemp(prefix="mtlsgate-hot-path-")), key)
    wire = WireConfig.from_node_config(bench_proxy.node_config(pki, 1, BACKEND[1]))
    runtime = next(iter(compile_listeners(wire, compile_services(wire)).values()))
    worker = Worker(None, 0, "127.0.0.1")  # type: ignore[arg-type]  # no pipe: never run, only its state
    conn = ClientConnection(worker, lambda: runtime)
    client_side = MemoryTransport(("127.0.0.60", 40000))
    conn.connection_made(client_side)  # type: ignore[arg-type]

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.use_certificate_chain_file(str(pki["client_cert"]))
    context.use_privatekey_file(str(pki["client_key"]))
    client = SSL.Connection(context, None)
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except SSL.WantReadError:
            conn.data_received(client.bio_read(65536))
            client.bio_write(client_side.take())
    else:
        raise SystemExit("the TLS handshake did not complete")
    backend_side = MemoryTransport()
    backend = BackendConnection(1 << 16)
    backend.connection_made(backend_side)  # type: ignore[arg-type]
    worker.backends.release(BACKEND, backend)

    records = []
    for _ in range(max(records_made, requests * repeat + 1)):  # the same setup whatever is timed
        client.send(REQUEST)
        records.append(client.bio_read(65536))
    # The first request completes the server's handshake (the client's Finished rides with it) and is checked.
    conn.data_received(records[0])
    forwarded = backend_side.take()
    if not forwarded.startswith(b"GET / HTTP/1.1\r\nHost: bench\r\n") or b"X-Client-Cert-Chain-Verified: true" not in forwarded:
        raise SystemExit(f"unexpected forwarded head: {forwarded[:200]!r}")
    backend.data_received(RESPONSE)
    client.bio_write(client_side.take())
    answer = client.recv(65536)
    if not answer.startswith(b"HTTP/1.1 200 OK\r\n") or not answer.endswith(b"\r\n\r\nok\n"):
        raise SystemExit(f"unexpected answer: {answer!r}")

    tls = conn.tls
    assert tls is not None
    best = float("inf")
    index = 1
    for _ in range(repeat):
        start = time.perf_counter()
        if tls_only:
            for record in records[index:index + requests]:
                tls.receive(record)
                tls.read()
                tls.write(RESPONSE)
                tls.outgoing()
        else:
            for record in records[index:index + requests]:
                conn.data_received(record)
                backend_side.out.clear()
                backend.data_received(RESPONSE)
                client_side.out.clear()
        best = min(best, (time.perf_counter() - start) / requests)
        index += requests
    if not tls_only and (conn.phase != "keepalive" or not worker.backends.take_idle(BACKEND)):
        raise SystemExit(f"the connection did not end idle with its backend connection pooled: {conn.phase} {client_side.out}")
    return best * 1e6


def instructions(args: argparse.Namespace, tls_only: bool) -> float:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind: apt-get install valgrind")

    n = args.requests if args.requests < 40000 else 1000

    def run(requests: int) -> int:
        # both runs make the same 4N+1 client records, so the difference is N..4N requests through the node
        command = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
                   "--requests", str(requests), "--repeat", "1", "--keys", args.keys.split(",")[0], "--quiet",
                   "--records", str(4 * n + 1)]
        if tls_only:
            command.append("--tls-only")
        out = subprocess.run(command, capture_output=True, text=True, check=True).stderr
        found = re.search(r"Collected : (\d+)", out)
        if found is None:
            raise SystemExit(f"no instruction count in valgrind's output: {out[-300:]}")
        return int(found.group(1))

    return (run(4 * n) - run(n)) / (3 * n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--repeat", type=int, default=5, help="timed passes; the best is reported")
    parser.add_argument("--keys", default="ec-p256")
    parser.add_argument("--instructions", action="store_true", help="count instructions under valgrind instead")
    parser.add_argument("--tls-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--records", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    with_uvloop = os.environ.get("MTLSGATE_HOT_PATH_LOOP") != "asyncio"
    if with_uvloop:
        import uvloop

        uvloop.install()
    if args.quiet:
        asyncio.run(measure(args.keys, args.requests, args.repeat, args.tls_only, args.records))
        return 0
    print("command: python bench/hot_path.py " + " ".join(sys.argv[1:]))
    for key in args.keys.split(","):
        if args.instructions:
            whole, records = instructions(args, False), instructions(args, True)
            print(f"{key:9} instructions per request: {whole:,.0f} (TLS records alone {records:,.0f}; "
                  f"HTTP/1.1 and the rest {whole - records:,.0f})")
            continue
        whole = asyncio.run(measure(key, args.requests, args.repeat, False))
        records = asyncio.run(measure(key, args.requests, args.repeat, True))
        print(f"{key:9} µs per request: {whole:.1f} (TLS records alone {records:.1f}; "
              f"HTTP/1.1 and the rest {whole - records:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
