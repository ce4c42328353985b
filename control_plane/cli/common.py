"""Pieces every CLI command shares: errors that become one-line messages and exit codes, `--server`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

DEFAULT_SERVER = "127.0.0.1:18000"


class CliError(Exception):
    """A failure reported as one line on stderr with a non-zero exit code."""

    exit_code = 1


class UsageError(CliError):
    """Bad arguments or unreadable input (exit code 2)."""

    exit_code = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command and where help is, not the usage dump
    (every subcommand parser is of this class too: argparse makes them with the parent's class)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def add_server_argument(parser: argparse.ArgumentParser, help: str = "control plane HOST:PORT", *,
                        from_context: bool = False) -> None:
    """`from_context`: leave it unset when not given, so that the CLI context can supply it."""
    if from_context:
        parser.add_argument("--server", default=None,
                            help=f"{help} (env MTLSGATE_SERVER, else the context's server, else {DEFAULT_SERVER})")
        return
    parser.add_argument(
        "--server",
        default=os.environ.get("MTLSGATE_SERVER", DEFAULT_SERVER),
        help=f"{help} (env MTLSGATE_SERVER; default %(default)s)",
    )
