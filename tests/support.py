"""Test plumbing shared by every suite: waiting on conditions with deadlines, free ports, real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

MTLSGATE = [sys.executable, "-m", "control_plane.cli.main"]


class GiveUp(Exception):
    """Raised by a `wait_until` condition when waiting longer cannot help (e.g. the process died)."""


def wait_until(condition: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> T:
    """Poll `condition` until it returns a truthy value (returned) or `timeout` passes (AssertionError).
    Exceptions raised by `condition` count as "not yet" (the last one is reported on timeout), except
    `GiveUp`, which ends the wait at once as an AssertionError."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except GiveUp as exc:
            raise AssertionError(f"gave up waiting for {message}: {exc}") from None
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {message}{detail}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


# Every Proc not yet stopped: `stop_leftovers()` ends them when the test session ends, however it ends
# (a test or fixture that fails between starting a process and its `try`, an interrupted run), so that no
# control plane or proxy outlives the run. Each runs in its own session, so nothing else would stop it.
_RUNNING: set[Proc] = set()


def stop_leftovers() -> list[str]:
    """SIGKILL the process group of every Proc still running; returns what was killed."""
    killed = []
    for proc in list(_RUNNING):
        if proc.alive():
            killed.append(" ".join(proc.args))
        proc.kill9()
    return killed


class Proc:
    """A real `mtlsgate …` (or any) process with its output in a log file, stopped on `stop()`."""

    def __init__(self, args: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, mtlsgate: bool = True) -> None:
        self.args = [*MTLSGATE, *args] if mtlsgate else list(args)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                      cwd=cwd, start_new_session=True)
        _RUNNING.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        """SIGKILL the whole process group (the process and any workers it forked)."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # leftover children (workers) of a dead supervisor
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self._log.close()
        _RUNNING.discard(self)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        with contextlib.suppress(ProcessLookupError):  # leftover children (workers) of a dead supervisor
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()
        _RUNNING.discard(self)
        return self.popen.returncode

    def __repr__(self) -> str:
        return f"Proc({' '.join(self.args)!r}, pid={self.pid})"
