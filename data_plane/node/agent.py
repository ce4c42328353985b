"""The proxy node's xDS client: one ADS stream to the control plane, validate-then-apply, ACK/NACK, the
last good configuration persisted in the cache dir; fails over between control-plane replicas (servers.py)
with jittered exponential backoff, re-sending the versions it holds so an up-to-date node is sent nothing.

`AgentSession` is the per-stream protocol logic without I/O: responses in, requests and configurations to
apply out. A Listener response whose certificates or trust bundles are not yet subscribed is held (not
ACKed) while those names are requested, so the node only ever applies complete configurations. An
unchanged configuration (a reconnect, a re-sent version) is ACKed without being applied again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2
from mtlsgate import resource_types as rt
from prometheus_client import Counter, Gauge

from data_plane.node.apply import ConfigApplier
from data_plane.node.config import ConfigRejected, NodeConfig, decode_resources, validate_node_config
from data_plane.node.servers import Endpoint, Rotation, endpoints_for, parse_servers

log = logging.getLogger("mtlsgate.node")

CONFIG_INFO = Gauge("mtlsgate_config_info", "Configuration version active on this node", ["type", "version"])
AGENT_REJECTS = Counter("mtlsgate_node_config_rejects_total", "Configurations this node NACKed", ["type"])
AGENT_APPLIES = Counter("mtlsgate_node_config_applies_total", "Configurations applied")
CONNECTED = Gauge("mtlsgate_node_xds_connected", "1 while the xDS stream to the control plane is open")

CACHE_FILE = "last-good.json"
# If names we asked for have not arrived this long after asking, the held configuration is NACKed.
MISSING_NAMES_GRACE = 5.0
# How long a control plane gets to admit the node (send the stream's headers) before we try the next one.
ADMISSION_TIMEOUT = 10.0


@dataclass(frozen=True)
class NodeIdentity:
    id: str
    cluster: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_proto(self) -> base_pb2.Node:
        metadata = struct_pb2.Struct()
        metadata.update(dict(self.labels))
        return base_pb2.Node(id=self.id, cluster=self.cluster, metadata=metadata,
                             user_agent_name="mtlsgate-proxy")


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff (AWS architecture blog): sleep U(0, min(cap, base·2^attempt))."""

    base: float = 0.25
    cap: float = 5.0

    def delay(self, attempt: int, rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
        return rng.uniform(0, min(self.cap, self.base * (2 ** min(attempt, 20))))


# ---------------------------------------------------------------- cache dir


def load_cached(cache_dir: Path) -> NodeConfig | None:
    path = cache_dir / CACHE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return NodeConfig.from_json(text)


def save_cached(cache_dir: Path, config: NodeConfig) -> None:
    """Atomic (tmp + fsync + rename) and private: the file holds the listeners' private keys."""
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".last-good.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(config.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_dir / CACHE_FILE)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- per-stream protocol logic


def _request(type_url: str, *, version: str = "", nonce: str = "", names: frozenset[str] | None = None,
             error: str = "", node: base_pb2.Node | None = None) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=version, response_nonce=nonce,
                                         resource_names=sorted(names or ()))
    if node is not None:
        req.node.CopyFrom(node)
    if error:
        req.error_detail.CopyFrom(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=error))
    return req


@dataclass
class Step:
    """What the I/O loop must do after a response: send these requests; if `config` is set, validate and
    apply it first, then send `ack` (success) or NACKs built by `session.rejected(msg)` (failure)."""

    requests: list[discovery_pb2.DiscoveryRequest] = field(default_factory=list)
    config: NodeConfig | None = None
    ack: list[discovery_pb2.DiscoveryRequest] = field(default_factory=list)


class AgentSession:
    """One ADS stream's client-side state. `active` is the node's current (last good) configuration."""

    def __init__(self, node: base_pb2.Node, active: NodeConfig | None) -> None:
        self.node = node
        self.active = active or NodeConfig()
        self.nonces: dict[str, str] = {}
        self.candidates: dict[str, tuple[str, dict[str, Message]]] = {}  # type → (version, resources)
        self.pending: set[str] = set()  # types received but neither ACKed nor NACKed yet
        self.subscribed: dict[str, frozenset[str]] = {}
        self.asked_at: dict[str, float] = {}  # by-name type → since when needed names are missing

    def initial_requests(self) -> list[discovery_pb2.DiscoveryRequest]:
        """Listener (wildcard) plus, on a reconnect, the names and versions we already hold."""
        out = [_request(rt.LISTENER, version=self.active.versions.get(rt.LISTENER, ""), node=self.node)]
        for type_url, names in self.active.subscribed_names().items():
            if names:
                self.subscribed[type_url] = names
                out.append(_request(type_url, version=self.active.versions.get(type_url, ""), names=names))
        return out

    def _current(self, type_url: str) -> tuple[str, Mapping[str, Message]]:
        if type_url in self.candidates:
            return self.candidates[type_url]
        held: Mapping[str, Message] = {
            rt.LISTENER: self.active.listeners, rt.TRUST_BUNDLE: self.active.bundles,
            rt.SERVER_CERTIFICATE: self.active.certificates, rt.BACKEND_SERVICE: self.active.backend_services,
        }[type_url]
        return self.active.versions.get(type_url, ""), held

    def on_response(self, response: discovery_pb2.DiscoveryResponse, now: float) -> Step:
        type_url = response.type_url
        self.nonces[type_url] = response.nonce
        step = Step()
        try:
            resources = decode_resources(type_url, list(response.resources))
        except ConfigRejected as exc:
            step.requests.append(self._nack(type_url, str(exc)))
            return step
        self.candidates[type_url] = (response.version_info, resources)
        self.pending.add(type_url)
        return self._progress(step, now)

    def check_overdue(self, now: float) -> Step:
        """Called periodically: NACK a held configuration whose requested names never arrived."""
        overdue = [t for t, at in self.asked_at.items() if now - at > MISSING_NAMES_GRACE]
        if not overdue or not self.pending:
            return Step()
        missing = self._missing()
        return Step(requests=self.rejected("; ".join(missing) or "requested resources were not delivered"))

    def _missing(self) -> list[str]:
        _, listeners = self._current(rt.LISTENER)
        out = []
        for type_url, names in _required(listeners, self._current(rt.BACKEND_SERVICE)[1]).items():
            _, have = self._current(type_url)
            out += [f"{rt.short_type(type_url)} {n} was not delivered" for n in sorted(names - set(have))]
        return out

    def _progress(self, step: Step, now: float) -> Step:
        _, listeners = self._current(rt.LISTENER)
        # Backend services name certificates and bundles of their own: the second level is known (and
        # asked for) once the services themselves have arrived.
        required = _required(listeners, self._current(rt.BACKEND_SERVICE)[1])
        # Shadow candidates' bundles are asked for with the rest but never waited for (config.shadow_bundle_names).
        wanted = _subscribed(listeners, required)
        waiting = False
        for type_url, names in wanted.items():
            _, have = self._current(type_url)
            changed = names != self.subscribed.get(type_url, frozenset())
            if changed and (names or type_url in self.subscribed):
                self.subscribed[type_url] = names
                step.requests.append(_request(type_url, version=self.active.versions.get(type_url, ""),
                                              nonce=self.nonces.get(type_url, ""), names=names))
            if required[type_url] - set(have):
                self.asked_at.setdefault(type_url, now)  # the grace runs from when they were first missing
                waiting = True
            else:
                self.asked_at.pop(type_url, None)
        if waiting:
            return step  # hold: ACK/NACK once the names arrive
        versions = {t: self._current(t)[0] for t in rt.ALL_TYPES}
        config = NodeConfig(
            versions={t: v for t, v in versions.items() if v},
            listeners=dict(listeners),  # type: ignore[arg-type]
            bundles={n: m for n, m in self._current(rt.TRUST_BUNDLE)[1].items()  # type: ignore[misc]
                     if n in wanted[rt.TRUST_BUNDLE]},
            certificates={n: m for n, m in self._current(rt.SERVER_CERTIFICATE)[1].items()  # type: ignore[misc]
                          if n in required[rt.SERVER_CERTIFICATE]},
            backend_services={n: m for n, m in self._current(rt.BACKEND_SERVICE)[1].items()  # type: ignore[misc]
                              if n in required[rt.BACKEND_SERVICE]},
        )
        acks = [_request(t, version=self.candidates[t][0], nonce=self.nonces[t], names=self.subscribed.get(t))
                for t in sorted(self.pending)]
        if _same(config, self.active):
            self.accepted(config)
            step.requests += acks
            return step
        step.config = config
        step.ack = acks
        return step

    def accepted(self, config: NodeConfig) -> None:
        self.active = config
        self.candidates.clear()
        self.pending.clear()

    def rejected(self, message: str) -> list[discovery_pb2.DiscoveryRequest]:
        """NACK every held type with `message`, and fall back to the last good configuration."""
        nacks = [self._nack(t, message) for t in sorted(self.pending)]
        self.candidates.clear()
        self.pending.clear()
        self.asked_at.clear()
        return nacks

    def _nack(self, type_url: str, message: str) -> discovery_pb2.DiscoveryRequest:
        AGENT_REJECTS.labels(rt.short_type(type_url)).inc()
        return _request(type_url, version=self.active.versions.get(type_url, ""),
                        nonce=self.nonces.get(type_url, ""), names=self.subscribed.get(type_url), error=message)


def _required(listeners: Mapping[str, Message], services: Mapping[str, Message]) -> dict[str, frozenset[str]]:
    from data_plane.node.config import required_names

    return required_names(listeners, services)  # type: ignore[arg-type]


def _subscribed(listeners: Mapping[str, Message], required: Mapping[str, frozenset[str]]
                ) -> dict[str, frozenset[str]]:
    from data_plane.node.config import subscribed_names

    return subscribed_names(listeners, required)  # type: ignore[arg-type]


def _same(a: NodeConfig, b: NodeConfig) -> bool:
    return (dict(a.versions) == dict(b.versions) and a.listeners == b.listeners and a.bundles == b.bundles
            and a.certificates == b.certificates and a.backend_services == b.backend_services)


# ---------------------------------------------------------------- the I/O loop


class XdsAgent:
    """Keeps the node's configuration in step with the control plane and its applier."""

    def __init__(self, server: str, identity: NodeIdentity, applier: ConfigApplier, cache_dir: Path | None,
                 *, backoff: Backoff | None = None, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.servers = parse_servers(server)  # `a:18000,b:18000`: replicas in order of preference
        self.server = str(self.servers[0])  # the endpoint of the current (or last) stream, for logs/admin
        self.identity = identity
        self.applier = applier
        self.cache_dir = cache_dir
        self.backoff = backoff or Backoff()
        self.credentials = credentials
        self.active: NodeConfig | None = None
        self.connected = False
        self.endpoint: Endpoint | None = None  # the control plane of the current (or last) stream
        self.last_error = ""
        self.last_error_time = 0.0
        self.applied_count = 0
        self.source = ""  # "cache" or "control-plane": where the active configuration came from
        self._apply_lock = asyncio.Lock()
        self._to_persist: NodeConfig | None = None
        self._persister: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.active is not None

    async def start_from_cache(self) -> None:
        if self.cache_dir is None:
            return
        try:
            cached = load_cached(self.cache_dir)
            if cached is None:
                return
            validate_node_config(cached)
            await self._apply(cached)
        except ConfigRejected as exc:
            log.warning("not starting from the cache in %s: %s", self.cache_dir, exc)
            return
        self.source = "cache"
        log.info("started from cached configuration (versions %s)", dict(cached.versions))

    async def run(self) -> None:
        await self.start_from_cache()
        rotation = Rotation(base=self.backoff.base, cap=self.backoff.cap)
        while True:
            if rotation.needs_resolving():
                rotation.resolved(await self._resolve())
            endpoint = rotation.current()
            admitted = False
            if endpoint is not None:
                self.server = endpoint.label
                self.endpoint = endpoint
                try:
                    admitted = await self._one_stream(endpoint)
                except grpc.aio.AioRpcError as exc:
                    log.warning("xDS stream to %s ended: %s %s", self.server, exc.code().name, exc.details())
                except (OSError, ConnectionError, TimeoutError) as exc:
                    log.warning("xDS stream to %s failed: %r", self.server, exc)
                except Exception:  # a bug must not leave the node without updates for good: log, reconnect
                    log.exception("xDS stream to %s failed unexpectedly", self.server)
                finally:
                    self.connected = False
                    CONNECTED.set(0)
            delay = rotation.ended(admitted, random._inst)  # type: ignore[attr-defined]
            following = rotation.current() or (rotation.endpoints[0] if rotation.endpoints else None)
            log.info("connecting to %s in %.2fs", following.label if following else self.servers[0], delay)
            await asyncio.sleep(delay)

    async def _resolve(self) -> list[Endpoint]:
        """Every configured server's endpoints, in order; a name that does not resolve is skipped (and
        logged), so one bad entry never keeps the node from the others."""
        loop = asyncio.get_running_loop()
        endpoints: list[Endpoint] = []
        for server in self.servers:
            addresses: list[str] = []
            if not server.is_ip:
                try:
                    infos = await loop.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
                except OSError as exc:
                    log.warning("cannot resolve control plane %s: %s", server, exc)
                    continue
                addresses = [str(info[4][0]) for info in infos]
            endpoints += endpoints_for(server, addresses)
        return endpoints

    def channel_for(self, endpoint: Endpoint) -> grpc.aio.Channel:
        """A channel to `endpoint` with this node's credentials (the report stream uses it too)."""
        return self._channel(endpoint)

    def _channel(self, endpoint: Endpoint) -> grpc.aio.Channel:
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            # Fail fast so our own backoff (with jitter) decides when to retry.
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
        if endpoint.tls_name is not None:
            # Dialled by resolved address: the server must still prove the configured name.
            options += [("grpc.ssl_target_name_override", endpoint.tls_name),
                        ("grpc.default_authority", endpoint.tls_name)]
        if self.credentials is not None:
            return grpc.aio.secure_channel(endpoint.target, self.credentials, options=options)
        return grpc.aio.insecure_channel(endpoint.target, options=options)

    async def _one_stream(self, endpoint: Endpoint) -> bool:
        session = AgentSession(self.identity.to_proto(), self.active)
        outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        for request in session.initial_requests():
            outbox.put_nowait(request)

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while True:
                item = await outbox.get()
                if item is None:
                    return
                yield item

        got_response = False  # the stream was admitted: reset the backoff afterwards
        async with self._channel(endpoint) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(requests())
            inbox: asyncio.Queue[object] = asyncio.Queue()

            async def read() -> None:
                # A separate task: cancelling a pending read (for the periodic overdue check) would end
                # the call.
                try:
                    async for response in call:
                        inbox.put_nowait(response)
                    inbox.put_nowait(None)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # handed to the loop below, which raises it
                    inbox.put_nowait(exc)

            reader = asyncio.create_task(read())
            try:
                # The server sends its headers once it has admitted the node (before any response: a
                # reconnecting node that is up to date gets no response at all).
                # Bounded: a replica that accepts TCP but never answers must not hold the node.
                await asyncio.wait_for(call.wait_for_connection(), ADMISSION_TIMEOUT)
                got_response = True
                self.connected = True
                CONNECTED.set(1)
                log.info("xDS stream to %s established", self.server)
                while True:
                    try:
                        item = await asyncio.wait_for(inbox.get(), timeout=1.0)
                    except TimeoutError:
                        for request in session.check_overdue(time.monotonic()).requests:
                            outbox.put_nowait(request)
                        continue
                    if item is None:
                        return got_response
                    if isinstance(item, Exception):
                        raise item
                    assert isinstance(item, discovery_pb2.DiscoveryResponse)
                    step = session.on_response(item, time.monotonic())
                    for request in step.requests:
                        outbox.put_nowait(request)
                    if step.config is not None:
                        for request in await self._apply_step(session, step):
                            outbox.put_nowait(request)
            finally:
                outbox.put_nowait(None)
                call.cancel()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _apply_step(self, session: AgentSession, step: Step) -> list[discovery_pb2.DiscoveryRequest]:
        assert step.config is not None
        try:
            validate_node_config(step.config)
            await self._apply(step.config)
        except ConfigRejected as exc:
            self.last_error, self.last_error_time = str(exc), time.time()
            log.warning("configuration rejected, keeping the last good one: %s", exc)
            return session.rejected(str(exc))
        except Exception as exc:  # an applier bug must not kill the agent: NACK and keep the old config
            log.exception("applying the configuration failed")
            self.last_error, self.last_error_time = f"apply failed: {exc!r}", time.time()
            return session.rejected(self.last_error)
        session.accepted(step.config)
        self.source = "control-plane"
        log.info("configuration applied: %s", ", ".join(
            f"{rt.short_type(t)} {v}" for t, v in sorted(step.config.versions.items())))
        return step.ack

    async def _apply(self, config: NodeConfig) -> None:
        async with self._apply_lock:
            await self.applier.apply(config)
            previous = self.active
            self.active = config
            self.applied_count += 1
            AGENT_APPLIES.inc()
            for type_url in rt.ALL_TYPES:
                if previous is not None and previous.versions.get(type_url):
                    with contextlib.suppress(KeyError):
                        CONFIG_INFO.remove(rt.short_type(type_url), previous.versions[type_url])
                if config.versions.get(type_url):
                    CONFIG_INFO.labels(rt.short_type(type_url), config.versions[type_url]).set(1)
            if self.cache_dir is not None:
                # Off the ACK path (an fsync can stall on a busy disk): the newest config is written by
                # one background task, in order. Losing it in a crash only means starting from an older
                # cache, which the control plane then updates.
                self._to_persist = config
                if self._persister is None or self._persister.done():
                    self._persister = asyncio.create_task(self._persist())

    async def _persist(self) -> None:
        assert self.cache_dir is not None
        while self._to_persist is not None:
            config, self._to_persist = self._to_persist, None
            try:
                await asyncio.to_thread(save_cached, self.cache_dir, config)
            except OSError as exc:  # the config is active; only a restart without a control plane suffers
                log.error("could not persist the configuration in %s: %s", self.cache_dir, exc)

    async def flush_cache(self) -> None:
        """Wait until the active configuration is on disk (shutdown, tests)."""
        if self._persister is not None:
            await self._persister
