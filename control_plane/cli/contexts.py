"""CLI contexts (SPEC §8, kubeconfig-style): named connection settings in `$MTLSGATE_CONFIG` or
`~/.config/mtlsgate/config.yaml` —

    contexts: {NAME: {server, caCert, clientCert, clientKey, token | tokenFile}}
    currentContext: NAME

`server` is one HOST:PORT or several control-plane replicas, as a list or `a:18000,b:18000`; the CLI uses
the first that answers (control_plane/cli/client.py).

— and how a client command's flags are completed from the chosen context (`--context`, else
`MTLSGATE_CONTEXT`, else `currentContext`). Flags always override the context."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from control_plane.cli.common import UsageError

FIELDS = ("server", "caCert", "clientCert", "clientKey", "token", "tokenFile")
MAX_CONFIG_BYTES = 1024 * 1024


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get("MTLSGATE_CONFIG"):
        return Path(environ["MTLSGATE_CONFIG"])
    home = Path(environ.get("HOME") or Path.home())
    return Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "mtlsgate" / "config.yaml"


def server_list(value: object) -> str:
    """A context's `server` — `HOST:PORT`, `a:18000,b:18000` or a YAML list of them — as the `--server`
    text (comma-separated); ValueError naming what is wrong."""
    from data_plane.node.servers import ServerListError, parse_servers

    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise ValueError("expected HOST:PORT strings")
        value = ",".join(value)
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT, HOST:PORT,HOST:PORT or a list of them")
    try:
        return ",".join(str(server) for server in parse_servers(value))
    except ServerListError as exc:
        raise ValueError(str(exc)) from None


@dataclass
class CliConfig:
    path: Path
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)
    current: str = ""

    @classmethod
    def load(cls, path: Path | None = None) -> CliConfig:
        path = path or config_path()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise UsageError(f"cannot read the CLI config {path}: {exc.strerror}") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise UsageError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
        try:
            document = yaml.safe_load(data) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
        if not isinstance(document, dict) or not isinstance(document.get("contexts", {}), dict):
            raise UsageError(f"{path}: expected `contexts: {{NAME: {{server, caCert, …}}}}`")
        contexts: dict[str, dict[str, str]] = {}
        for name, entry in (document.get("contexts") or {}).items():
            if not isinstance(entry, dict):
                raise UsageError(f"{path}: contexts.{name}: expected a mapping")
            unknown = sorted(set(entry) - set(FIELDS))
            if unknown:
                raise UsageError(f"{path}: contexts.{name}.{unknown[0]}: unknown field "
                                 f"(known: {', '.join(FIELDS)})")
            values = {k: str(v) for k, v in entry.items() if v is not None and k != "server"}
            if entry.get("server") is not None:
                try:
                    values["server"] = server_list(entry["server"])
                except ValueError as exc:
                    raise UsageError(f"{path}: contexts.{name}.server: {exc}") from None
            contexts[str(name)] = values
        return cls(path, contexts, str(document.get("currentContext") or ""))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Several replicas are written as a list: easier to read and edit than one comma-separated string.
        contexts = {name: {k: (v.split(",") if k == "server" and "," in v else v) for k, v in context.items()}
                    for name, context in self.contexts.items()}
        document: dict[str, Any] = {"contexts": contexts}
        if self.current:
            document["currentContext"] = self.current
        tmp = self.path.with_suffix(".tmp")
        # It may hold a token: readable by its owner only, written whole.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            yaml.safe_dump(document, out, sort_keys=False)
        tmp.replace(self.path)


def selected_context(args: Any, environ: Mapping[str, str] = os.environ) -> tuple[str, dict[str, str]] | None:
    """The context a command runs in, or None (no config, no current context)."""
    wanted = getattr(args, "context", None) or environ.get("MTLSGATE_CONTEXT") or ""
    config = CliConfig.load(config_path(environ))
    name = wanted or config.current
    if not name:
        return None
    if name not in config.contexts:
        source = "--context" if getattr(args, "context", None) else (
            "MTLSGATE_CONTEXT" if wanted else f"currentContext in {config.path}")
        raise UsageError(f"context {name!r} ({source}) is not in {config.path} (see mtlsgate config get-contexts)")
    return name, config.contexts[name]


def apply_context(args: Any, environ: Mapping[str, str] = os.environ) -> None:
    """Fill the connection settings a command's flags left unset from its context (in place)."""
    chosen = selected_context(args, environ)
    context = chosen[1] if chosen else {}
    from control_plane.cli.common import DEFAULT_SERVER

    if not getattr(args, "server", None):
        args.server = environ.get("MTLSGATE_SERVER") or context.get("server") or DEFAULT_SERVER
    for attr, key in (("ca_cert", "caCert"), ("cert", "clientCert"), ("key", "clientKey")):
        if hasattr(args, attr) and not getattr(args, attr) and context.get(key):
            setattr(args, attr, context[key])
    if hasattr(args, "token") and not args.token:
        args.token = environ.get("MTLSGATE_TOKEN") or context.get("token") or None
        if not args.token and context.get("tokenFile"):
            try:
                args.token = Path(context["tokenFile"]).read_text().strip().split()[0]
            except (OSError, IndexError):
                raise UsageError(f"context {chosen[0]!r}: cannot read its tokenFile "  # type: ignore[index]
                                 f"{context['tokenFile']}") from None
