"""Active HTTP health checks of BackendService endpoints, run once per node by the supervisor (not once
per worker): one task per endpoint sends `GET path` every interval, reads the status line only (at most
MAX_STATUS_LINE_BYTES, within the timeout: a response that is huge or never ends costs nothing more), and
feeds the pure state machine (data_plane/upstream/health.py). Changes go to every worker, which skips
unhealthy endpoints when it balances."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Gauge

from data_plane.upstream.health import MAX_STATUS_LINE_BYTES, HealthPolicy, HealthState, check_verdict
from data_plane.workers.observability import log_event
from data_plane.workers.upstream_tls import BackendTlsRefused, UpstreamTls, open_tls

log = logging.getLogger(__name__)

ENDPOINT_HEALTHY = Gauge("mtlsgate_backend_endpoint_healthy",
                         "1 while the node's active health checks find a BackendService endpoint healthy",
                         ["backend_service", "endpoint"])

HealthKey = tuple[str, str]  # (backendServices/ID, HOST:PORT)


async def probe(address: str, policy: HealthPolicy, tls: UpstreamTls | None = None) -> tuple[bool, str]:
    """One check: (passed, why not). With `tls` the check speaks TLS and judges the endpoint's certificate
    as requests do: an endpoint whose certificate is refused is unhealthy."""
    host, _, port = address.rpartition(":")
    writer = None
    try:
        async with asyncio.timeout(policy.timeout):
            if tls is None:
                reader, writer = await asyncio.open_connection(host.strip("[]"), int(port),
                                                               limit=MAX_STATUS_LINE_BYTES)
            else:
                loop = asyncio.get_running_loop()
                reader = asyncio.StreamReader(limit=MAX_STATUS_LINE_BYTES, loop=loop)
                stream = asyncio.StreamReaderProtocol(reader, loop=loop)
                connected = await open_tls(loop, tls, stream, host.strip("[]"), int(port))
                assert connected.app_transport is not None
                writer = asyncio.StreamWriter(connected.app_transport, stream, reader, loop)
            writer.write(f"GET {policy.path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: mtlsgate-health-check\r\n"
                         "Connection: close\r\n\r\n".encode("latin-1"))
            line = await reader.readuntil(b"\n")
        return check_verdict(line)
    except TimeoutError:
        return False, f"no status line within {policy.timeout:g}s"
    except asyncio.LimitOverrunError:
        return False, f"status line longer than {MAX_STATUS_LINE_BYTES} bytes"
    except asyncio.IncompleteReadError:
        return False, "closed before a status line"
    except BackendTlsRefused as exc:
        return False, str(exc)
    except OSError as exc:
        return False, f"cannot connect: {exc.strerror or exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@dataclass
class _Check:
    policy: HealthPolicy
    tls: UpstreamTls | None = None
    state: HealthState = field(default_factory=HealthState)
    task: asyncio.Task[None] | None = None
    last_check: float = 0.0


class HealthChecker:
    """The node's health checks; `on_change(health map)` is called whenever an endpoint changes state."""

    def __init__(self, on_change: Callable[[dict[HealthKey, bool]], None]) -> None:
        self.on_change = on_change
        self._checks: dict[HealthKey, _Check] = {}

    def health(self) -> dict[HealthKey, bool]:
        return {key: check.state.healthy for key, check in self._checks.items()}

    def update(self, services: Mapping[str, Any], tls: Mapping[str, UpstreamTls | None] | None = None) -> None:
        """Check the endpoints of `services` (BackendService messages by name) from now on, over TLS for
        the services `tls` names; an endpoint that stays keeps its state, one that goes is forgotten."""
        wanted: dict[HealthKey, tuple[HealthPolicy, UpstreamTls | None]] = {}
        for name, service in services.items():
            policy = HealthPolicy.from_proto(service.health_check)
            if policy is not None:
                service_tls = (tls or {}).get(name)
                for endpoint in service.endpoints:
                    wanted[(name, endpoint.address)] = (policy, service_tls)
        for key in [k for k in self._checks if k not in wanted]:
            self._stop(key)
        for key, (policy, service_tls) in wanted.items():
            check = self._checks.get(key)
            digest = service_tls.digest if service_tls is not None else None
            if check is not None and check.policy == policy and \
                    (check.tls.digest if check.tls is not None else None) == digest:
                continue
            if check is not None:
                self._stop(key)
            check = _Check(policy, service_tls, check.state if check is not None else HealthState())
            self._checks[key] = check
            ENDPOINT_HEALTHY.labels(*key).set(1 if check.state.healthy else 0)
            check.task = asyncio.get_running_loop().create_task(self._run(key, check))

    def _stop(self, key: HealthKey) -> None:
        check = self._checks.pop(key)
        if check.task is not None:
            check.task.cancel()
        with contextlib.suppress(KeyError):
            ENDPOINT_HEALTHY.remove(*key)

    async def _run(self, key: HealthKey, check: _Check) -> None:
        policy = check.policy
        while True:
            started = time.monotonic()
            ok, why = await probe(key[1], policy, check.tls)
            check.last_check = time.time()
            if check.state.observe(ok, policy, why):
                healthy = check.state.healthy
                ENDPOINT_HEALTHY.labels(*key).set(1 if healthy else 0)
                log_event("backend_endpoint_health", backend_service=key[0], endpoint=key[1],
                          healthy=healthy, reason=why or "passing")
                self.on_change(self.health())
            await asyncio.sleep(max(0.0, policy.interval - (time.monotonic() - started)))

    def status(self) -> list[dict[str, Any]]:
        """What /config_dump shows: every checked endpoint's state."""
        return [{"backend_service": key[0], "endpoint": key[1], "healthy": c.state.healthy,
                 "consecutive_passes": c.state.passes, "consecutive_failures": c.state.failures,
                 "last_error": c.state.last_error, "checks": c.state.checks, "last_check": c.last_check}
                for key, c in sorted(self._checks.items())]

    def close(self) -> None:
        for key in list(self._checks):
            self._stop(key)
