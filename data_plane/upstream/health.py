"""Active health checking, the pure part: the per-endpoint state machine (healthy after N consecutive
passing checks, unhealthy after M consecutive failing ones), the check's defaults, and what a response's
status line means. The probes themselves run in the node's supervisor (data_plane/workers/health_checks.py).

An endpoint starts healthy: a new configuration sends traffic at once, and a dead endpoint is taken out
after `unhealthyThreshold` failed checks (passive outlier ejection usually notices first)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 1.0
DEFAULT_HEALTHY_THRESHOLD = 2
DEFAULT_UNHEALTHY_THRESHOLD = 3
MAX_STATUS_LINE_BYTES = 1024  # of a health-check response, all we read; the rest is never looked at


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    path: str
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    healthy_threshold: int = DEFAULT_HEALTHY_THRESHOLD
    unhealthy_threshold: int = DEFAULT_UNHEALTHY_THRESHOLD

    @classmethod
    def from_proto(cls, hc: object) -> HealthPolicy | None:
        """A BackendService's `healthCheck` with defaults filled in; None when it has no path (no checks)."""
        path = hc.path  # type: ignore[attr-defined]
        if not path:
            return None

        def secs(name: str, default: float) -> float:
            if not hc.HasField(name):  # type: ignore[attr-defined]
                return default
            d = getattr(hc, name)
            return float(d.seconds + d.nanos / 1e9)

        return cls(path=path, interval=secs("interval", DEFAULT_INTERVAL), timeout=secs("timeout", DEFAULT_TIMEOUT),
                   healthy_threshold=hc.healthy_threshold or DEFAULT_HEALTHY_THRESHOLD,  # type: ignore[attr-defined]
                   unhealthy_threshold=hc.unhealthy_threshold or DEFAULT_UNHEALTHY_THRESHOLD)  # type: ignore[attr-defined]


@dataclass(slots=True)
class HealthState:
    healthy: bool = True
    passes: int = 0  # consecutive
    failures: int = 0  # consecutive
    last_error: str = ""
    checks: int = 0
    transitions: int = 0

    def observe(self, ok: bool, policy: HealthPolicy, error: str = "") -> bool:
        """One check's outcome; True when it changed `healthy`."""
        self.checks += 1
        if ok:
            self.passes += 1
            self.failures = 0
            self.last_error = ""
            if not self.healthy and self.passes >= policy.healthy_threshold:
                self.healthy = True
                self.transitions += 1
                return True
            return False
        self.failures += 1
        self.passes = 0
        self.last_error = error
        if self.healthy and self.failures >= policy.unhealthy_threshold:
            self.healthy = False
            self.transitions += 1
            return True
        return False


def check_verdict(status_line: bytes) -> tuple[bool, str]:
    """(passed, why not) for the first line of a health-check response: any 2xx passes."""
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        return False, "not an HTTP/1.x status line"
    status = int(parts[1])
    if 200 <= status < 300:
        return True, ""
    return False, f"status {status}"
