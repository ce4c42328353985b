"""The control plane process: one grpc.aio server on `--listen` carrying every service (management API,
audit, health, reflection, plus check/ADS/fleet from their own modules), over one durable store.

To add a service, append one `ServiceRegistration` to `SERVICES` below: its full service name(s) (for
reflection) and a function `add(server, ctx)` that adds the servicer; long-lived tasks can register an
async cleanup in `ctx.on_shutdown`."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from mtlsgate.v1 import api_pb2_grpc

from control_plane import gc_tuning
from control_plane.api import (
    check_service,
    report_service,
    revocation_service,
    rollout_service,
    shadow_service,
)
from control_plane.api.audit_service import AuditService
from control_plane.api.auth import Tokens
from control_plane.api.authorization import AuthorizationInterceptor, Authorizer
from control_plane.api.reflection import enable_reflection
from control_plane.api.resource_service import ResourceApi, resource_service_handlers
from control_plane.crl_sources.fetcher import CrlFetcher, FetchOptions
from control_plane.resource_names import TRUST_CONFIG
from control_plane.store import describe_db, open_store
from control_plane.store.base import Store
from control_plane.xds import ads as xds_ads
from data_plane.validation.pem import tls_files_problem
from data_plane.validation.resources import MAX_GRPC_MESSAGE_BYTES

log = logging.getLogger("mtlsgate.control_plane")

DEFAULT_LISTEN = "127.0.0.1:18000"
# Calls gRPC core may hold before our handlers take them (see build_server): a whole fleet reconnecting.
MAX_PENDING_CALLS = 50_000
MAX_PENDING_SECONDS = 300


@dataclass(frozen=True)
class ServerOptions:
    listen: str = DEFAULT_LISTEN
    db: str = "mtlsgate.db"  # a SQLite file, or postgresql://… shared by replicas
    token_file: str | None = None  # bearer tokens required for the management API
    tls_cert: str | None = None  # serve TLS with this certificate chain …
    tls_key: str | None = None  # … and key
    client_ca: str | None = None  # and require client certificates issued by this CA (mTLS)
    insecure: bool = False  # run without authentication (loopback only; SPEC §8)
    authz: str | None = None  # role bindings file (SPEC §8), reloaded on SIGHUP
    grace_seconds: float = 5.0  # how long in-flight calls get on shutdown
    crl_fetch_deadline: float = 30.0  # seconds one CRL source fetch may take, redirects included (SPEC §13)
    replica_name: str = ""  # this replica's name in `status` (SPEC §14); default: the listen address


@dataclass
class ServerContext:
    """What a service registration gets to build its servicer."""

    store: Store
    options: ServerOptions
    tokens: Tokens | None
    authorizer: Authorizer
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_start: list[Callable[[], None]] = field(default_factory=list)  # called once the server has started
    xds: Any = None  # the XdsServer (set by its registration; the roll-out driver steers it)
    rollouts: Any = None  # the RolloutDriver
    reports: Any = None  # the ReportService (node reports, client inventory)


@dataclass(frozen=True)
class ServiceRegistration:
    names: Sequence[str]  # full gRPC service names, listed in reflection
    add: Callable[[grpc.aio.Server, ServerContext], None]


def _add_resource_services(server: grpc.aio.Server, ctx: ServerContext) -> None:
    # The CRL fetcher writes TrustConfigs through the API's own write path, and the API shows its status.
    writer = ResourceApi(TRUST_CONFIG, ctx.store)
    deadline = ctx.options.crl_fetch_deadline
    fetcher = CrlFetcher(ctx.store, writer.write_fetched, FetchOptions(
        deadline_seconds=deadline, read_timeout_seconds=min(10.0, deadline),
        connect_timeout_seconds=min(5.0, deadline)))
    server.add_generic_rpc_handlers(resource_service_handlers(ctx.store, fetcher.live_status))
    fetcher.start()
    ctx.on_shutdown.append(fetcher.close)


def _add_audit_service(server: grpc.aio.Server, ctx: ServerContext) -> None:
    api_pb2_grpc.add_AuditServiceServicer_to_server(AuditService(ctx.store), server)


SERVICES: list[ServiceRegistration] = [
    ServiceRegistration(
        ("mtlsgate.v1.TrustConfigService", "mtlsgate.v1.ServerTlsPolicyService", "mtlsgate.v1.CertificateService",
         "mtlsgate.v1.ListenerService", "mtlsgate.v1.NodeService", "mtlsgate.v1.RolloutPolicyService"),
        _add_resource_services,
    ),
    ServiceRegistration(("mtlsgate.v1.AuditService",), _add_audit_service),
    ServiceRegistration(xds_ads.SERVICE_NAMES, xds_ads.add_xds_services),
    ServiceRegistration((check_service.SERVICE_NAME,), check_service.add_check_service),
    ServiceRegistration((rollout_service.SERVICE_NAME,), rollout_service.add_rollout_service),
    ServiceRegistration(report_service.SERVICE_NAMES, report_service.add_report_services),
    ServiceRegistration((shadow_service.SERVICE_NAME,), shadow_service.add_shadow_service),
    ServiceRegistration((revocation_service.SERVICE_NAME,), revocation_service.add_revocation_service),
]


class ConfigError(Exception):
    """Bad server options (unreadable TLS files, token file, …): one line for the operator."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _credentials(options: ServerOptions) -> grpc.ServerCredentials | None:
    if not (options.tls_cert or options.tls_key or options.client_ca):
        return None
    if not (options.tls_cert and options.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together (and --client-ca needs both)")
    pair = (_read(options.tls_key, "TLS key"), _read(options.tls_cert, "TLS certificate"))
    client_ca = _read(options.client_ca, "client CA") if options.client_ca else None
    problem = tls_files_problem(cert=pair[1].decode(errors="replace"), key=pair[0].decode(errors="replace"),
                                ca=client_ca.decode(errors="replace") if client_ca else None)
    if problem:
        role, _, text = problem.partition(": ")
        flag = {"certificate": f"--tls-cert {options.tls_cert}", "key": f"--tls-key {options.tls_key}",
                "CA": f"--client-ca {options.client_ca}"}[role]
        raise ConfigError(f"{flag}: {text}")
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_authentication(options: ServerOptions) -> list[str]:
    """Secure by default (SPEC §8): without `--insecure`, refuse to start unless xDS clients and API
    callers can be authenticated; `--insecure` only on loopback. Returns the warnings to print at start."""
    host = options.listen.rpartition(":")[0].strip("[]")
    if options.insecure:
        if not _is_loopback(host):
            raise ConfigError(
                f"--insecure is refused on a non-loopback listen address ({options.listen}): without "
                "authentication anyone who reaches it can read every private key and rewrite the policy; "
                "listen on 127.0.0.1, or drop --insecure and pass --tls-cert, --tls-key and --client-ca")
        return [f"WARNING: --insecure: authentication is OFF on {options.listen}; any local process can "
                "read every private key over xDS and change the policy through the API. For trials only."]
    missing = []
    if not options.client_ca:
        what = "--client-ca (xDS nodes and API callers are authenticated by client certificates"
        tls = [flag for flag, value in (("--tls-cert", options.tls_cert), ("--tls-key", options.tls_key))
               if not value]
        missing.append(what + (f"; it needs {' and '.join(tls)}" if tls else "") + ")")
    if missing:
        raise ConfigError(
            "refusing to start without authentication: missing " + "; ".join(missing)
            + ". Pass them, or --insecure to run unauthenticated on loopback (trials and tests only)")
    return []


def _check_bindable(listen: str) -> None:
    """gRPC reports a busy port only as a C-core log line and port 0: probe first for a clear error."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit():
        raise ConfigError(f"cannot listen on {listen}: expected HOST:PORT")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port_text)))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from None


def node_identities(state: object) -> frozenset[str]:
    """The identities of the registered Nodes: they can never hold an API role (SPEC §8)."""
    nodes = getattr(state, "nodes", None) or {}
    return frozenset(node.identity for node in nodes.values() if node.identity)


@dataclass
class BuiltServer:
    server: grpc.aio.Server
    context: ServerContext
    port: int  # the bound port (useful with --listen HOST:0)
    health: health.aio.HealthServicer


def build_server(store: Store, options: ServerOptions) -> BuiltServer:
    """A configured, not yet started server. Must be called with the event loop running."""
    check_authentication(options)
    tokens = Tokens.load(options.token_file) if options.token_file else None
    authorizer = Authorizer(tokens=dict(tokens.identities) if tokens else None, authz_path=options.authz,
                            node_identities=lambda: node_identities(store.state()), insecure=options.insecure)
    server = grpc.aio.server(
        interceptors=[AuthorizationInterceptor(authorizer)],
        options=[
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT by default: a second control plane on the same port would silently
            # share it (and split the clients) instead of failing.
            ("grpc.so_reuseport", 0),
            # gRPC core queues calls that arrive before the server has asked for the next one, and
            # refuses them at random above 1,000 queued and always above 3,000 (the client sees
            # INTERNAL "Internal error from Core"). A fleet reconnecting at once — 10,000 nodes after a
            # restart or a failover — arrives faster than one event loop accepts; those nodes would be
            # left without configuration until their backoff. Queue them instead: each costs a few KB.
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            # … and cancels a queued call after 30 s by default; a storm of 10,000 takes longer than that
            # on a small machine. A cancelled node retries with backoff, which only adds to the storm.
            ("grpc.server_max_unrequested_time_in_server", MAX_PENDING_SECONDS),
        ],
    )
    ctx = ServerContext(store=store, options=options, tokens=tokens, authorizer=authorizer)
    names: list[str] = []
    for registration in SERVICES:
        registration.add(server, ctx)
        names.extend(registration.names)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    ctx.on_shutdown.append(health_servicer.enter_graceful_shutdown)
    enable_reflection([*names, health.SERVICE_NAME], server)

    credentials = _credentials(options)
    _check_bindable(options.listen)
    try:
        if credentials is None:
            port = server.add_insecure_port(options.listen)
        else:
            port = server.add_secure_port(options.listen, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {options.listen}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {options.listen} (address in use or invalid)")
    return BuiltServer(server, ctx, port, health_servicer)


async def serve(options: ServerOptions, *, ready: Callable[[str], None] | None = None) -> None:
    """Run the control plane until SIGTERM/SIGINT, then stop gracefully."""
    warnings = check_authentication(options)  # before opening the store: a refusal changes nothing
    store = await asyncio.to_thread(open_store, options.db)
    try:
        built = build_server(store, options)
        await built.server.start()
        gc_tuning.configure(os.environ)
        for started in built.context.on_start:
            started()
        for name in ["", *[n for r in SERVICES for n in r.names]]:
            await built.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = options.listen.rpartition(":")[0]
        address = f"{host}:{built.port}"
        line = f"mtlsgate control-plane: serving on {address} (db {describe_db(options.db)})"
        for warning in warnings:
            log.warning("%s", warning)
            print(f"mtlsgate control-plane: {warning}", file=sys.stderr, flush=True)
        (ready or (lambda text: print(text, flush=True)))(line)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, built.context.authorizer.reload)
        await stop.wait()
        print("mtlsgate control-plane: shutting down", file=sys.stderr, flush=True)
        for cleanup in built.context.on_shutdown:
            await cleanup()
        await built.server.stop(options.grace_seconds)
    finally:
        store.close()
