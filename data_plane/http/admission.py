"""Which client connections a worker admits, and which it evicts to make room (SPEC §11), as a small
state machine with no I/O: the worker tells it what opened, closed, went idle or got busy; it answers
admit / evict this one first / refuse.

Evictable are connections that have not finished their handshake or sit idle between requests, oldest
first (the order they became evictable). A connection with a request in progress is never evicted.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

HANDSHAKE = "handshake_pending"
IDLE = "idle_keepalive"


@dataclass(frozen=True, slots=True)
class Decision(Generic[K]):
    refuse: str = ""  # a reason: the new connection is closed at once
    evict: K | None = None  # close this one (reason `evict_reason`) before admitting the new one
    evict_reason: str = ""


class Admission(Generic[K]):
    def __init__(self, max_connections: float, max_per_ip: float) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self._ip_of: dict[K, str] = {}
        self._per_ip: dict[str, int] = {}
        self._evictable: dict[K, str] = {}  # insertion order = oldest first

    def __len__(self) -> int:
        return len(self._ip_of)

    def admit(self, ip: str) -> Decision[K]:
        """What to do with a new connection from `ip` (then call `opened` if it is kept)."""
        if self._per_ip.get(ip, 0) >= self.max_per_ip:
            return Decision(refuse="per_ip_limit")
        if len(self._ip_of) < self.max_connections:
            return Decision()
        for victim, reason in self._evictable.items():
            return Decision(evict=victim, evict_reason=reason)
        return Decision(refuse="worker_full")

    def opened(self, key: K, ip: str) -> None:
        self._ip_of[key] = ip
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._evictable[key] = HANDSHAKE

    def closed(self, key: K) -> None:
        ip = self._ip_of.pop(key, None)
        if ip is None:
            return
        self._evictable.pop(key, None)
        left = self._per_ip[ip] - 1
        if left:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]

    def idle(self, key: K) -> None:
        """Between requests: evictable again, now the newest."""
        if key in self._ip_of:
            self._evictable.pop(key, None)
            self._evictable[key] = IDLE

    def busy(self, key: K) -> None:
        """A request has begun: not evictable until it is done."""
        self._evictable.pop(key, None)

    def connections_from(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)
