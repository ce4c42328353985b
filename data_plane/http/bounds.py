"""Every bound a proxy worker enforces on what clients and backends control (SPEC §8, §11), in one place.

The values are SPEC §11's. `MTLSGATE_PROXY_BOUNDS` overrides them for a node and its workers — a
test and benchmark knob, not a tuning interface: `head_timeout=0.5,keepalive_idle_timeout=1` shrinks
deadlines so tests run in seconds; `off` lifts every deadline and connection limit (bench/proxy.py
measures B7, the cost of the bounds, with it). `/config_dump` shows the values a node runs with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENVIRONMENT_VARIABLE = "MTLSGATE_PROXY_BOUNDS"


@dataclass(frozen=True)
class Bounds:
    handshake_timeout: float = 10.0  # accept → handshake done
    head_timeout: float = 10.0  # first byte of a request → its head complete; not reset by each byte
    body_idle_timeout: float = 30.0  # longest pause inside a request body
    response_idle_timeout: float = 30.0  # longest pause of a backend's response (after the request went out)
    keepalive_idle_timeout: float = 60.0  # idle between requests
    backend_connect_timeout: float = 5.0
    max_connections: int = 4096  # per worker; at the cap the oldest idle/handshaking ones are evicted first
    max_connections_per_ip: int = 256  # concurrent, per client IP, per worker
    high_water: int = 64 * 1024  # user-space bytes buffered per direction before the other side is paused
    max_header_bytes: int = 64 * 1024  # request line + headers
    max_headers: int = 100
    max_pipelined_requests: int = 16  # parsed ahead of the one in flight, then reading pauses
    max_idle_backend_connections: int = 64  # kept per backend per worker
    sweep_interval: float = 0.25  # granularity of every deadline (one sweep per worker, no timer per request)

    @property
    def enforced(self) -> bool:
        return math.isfinite(self.handshake_timeout)

    def as_dict(self) -> dict[str, float | int | str]:
        return {f.name: _show(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _show(value: float | int) -> float | int | str:
    return "unlimited" if isinstance(value, float) and math.isinf(value) else value


_LIFTED: dict[str, Any] = {  # (an int field lifted holds math.inf: a float that compares as unlimited)
    f.name: math.inf for f in dataclasses.fields(Bounds)
    if f.name.endswith("_timeout") or f.name.startswith("max_connections")
}
UNBOUNDED = Bounds(**_LIFTED)


class BoundsError(ValueError):
    """`MTLSGATE_PROXY_BOUNDS` names an unknown bound or a value that is not a positive number."""


def from_environment(environ: Mapping[str, str]) -> Bounds:
    """SPEC §11's bounds with the overrides of `MTLSGATE_PROXY_BOUNDS` (unset or empty: none)."""
    text = environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if not text:
        return Bounds()
    if text == "off":
        return UNBOUNDED
    fields = {f.name: f for f in dataclasses.fields(Bounds)}
    overrides: dict[str, Any] = {}  # each a float or an int, as its field is typed
    for item in text.split(","):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise BoundsError(f"{ENVIRONMENT_VARIABLE}: {item.strip()!r} is not NAME=VALUE with NAME one of "
                              f"{', '.join(fields)}")
        try:
            value: float | int = float(raw) if fields[name].type == "float" else int(raw)
        except ValueError:
            raise BoundsError(f"{ENVIRONMENT_VARIABLE}: {name}={raw.strip()!r} is not a number") from None
        if value <= 0:
            raise BoundsError(f"{ENVIRONMENT_VARIABLE}: {name} must be positive")
        overrides[name] = value
    return dataclasses.replace(Bounds(), **overrides)
