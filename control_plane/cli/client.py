"""How CLI commands reach the control plane: `--server`, bearer token (`--token` / `MTLSGATE_TOKEN`) and
TLS/mTLS (`--ca-cert`, `--cert`, `--key`) flags, the channel they open, and gRPC errors as one line.

Usage in a command module: `add_client_arguments(parser)` in `register`, then
`with open_channel(args) as channel: …` and `except grpc.RpcError as exc: raise rpc_error(exc, args)`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from control_plane.cli.common import CliError, UsageError, add_server_argument
from control_plane.cli.contexts import apply_context
from data_plane.validation.pem import tls_files_problem

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # same as the server: TrustConfigs with large CRLs


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """`--context`, `--token`, `--ca-cert`, `--cert`, `--key` (for parsers that already have `--server`).
    Whatever is not given comes from the CLI context (control_plane/cli/contexts.py)."""
    group = parser.add_argument_group("control plane connection (flags override the CLI context)")
    group.add_argument("--context", metavar="NAME",
                       help="use this context of the CLI config (env MTLSGATE_CONTEXT; default: currentContext; "
                       "see mtlsgate config)")
    group.add_argument("--token", default=None,
                       help="bearer token for the management API (env MTLSGATE_TOKEN)")
    group.add_argument("--ca-cert", metavar="FILE",
                       help="connect with TLS, trusting this CA for the control plane's certificate")
    group.add_argument("--cert", metavar="FILE", help="client certificate for mTLS (with --key and --ca-cert)")
    group.add_argument("--key", metavar="FILE", help="private key for --cert")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """`--server` plus the authentication flags."""
    add_server_argument(parser, help="control plane HOST:PORT, or several replicas HOST:PORT,HOST:PORT… "
                        "(the first that answers is used)", from_context=True)
    add_auth_arguments(parser)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` (works on plaintext loopback channels too, unlike call credentials)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


# With several --server replicas, how long each gets to accept a connection before the next is tried (a
# replica that refuses the connection is skipped at once).
REPLICA_CONNECT_TIMEOUT = 3.0


def _connects(channel: grpc.Channel, timeout: float) -> bool:
    """Whether the channel becomes READY within `timeout`; False as soon as its first attempt fails."""
    import threading

    settled = threading.Event()
    reached: list[grpc.ChannelConnectivity] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            reached.append(state)
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        settled.wait(timeout)
    finally:
        channel.unsubscribe(watch)
    return bool(reached) and reached[0] == grpc.ChannelConnectivity.READY


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to `args.server` with whatever auth the flags ask for. Works with parsers that only have
    `--server` (missing flags count as unset). Use as a context manager.

    `--server a:18000,b:18000` (control-plane replicas; also a context's `server` list): in order, the first
    that accepts a connection (TLS included) is used — one that refuses is skipped at once, one that does
    not answer after REPLICA_CONNECT_TIMEOUT — and `args.server` is set to it so errors name it; when none
    does, the first is used and the call reports its error."""
    apply_context(args)
    candidates = [s.strip() for s in str(args.server).split(",") if s.strip()]
    if len(candidates) <= 1:
        return _open_channel(args, args.server)
    for server in candidates:
        channel = _open_channel(args, server)
        if not _connects(channel, REPLICA_CONNECT_TIMEOUT):
            channel.close()
            continue
        args.server = server
        return channel
    args.server = candidates[0]
    return _open_channel(args, candidates[0])


def _open_channel(args: argparse.Namespace, server: str) -> grpc.Channel:
    token = getattr(args, "token", None)
    ca_cert, cert, key = (getattr(args, n, None) for n in ("ca_cert", "cert", "key"))
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if bool(cert) != bool(key):
        raise UsageError("--cert and --key go together")
    if ca_cert or cert:
        roots = _read(ca_cert, "CA certificate") if ca_cert else None
        private_key = _read(key, "client key") if key else None
        chain = _read(cert, "client certificate") if cert else None
        # In words now, rather than as an unreachable server once gRPC fails the handshake.
        problem = tls_files_problem(cert=chain.decode(errors="replace") if chain else None,
                                    key=private_key.decode(errors="replace") if private_key else None,
                                    ca=roots.decode(errors="replace") if roots else None)
        if problem:
            role, _, text = problem.partition(": ")
            flag = {"certificate": f"--cert {cert}", "key": f"--key {key}", "CA": f"--ca-cert {ca_cert}"}[role]
            raise UsageError(f"{flag}: {text}")
        credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=private_key,
                                                   certificate_chain=chain)
        channel = grpc.secure_channel(server, credentials, options=options)
    else:
        channel = grpc.insecure_channel(server, options=options)
    if token:
        return grpc.intercept_channel(channel, _BearerToken(token))
    return channel


def rpc_error(exc: grpc.RpcError, args: argparse.Namespace | None = None) -> CliError:
    """A one-line CliError for a failed call, listing the server's field violations if it sent any."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and (details or "").startswith("store unavailable:"):
        problem = details.removeprefix("store unavailable: ")
        return CliError(f"the control plane at {getattr(args, 'server', '?')} answered, but its {problem}")
    if code == grpc.StatusCode.UNAVAILABLE:
        where = getattr(args, "server", "the control plane")
        return CliError(f"cannot reach the control plane at {where} ({(details or '').splitlines()[0]})")
    violations: list[str] = []
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [f"{v.field}: {v.description}" for v in bad.field_violations]
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            violations += [v.description if v.type == "ETAG" else f"{v.subject}: {v.description}"
                           for v in failure.violations]
    text = "; ".join(violations) if violations else (details or "")
    return CliError(f"{code.name}: {' '.join(text.split())}")
