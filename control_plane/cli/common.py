"""Pieces every CLI command shares: errors that become one-line messages and exit codes, `--server`."""

from __future__ import annotations

import argparse
import os

DEFAULT_SERVER = "127.0.0.1:18000"


class CliError(Exception):
    """A failure reported as one line on stderr with a non-zero exit code."""

    exit_code = 1


class UsageError(CliError):
    """Bad arguments or unreadable input (exit code 2)."""

    exit_code = 2


def add_server_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("MTLSGATE_SERVER", DEFAULT_SERVER),
        help="control plane HOST:PORT (env MTLSGATE_SERVER; default %(default)s)",
    )
