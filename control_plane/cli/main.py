"""`mtlsgate` entry point: builds the argument parser from the command modules and runs one command."""

from __future__ import annotations

import importlib
import os
import sys

from control_plane.cli.common import CliError, Parser, UsageError

# Each module defines `register(subparsers)`; its parsers set `func(args) -> int`.
COMMAND_MODULES = [
    "control_plane.cli.pki_cmd",
    "control_plane.cli.control_plane_cmd",
    "control_plane.cli.resources_cmd",
    "control_plane.cli.echo_cmd",
    "control_plane.cli.probe_cmd",
    "control_plane.cli.demo_cmd",
    "control_plane.cli.proxy_cmd",
    "control_plane.cli.status_cmd",
    "control_plane.cli.check_cmd",
    "control_plane.cli.config_cmd",
    "control_plane.cli.rollout_cmd",
    "control_plane.cli.clients_cmd",
    "control_plane.cli.shadow_cmd",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mtlsgate")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> Parser:
    parser = Parser(
        prog="mtlsgate",
        description="Self-hosted mutual-TLS edge: control plane, proxy nodes and the tools to manage them.",
    )
    parser.add_argument("--version", action="version", version=f"mtlsgate {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"mtlsgate {args.command}: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"mtlsgate {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`mtlsgate get … | head`): no traceback, and no second error when Python
        # flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
