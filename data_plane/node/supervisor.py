"""`mtlsgate proxy`, supervisor side: wires the xDS agent, the config applier (port reservations now; the
worker pool once it serves listeners), the admin endpoint, logging and signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from data_plane.node.admin import AdminServer
from data_plane.node.agent import Backoff, NodeIdentity, XdsAgent
from data_plane.node.apply import ConfigApplier, PortReservations
from data_plane.node.reporter import NodeReporter

log = logging.getLogger("mtlsgate.node")


@dataclass(frozen=True)
class ProxyOptions:
    server: str
    node_id: str
    cluster: str
    labels: Mapping[str, str] = field(default_factory=dict)
    workers: int = 2
    admin: str = "127.0.0.1:9901"
    cache_dir: Path | None = None
    listen_address: str = "0.0.0.0"
    xds_ca: Path | None = None
    xds_cert: Path | None = None
    xds_key: Path | None = None
    backoff: Backoff = field(default_factory=Backoff)
    report_interval: float = 5.0  # seconds between node reports (SPEC §12)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (SPEC §7)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def make_applier(options: ProxyOptions, reservations: PortReservations) -> ConfigApplier:
    """The component that makes a configuration active on this node: the worker processes."""
    from prometheus_client import REGISTRY

    from data_plane.workers.pool import WorkerPool

    pool = WorkerPool(options.workers, options.listen_address, reservations)
    REGISTRY.register(pool.metrics)  # worker counters, summed, on the admin /metrics
    return pool


def channel_credentials(options: ProxyOptions) -> grpc.ChannelCredentials | None:
    if options.xds_ca is None and options.xds_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=options.xds_ca.read_bytes() if options.xds_ca else None,
        private_key=options.xds_key.read_bytes() if options.xds_key else None,
        certificate_chain=options.xds_cert.read_bytes() if options.xds_cert else None,
    )


async def run_proxy(options: ProxyOptions) -> None:
    reservations = PortReservations(options.listen_address)
    applier = make_applier(options, reservations)
    agent = XdsAgent(options.server, NodeIdentity(options.node_id, options.cluster, dict(options.labels)),
                     applier, options.cache_dir, backoff=options.backoff, credentials=channel_credentials(options))
    admin = AdminServer(agent, options.admin)
    admin.start()
    log.info("proxy node %s (cluster %s, labels %s) admin on %s, control plane %s", options.node_id,
             options.cluster, dict(options.labels), admin.address, options.server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(agent.run(), name="xds-agent")
    stopper = asyncio.create_task(stop.wait())
    reporter = None
    if hasattr(applier, "clients"):  # the worker pool: what its workers count goes to the control plane
        reporter = asyncio.create_task(
            NodeReporter(agent, applier, options.node_id, interval=options.report_interval).run(), name="reports")
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # an unexpected agent crash: surface it
    finally:
        started = time.monotonic()
        for t in (task, stopper, *([reporter] if reporter else [])):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        with contextlib.suppress(Exception):  # reported by the persister itself
            await agent.flush_cache()
        await applier.close()
        admin.close()
        log.info("proxy node %s stopped in %.2fs", options.node_id, time.monotonic() - started)
