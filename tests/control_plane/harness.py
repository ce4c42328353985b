"""Start a real `mtlsgate control-plane` process for a test and wait until gRPC health says SERVING.
Reusable by every suite: `proc, address = start_control_plane(tmp_path, logs_dir)`.

The control plane is secure by default (SPEC §8). This harness is THE one place where tests that are not
about security turn authentication off: `start_control_plane` passes `--insecure` unless called with
`insecure=False` (security tests, which pass the TLS flags and `credentials`), and `control_plane_args`
builds the same command line for tests that run the process themselves (start-up errors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import GiveUp, Proc, free_port, wait_until


def health_serving(address: str, *, credentials: grpc.ChannelCredentials | None = None) -> bool:
    channel = (grpc.secure_channel(address, credentials) if credentials is not None
               else grpc.insecure_channel(address))
    with channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return response.status == health_pb2.HealthCheckResponse.SERVING


def control_plane_args(address: str, db: Path | str, extra_args: Sequence[str] = (), *,
                       insecure: bool = True) -> list[str]:
    """`control-plane --listen ADDRESS --db DB [--insecure] EXTRA…` (arguments after `mtlsgate`)."""
    return ["control-plane", "--listen", address, "--db", str(db), *(["--insecure"] if insecure else []),
            *extra_args]


def start_control_plane(tmp_path: Path, logs_dir: Path, extra_args: Sequence[str] = (), *,
                        db: Path | str | None = None, port: int | None = None, timeout: float = 20.0,
                        credentials: grpc.ChannelCredentials | None = None,
                        insecure: bool = True, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """A control plane on 127.0.0.1:<free port> with its database in `tmp_path` (or `db`). Returns the
    process (call `.stop()` or `.kill9()`) and its `HOST:PORT`. `insecure=True` (the default for tests
    that are not about security) adds `--insecure`; with `insecure=False` pass the TLS flags in
    `extra_args` and `credentials` so that the health wait can connect."""
    address = f"127.0.0.1:{port or free_port()}"
    db_path = str(db if db is not None else tmp_path / "control-plane.db")
    log_path = logs_dir / f"control-plane-{address.rpartition(':')[2]}.log"
    proc = Proc(control_plane_args(address, db_path, extra_args, insecure=insecure), log_path, env=env)
    try:
        wait_until(lambda: _ready(proc, address, credentials), timeout=timeout,
                   message=f"control plane on {address} to report SERVING")
    except AssertionError as exc:
        proc.stop()
        raise AssertionError(f"{exc}\n--- control plane log ---\n{proc.log()}") from None
    return proc, address


def _ready(proc: Proc, address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    if not proc.alive():
        raise GiveUp(f"control plane exited with {proc.popen.returncode}")
    return health_serving(address, credentials=credentials)
