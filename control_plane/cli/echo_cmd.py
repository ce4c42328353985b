"""`mtlsgate echo-backend --listen HOST:PORT`: the demo backend that answers with the headers it received."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from control_plane.cli.common import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "echo-backend",
        help="run the demo HTTP backend (answers with the request headers as JSON)",
        description="An HTTP/1.1 server that answers every request with its method, path and headers as "
        "JSON, so you can see what the proxy forwarded. GET /healthz answers 'ok'.",
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:9000", help="HOST:PORT to listen on (default %(default)s)"
    )
    parser.add_argument("--name", default="", help="put \"backend\": NAME in every answer (to tell several "
                        "backends apart)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_plane.echo_backend import make_server, parse_listen

    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        server = make_server(host, port, args.name)
    except OSError as exc:
        raise UsageError(f"--listen {args.listen}: {exc.strerror or exc}") from exc

    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        # shutdown() blocks until serve_forever returns, so it must run off the serving thread.
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"echo backend listening on {args.listen}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0
