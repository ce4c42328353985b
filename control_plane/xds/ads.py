"""The xDS server on grpc.aio: ADS (`StreamAggregatedResources`) and the FleetService, glued to the store.

Store writes are debounced (quiet period, max delay), turned into snapshots by `SnapshotBuilder`, and
handed to every open stream; each stream runs the pure `StreamProtocol` and writes what it says. Response
bodies are encoded once per (type, version, names) and shared by all streams; only the per-stream nonce is
appended (protobuf fields concatenate), so a push to 1,000 nodes serialises each body once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2, api_pb2_grpc

from control_plane import gc_tuning
from control_plane.authz.admission import Admission, NodeRefused, admit, registered_node
from control_plane.fleet.revocations import Enforced, RevocationTracker
from control_plane.rollouts.policy import revocation_fast_path
from control_plane.rollouts.serving import active_run, served_base
from control_plane.store.base import LocalFleetTable, ReplicaRow, StoreError, StoreState
from control_plane.xds import metrics
from control_plane.xds.fleet import Fleet, StreamRecord
from control_plane.xds.fleet_sync import FleetSync
from control_plane.xds.protocol import ProtocolError, Push, RequestKind, StreamProtocol
from control_plane.xds.replicas import merge, replica_statuses
from control_plane.xds.snapshot import GroupSnapshot, SnapshotBuilder, StateSnapshots

log = logging.getLogger("mtlsgate.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
FLEET_SERVICE = "mtlsgate.v1.FleetService"
SERVICE_NAMES = (ADS_SERVICE, FLEET_SERVICE)

MAX_NODE_FIELD = 256
MAX_LABELS = 64


@dataclass(frozen=True)
class XdsOptions:
    debounce_quiet: float = 0.1
    debounce_max: float = 1.0
    insecure: bool = False  # admit streams without a client certificate (SPEC §8)
    replica_name: str = ""  # how `status` names this control plane among the replicas (SPEC §14)


class NodeRejected(Exception):
    """The node's identity or metadata is unacceptable (the message says why)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def node_labels(metadata: struct_pb2.Struct) -> dict[str, str]:
    """node.metadata → labels: string values only, bounded."""
    if len(metadata.fields) > MAX_LABELS:
        raise NodeRejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"node.metadata has {len(metadata.fields)} fields; at most {MAX_LABELS} allowed")
    labels = {}
    for key, value in metadata.fields.items():
        if value.WhichOneof("kind") != "string_value":
            raise NodeRejected(grpc.StatusCode.INVALID_ARGUMENT,
                               f"node.metadata.{key[:64]}: labels must be strings")
        if len(key) > MAX_NODE_FIELD or len(value.string_value) > MAX_NODE_FIELD:
            raise NodeRejected(grpc.StatusCode.INVALID_ARGUMENT,
                               f"node.metadata.{key[:64]}: longer than {MAX_NODE_FIELD} characters")
        labels[key] = value.string_value
    return labels


def certificate_identities(auth_context: Mapping[str, Any]) -> set[str]:
    """The peer certificate's `spiffe://` URI SANs and `cn:<CN>` (the names Node.identity uses); empty
    when it presented none."""
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        return set()
    cert = x509.load_pem_x509_certificate(pems[0])
    identities = {f"cn:{a.value}" for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    with contextlib.suppress(x509.ExtensionNotFound):
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        identities |= {u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
                       if u.startswith("spiffe://")}
    return {str(i) for i in identities}


def check_node(node_id: str, cluster: str) -> None:
    if not node_id:
        raise NodeRejected(grpc.StatusCode.INVALID_ARGUMENT, "node.id is required in the first request")
    if len(node_id) > MAX_NODE_FIELD or len(cluster) > MAX_NODE_FIELD:
        raise NodeRejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"node.id and node.cluster are limited to {MAX_NODE_FIELD} characters")


_END = object()  # the node closed its side
_SNAPSHOT = object()  # a newer snapshot is waiting: see _Stream.offer
_REVOKED = object()  # the node's registration no longer admits this stream: see _Stream.revoked


class _Stream:
    """One open ADS stream: its node, its protocol state and its inbox."""

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.protocol = StreamProtocol()
        self.labels: dict[str, str] | None = None
        self.node_id = ""
        self.admission: Admission | None = None
        self.revoked = ""  # why the stream is being ended (deregistered, identity changed)
        self._latest: GroupSnapshot | None = None

    def offer(self, snapshot: GroupSnapshot) -> bool:
        """Queue a snapshot; a stream still busy with an older one skips to the newest (a slow node gets
        the current state, not every intermediate one)."""
        fresh = self._latest is None
        if fresh:
            self.inbox.put_nowait(_SNAPSHOT)
        self._latest = snapshot
        return fresh

    def take_snapshot(self) -> GroupSnapshot | None:
        snapshot, self._latest = self._latest, None
        return snapshot




class XdsServer(api_pb2_grpc.FleetServiceServicer):
    """Owns the snapshot cache, the fleet and the streams. `register(server)` adds ADS and FleetService."""

    def __init__(self, store: Any, options: XdsOptions | None = None) -> None:
        self.store = store
        self.options = options or XdsOptions()
        self.builder = SnapshotBuilder()
        self.fleet = Fleet()
        self.snapshots: StateSnapshots | None = None
        # A roll-out in progress (SPEC §12): nodes it has not reached get snapshots of its base revision
        # (built by their own builder, so the two memos do not evict each other).
        self.base_builder = SnapshotBuilder()
        self.base_snapshots: StateSnapshots | None = None
        self.reached: frozenset[str] = frozenset()
        self._base_state: StoreState | None = None
        self._base_fast_path = False  # the run's base snapshots carry the revocations written since
        self.revocations = RevocationTracker()  # revocation latency (SPEC §12, B6), this replica's nodes
        self._streams: dict[int, _Stream] = {}
        self._stream_ids = itertools.count(1)
        self._bodies: dict[tuple[str, str, frozenset[str] | None], bytes] = {}
        self._full_collections = gc_tuning.FullCollections()  # see control_plane/gc_tuning.py
        self._fan_out = gc_tuning.FanOut()  # no collection while a push is being written
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._fleet_changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribed = False
        table = store.fleet_table() if hasattr(store, "fleet_table") else LocalFleetTable()
        self.replica = ReplicaRow(secrets.token_hex(8), self.options.replica_name[:MAX_NODE_FIELD] or "control-plane",
                                  time.time(), time.time())
        self.sync = FleetSync(table, self.replica, self.fleet, self._status_of, self._notify_fleet)

    # ------------------------------------------------------------ wiring

    def register(self, server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(ADS_SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._stream_aggregated_resources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=bytes,  # bodies are pre-encoded (see module docstring)
            ),
        })
        server.add_generic_rpc_handlers((handler,))
        api_pb2_grpc.add_FleetServiceServicer_to_server(self, server)
        with contextlib.suppress(RuntimeError):  # no running loop yet: started by the first stream
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._fleet_changed = asyncio.Event()
        if not self._subscribed:
            self.store.subscribe(self._on_store_write)
            self._subscribed = True
        self._rebuild()
        self._task = self._loop.create_task(self._debounce_loop(), name="xds-debounce")
        self.sync.start()

    async def close(self) -> None:
        await self.sync.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for stream in list(self._streams.values()):
            stream.inbox.put_nowait(_END)

    def _on_store_write(self, revision: int) -> None:
        # Called in the writing thread or loop.
        loop, changed = self._loop, self._changed
        if loop is None or changed is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            changed.set()
        else:
            loop.call_soon_threadsafe(changed.set)

    # ------------------------------------------------------------ snapshots

    async def _debounce_loop(self) -> None:
        """Leading edge, then debounce: the first change after a quiet period is built and pushed at once
        (a lone CRL rotation reaches the fleet without waiting); changes that follow within `quiet` of a
        build wait until `quiet` passes without another, at most `most` after the first of them, so a
        burst of writes becomes a few pushes."""
        assert self._changed is not None
        quiet, most = self.options.debounce_quiet, self.options.debounce_max
        last_build = -math.inf
        while True:
            await self._changed.wait()
            self._changed.clear()
            first = time.monotonic()
            if first - last_build < quiet:  # inside a burst: wait for it to settle
                await self._settle(first + most, quiet)
            try:
                self._rebuild()
            except Exception:
                log.exception("snapshot build failed; nodes keep the previous snapshot")
            last_build = time.monotonic()

    async def _settle(self, deadline: float, quiet: float) -> None:
        """Return once `quiet` seconds pass without a change, or at `deadline` (monotonic)."""
        assert self._changed is not None
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(quiet, remaining))
            except TimeoutError:
                return
            self._changed.clear()

    def _rebuild(self) -> None:
        state = self.store.state()
        if self.snapshots is not None and state.revision == self.snapshots.revision:
            return
        self.snapshots = self.builder.build(state)
        self._rebuild_base(state)
        self.revocations.on_state(state.revision, state.written_at, state.trust_configs, self._serving)
        self._bodies.clear()
        metrics.SNAPSHOT_BUILDS.inc()
        metrics.SNAPSHOT_REVISION.set(state.revision)
        offered = 0
        for stream in self._streams.values():
            if stream.labels is not None and self._retarget(stream, state):
                snapshot = self._snapshot_for(stream.node_id, stream.labels)
                if snapshot is not None:
                    offered += stream.offer(snapshot)
                    bundles = snapshot.types.get(rt.TRUST_BUNDLE)
                    if bundles is not None and (self._base_fast_path or not self.serves_base(stream.node_id)):
                        self.revocations.cover(bundles.version, state.revision)  # B6, held nodes too
        self._fan_out.started(offered)
        self.fleet.touch_all()  # every node's desired versions may have changed
        self._notify_fleet()

    def _rebuild_base(self, state: StoreState) -> None:
        run = active_run(state)
        self._base_fast_path = run is not None and revocation_fast_path(run.policy)
        if run is None:
            self.base_snapshots, self.reached, self._base_state = None, frozenset(), None
            return
        try:
            if self._base_state is None or self._base_state.revision != run.base_revision:
                self._base_state = self.store.state_at(run.base_revision)
            served = served_base(self._base_state, state, revocation_fast_path(run.policy))
        except StoreError as exc:
            # Nothing older to serve: every node gets the current state (the driver halts the run on it).
            log.error("%s: cannot serve its base revision %d: %s", run.name, run.base_revision, exc)
            self.base_snapshots, self.reached = None, frozenset()
            return
        self.base_snapshots = self.base_builder.build(served)
        self.reached = frozenset(run.reached)

    def _serving(self, trust_configs: frozenset[str]) -> list[str]:
        """The connected nodes whose snapshot carries one of these TrustConfigs (full names)."""
        from control_plane.xds.snapshot import short_name

        names = {short_name(n) for n in trust_configs}
        out = []
        for stream in self._streams.values():
            if stream.labels is None:
                continue
            snapshot = self._snapshot_for(stream.node_id, stream.labels)
            bundles = snapshot.types.get(rt.TRUST_BUNDLE) if snapshot is not None else None
            if bundles is not None and names & set(bundles.resources):
                out.append(stream.node_id)
        return out

    def revalidation_reported(self, node_id: str, report: Any, received_at: float) -> None:
        """A stored node report (of the authenticated `node_id`): its revalidations (B6)."""
        for done in report.revalidations:
            if done.type_url == rt.TRUST_BUNDLE:
                self._observe(self.revocations.on_revalidation(
                    node_id, done.version, done.done_time.ToNanoseconds() / 1e9, done.closed, done.checked,
                    list(done.closed_fingerprints), received_at))

    @staticmethod
    def _observe(enforced: list[Enforced]) -> None:
        for entry in enforced:
            metrics.REVOCATION_ENFORCEMENT.observe(entry.seconds)
            log.info("revocation %d (revision %d) enforced on node %s %.3fs after publication (%d closed)",
                     entry.revocation.sequence, entry.revocation.revision, entry.node.node_id, entry.seconds,
                     entry.node.closed)

    def refresh(self) -> None:
        """Build the snapshots of the store's current state now (the roll-out driver reads them)."""
        self._rebuild()

    def node_statuses(self) -> list[api_pb2.NodeStatus]:
        """Every node's status as `mtlsgate status` shows it (desired versions included)."""
        return list(self._list("").nodes)

    def serves_base(self, node_id: str) -> bool:
        return self.base_snapshots is not None and node_id not in self.reached

    def versions(self, labels: Mapping[str, str], *, base: bool) -> dict[str, str]:
        """The versions a node with these labels gets from the current state, or from a run's base."""
        snapshots = self.base_snapshots if base and self.base_snapshots is not None else self.snapshots
        return snapshots.for_labels(labels).versions() if snapshots is not None else {}

    def _retarget(self, stream: _Stream, state: Any) -> bool:
        """Re-read the stream's Node registration (a relabel moves a running node at once). False when the
        stream is no longer admitted: it is ended with PERMISSION_DENIED."""
        admission = stream.admission
        assert admission is not None
        node = registered_node(state.nodes, stream.node_id)
        if admission.identity and (node is None or node.identity != admission.identity):
            stream.revoked = (f"node {stream.node_id!r} is no longer registered to {admission.identity}"
                              if node is not None else f"node {stream.node_id!r} was deregistered")
            stream.inbox.put_nowait(_REVOKED)
            return False
        if node is not None:
            labels, cluster = dict(node.labels), node.cluster
        else:
            labels, cluster = dict(admission.declared), admission.cluster
        record = self.fleet.stream(stream.node_id, stream.id)
        if labels != stream.labels or (record is not None and record.cluster != cluster):
            log.info("node %s re-targeted: cluster %s, labels %s", stream.node_id, cluster, labels)
            stream.labels = labels
            if record is not None:
                record.labels, record.cluster, record.registered = labels, cluster, node is not None
        return True

    def _snapshot_for(self, node_id: str, labels: Mapping[str, str]) -> GroupSnapshot | None:
        snapshots = self.base_snapshots if self.serves_base(node_id) else self.snapshots
        return snapshots.for_labels(labels) if snapshots is not None else None

    def _encode(self, push: Push, names: frozenset[str] | None) -> bytes:
        key = (push.type_url, push.version, names)
        body = self._bodies.get(key)
        if body is None:
            body = discovery_pb2.DiscoveryResponse(
                version_info=push.version, type_url=push.type_url, resources=push.resources
            ).SerializeToString()
            self._bodies[key] = body
        metrics.pushes(push.type_url).inc()
        return body + discovery_pb2.DiscoveryResponse(nonce=push.nonce).SerializeToString()

    # ------------------------------------------------------------ ADS

    async def _stream_aggregated_resources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._ensure_started()
        stream = _Stream(next(self._stream_ids))
        reader = asyncio.create_task(self._read(request_iterator, stream))
        self._streams[stream.id] = stream
        try:
            while True:
                event = await stream.inbox.get()
                if event is _END:
                    return
                if event is _REVOKED:
                    log.warning("xds stream %d ended: %s", stream.id, stream.revoked)
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, stream.revoked)
                if event is _SNAPSHOT:
                    snapshot = stream.take_snapshot()
                    if snapshot is None:
                        self._fan_out.stream_done()
                        continue
                    try:
                        for push in stream.protocol.on_snapshot(snapshot):
                            ts = stream.protocol.types[push.type_url]
                            yield self._encode(push, ts.sent_names)
                    finally:
                        self._fan_out.stream_done()
                    self._notify_fleet(stream.node_id)
                    continue
                assert isinstance(event, discovery_pb2.DiscoveryRequest)
                if stream.labels is None:
                    await self._admit(stream, event, context)
                    # Headers now: tells the node it was admitted even if nothing needs sending.
                    await context.send_initial_metadata(())
                try:
                    outcome = stream.protocol.on_request(event)
                except ProtocolError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                self._account(stream, outcome)
                if outcome.push is not None:
                    ts = stream.protocol.types[outcome.push.type_url]
                    yield self._encode(outcome.push, ts.sent_names)
                self._notify_fleet(stream.node_id)
        finally:
            reader.cancel()
            self._streams.pop(stream.id, None)
            if stream.node_id and self.fleet.disconnect(stream.node_id, stream.id):
                metrics.CONNECTED_NODES.set(self.fleet.connected_count())
                self._notify_fleet()
            if self._full_collections.stream_ended():
                asyncio.get_running_loop().call_soon(gc_tuning.collect_full)

    async def _read(self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], stream: _Stream) -> None:
        try:
            async for request in request_iterator:
                stream.inbox.put_nowait(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("xds stream %d read error: %r", stream.id, exc)
        stream.inbox.put_nowait(_END)

    async def _admit(self, stream: _Stream, first: discovery_pb2.DiscoveryRequest,
                     context: grpc.aio.ServicerContext) -> None:
        node = first.node
        try:
            declared = node_labels(node.metadata)
            check_node(node.id, node.cluster)
            if self.snapshots is None or self.store.revision() != self.snapshots.revision:
                # Do not answer a new node from a snapshot already known to be stale (the debounced rebuild
                # would follow with a second push); it also makes admission see the latest Nodes.
                self._rebuild()
            admission = admit(node.id, node.cluster, declared, certificate_identities(context.auth_context() or {}),
                              self.store.state().nodes, insecure=self.options.insecure)
        except NodeRejected as exc:
            log.warning("xds stream refused: %s", exc)
            await context.abort(exc.code, str(exc))
        except NodeRefused as exc:
            log.warning("xds stream for node.id %r from %s refused: %s", node.id[:MAX_NODE_FIELD], context.peer(), exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        if admission.mismatch:
            log.warning("node %s: %s; the Node resource wins", node.id, admission.mismatch)
        stream.admission = admission
        stream.labels = dict(admission.labels)
        stream.node_id = node.id
        stream.protocol.snapshot = self._snapshot_for(node.id, stream.labels)
        self.fleet.connect(node.id, StreamRecord(
            stream.id, admission.cluster, stream.labels, context.peer() or "", time.time(), stream.protocol,
            identity=admission.identity, registered=admission.registered, mismatch=admission.mismatch))
        metrics.CONNECTED_NODES.set(self.fleet.connected_count())
        log.info("node %s (cluster %s, %s) connected from %s", node.id, admission.cluster,
                 admission.identity or "unauthenticated", context.peer())

    def _account(self, stream: _Stream, outcome: Any) -> None:
        short = rt.short_type(outcome.type_url)
        if outcome.kind is RequestKind.NACK:
            metrics.REJECTS.labels(short).inc()
            log.warning("node %s rejected %s version %s: %s", stream.node_id, short, outcome.version, outcome.error)
            self.fleet.record_nack(stream.node_id, stream.id, outcome.type_url, outcome.version, outcome.error,
                                   time.time())
        elif outcome.kind is RequestKind.STALE:
            metrics.STALE_NONCES.labels(short).inc()
        elif outcome.kind is RequestKind.ACK and outcome.acked_push is not None:
            pushed = outcome.acked_push
            convergence = self.fleet.record_ack(stream.node_id, stream.id, outcome.type_url, pushed.revision,
                                                pushed.written_at, time.time())
            if convergence is not None:
                metrics.CONVERGENCE.observe(convergence)
            if outcome.type_url == rt.TRUST_BUNDLE:
                self._observe(self.revocations.on_ack(stream.node_id, pushed.version, pushed.revision, time.time()))

    # ------------------------------------------------------------ FleetService

    def _notify_fleet(self, node_id: str = "") -> None:
        """The fleet changed (`node_id`'s status, if given): wake the watchers and publish it."""
        self.fleet.touch(node_id)
        self.sync.wake()
        # A fresh event per change, so every watcher sees it (one shared event cleared by one watcher
        # would hide the change from the others).
        if self._fleet_changed is not None:
            self._fleet_changed.set()
            self._fleet_changed = asyncio.Event()

    def _desired(self, node_id: str, labels: Mapping[str, str]) -> Mapping[str, str]:
        # A roll-out may hold a node at an older revision than its labels' group (SPEC §12).
        snapshot = self._snapshot_for(node_id, labels)
        return snapshot.versions() if snapshot is not None else {}

    def _status_of(self, node_id: str) -> api_pb2.NodeStatus | None:
        """One node's status as this replica sees it (what it publishes to the fleet table)."""
        status = self.fleet.status(node_id, self._desired)
        if status is not None:
            status.replica = self.replica.id
        return status

    def _list(self, cluster: str) -> api_pb2.ListNodesResponse:
        revision = self.snapshots.revision if self.snapshots is not None else 0
        now = self.sync.now()
        # This replica's nodes from memory, the other replicas' from the fleet table (SPEC §14).
        statuses = [s for s in merge(self.replica.id, self.fleet.list("", self._desired), self.sync.remote.published(),
                                     self.sync.remote.replicas, now)
                    if not cluster or s.cluster == cluster]
        seen = {status.id for status in statuses}
        # Registered Nodes that never connected are part of the fleet too: `status` shows them as such.
        for name, node in self.store.state().nodes.items():
            node_id = name.partition("/")[2]
            if node_id not in seen and (not cluster or node.cluster == cluster):
                statuses.append(api_pb2.NodeStatus(id=node_id, cluster=node.cluster, labels=dict(node.labels),
                                                   registered=True, state=api_pb2.NOT_SENT))
        statuses.sort(key=lambda status: status.id)
        local = dataclasses.replace(self.replica, heartbeat_at=now)
        replicas = replica_statuses(local, self.sync.remote.replicas, statuses, now)
        return api_pb2.ListNodesResponse(nodes=statuses, revision=revision, store_revision=self.store.revision(),
                                         replicas=replicas, replica=self.replica.id)

    async def ListNodes(self, request: api_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
                        ) -> api_pb2.ListNodesResponse:
        self._ensure_started()
        return self._list(request.cluster)

    async def WatchNodes(self, request: api_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[api_pb2.ListNodesResponse]:
        self._ensure_started()
        assert self._fleet_changed is not None
        last = None
        while True:
            changed = self._fleet_changed
            current = self._list(request.cluster)
            compared = api_pb2.ListNodesResponse()
            compared.CopyFrom(current)
            for replica in compared.replicas:
                replica.heartbeat_age_seconds = 0  # ages tick every second: not a change worth sending
            if compared != last:
                yield current
                last = compared
            # Wait for a change, then coalesce bursts (1,000 nodes ACKing) into one update per 100 ms.
            await changed.wait()
            await asyncio.sleep(0.1)


def options_from_env(environ: Mapping[str, str]) -> XdsOptions:
    """Debounce settings: MTLSGATE_XDS_DEBOUNCE_QUIET / MTLSGATE_XDS_DEBOUNCE_MAX (seconds)."""
    try:
        quiet = float(environ.get("MTLSGATE_XDS_DEBOUNCE_QUIET", "0.1"))
        most = float(environ.get("MTLSGATE_XDS_DEBOUNCE_MAX", "1.0"))
    except ValueError as exc:
        raise ValueError(f"MTLSGATE_XDS_DEBOUNCE_QUIET/MAX must be numbers of seconds: {exc}") from None
    return XdsOptions(debounce_quiet=max(0.0, quiet), debounce_max=max(quiet, most))


def replica_name(options: Any) -> str:
    """`--replica-name`, else the listen address, with this host's name when it listens on every address."""
    if getattr(options, "replica_name", ""):
        return str(options.replica_name)
    host, _, port = str(options.listen).rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        import socket

        host = socket.gethostname()
    return f"{host}:{port}"


def add_xds_services(server: grpc.aio.Server, ctx: Any) -> None:
    """`control_plane.server.SERVICES` hook: ADS + FleetService over the server's store."""
    import os

    options = options_from_env(os.environ)
    xds = XdsServer(ctx.store, dataclasses.replace(options, insecure=ctx.options.insecure,
                                                   replica_name=replica_name(ctx.options)))
    xds.register(server)
    ctx.xds = xds
    ctx.on_shutdown.append(xds.close)
