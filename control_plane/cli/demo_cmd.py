"""`mtlsgate demo [--dir DIR]`: the whole system as local processes, configured and ready to try."""

from __future__ import annotations

import argparse

from control_plane.cli.common import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the local demo stack (work in progress)")
    parser.add_argument("--dir", default="demo", help="working directory (default %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise CliError("not built yet")
