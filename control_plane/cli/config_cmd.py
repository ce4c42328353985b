"""`mtlsgate config get-contexts | use-context | set-context | delete-context`: the CLI contexts
(control_plane/cli/contexts.py) — which control plane to talk to, and with which credentials."""

from __future__ import annotations

import argparse
from pathlib import Path

from control_plane.cli.common import UsageError
from control_plane.cli.contexts import CliConfig

_SETTINGS = (("server", "server", "control plane HOST:PORT, or several replicas HOST:PORT,HOST:PORT… (the "
              "CLI uses the first that answers)"),
             ("ca_cert", "caCert", "CA bundle that verifies the control plane's certificate"),
             ("cert", "clientCert", "client certificate (mTLS)"),
             ("key", "clientKey", "private key of the client certificate"),
             ("token", "token", "bearer token (stored in the file, which is kept 0600)"),
             ("token_file", "tokenFile", "file holding the bearer token (read at each command)"))


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser(
        "config", help="CLI contexts: which control plane, which credentials",
        description="Contexts live in $MTLSGATE_CONFIG or ~/.config/mtlsgate/config.yaml. Every client command "
        "takes its server, CA, client certificate/key and token from the current context (or --context NAME / "
        "MTLSGATE_CONTEXT); flags given on the command line override the context.")
    sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    get = sub.add_parser("get-contexts", help="list the contexts (* = current)")
    get.set_defaults(func=run_get)
    use = sub.add_parser("use-context", help="make NAME the current context")
    use.add_argument("name")
    use.set_defaults(func=run_use)
    set_ = sub.add_parser("set-context", help="create or change a context (only the given settings change)")
    set_.add_argument("name")
    for attr, _, text in _SETTINGS:
        flag = {"ca_cert": "--ca-cert", "token_file": "--token-file"}.get(attr, f"--{attr}")
        set_.add_argument(flag, dest=attr, help=text)
    set_.add_argument("--use", action="store_true", help="also make it the current context")
    set_.set_defaults(func=run_set)
    delete = sub.add_parser("delete-context", help="remove a context")
    delete.add_argument("name")
    delete.set_defaults(func=run_delete)


def run_get(args: argparse.Namespace) -> int:
    config = CliConfig.load()
    if not config.contexts:
        print(f"No contexts in {config.path}.")
        return 0
    rows = [["CURRENT", "NAME", "SERVER", "CLIENT CERT", "TOKEN"]]
    for name, context in sorted(config.contexts.items()):
        token = "file" if context.get("tokenFile") else ("yes" if context.get("token") else "-")
        rows.append(["*" if name == config.current else "", name, context.get("server", "-"),
                     context.get("clientCert", "-"), token])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows))
    return 0


def run_use(args: argparse.Namespace) -> int:
    config = CliConfig.load()
    if args.name not in config.contexts:
        raise UsageError(f"no context {args.name!r} in {config.path} (see mtlsgate config get-contexts)")
    config.current = args.name
    config.save()
    print(f'Switched to context "{args.name}".')
    return 0


def run_set(args: argparse.Namespace) -> int:
    config = CliConfig.load()
    context = dict(config.contexts.get(args.name, {}))
    for attr, key, _ in _SETTINGS:
        value = getattr(args, attr)
        if value is None:
            continue
        if attr == "server":
            from control_plane.cli.contexts import server_list

            try:
                value = server_list(value)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if attr in ("ca_cert", "cert", "key", "token_file"):
            path = Path(value).expanduser()
            if not path.is_file():
                raise UsageError(f"--{attr.replace('_', '-')} {value}: no such file")
            value = str(path.resolve())  # the context works from any directory
        context[key] = value
    if "token" in context and "tokenFile" in context:
        raise UsageError("a context holds a token or a tokenFile, not both")
    created = args.name not in config.contexts
    config.contexts[args.name] = context
    if args.use:
        config.current = args.name
    config.save()
    print(f'Context "{args.name}" {"created" if created else "modified"}'
          + (" and made current." if args.use else "."))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    config = CliConfig.load()
    if args.name not in config.contexts:
        raise UsageError(f"no context {args.name!r} in {config.path}")
    del config.contexts[args.name]
    if config.current == args.name:
        config.current = ""
    config.save()
    print(f'Deleted context "{args.name}".')
    return 0
