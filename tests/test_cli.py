"""The `mtlsgate` entry point itself: one-line failures, no tracebacks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import MTLSGATE


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`mtlsgate … | head` must not print a BrokenPipeError traceback when the reader has gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything
    try:
        done = subprocess.run([*MTLSGATE, "pki", "init", str(tmp_path / "pki")], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""
    assert (tmp_path / "pki" / "ca.pem").exists()  # the work itself was done


def test_unknown_command_is_a_usage_error() -> None:
    done = subprocess.run([*MTLSGATE, "no-such-command"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid choice" in done.stderr and "Traceback" not in done.stderr
