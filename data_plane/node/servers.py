"""Which control-plane replica a node talks to (pure: no sockets, no DNS; the agent does the I/O).

`--server a:18000,b:18000` lists replicas in order of preference, and a name may resolve to several
addresses: each address is one endpoint. The node holds one stream at a time, to the first endpoint that
admits it, and stays there while it works (no fail-back churn). When its stream ends it moves on to the
next endpoint at once (a small jitter, so a replica's whole fleet does not arrive in one instant); when an
attempt fails it backs off exponentially with full jitter before the next one. The list is resolved again
each time the rotation wraps, so DNS changes are followed. Spread nodes over replicas by listing them in
different orders.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

MAX_SERVERS = 32  # addresses in --server; and endpoints kept per resolution


class ServerListError(ValueError):
    """A bad `--server` value (the message names the part that is wrong)."""


@dataclass(frozen=True)
class ServerAddress:
    host: str  # a DNS name or an IP literal (IPv6 without brackets)
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class Endpoint:
    """One address to open a channel to. `target` is a gRPC target; `tls_name` is the name the server's
    certificate must carry when we dial a resolved address (None: dial `target` by its own name)."""

    target: str
    label: str
    tls_name: str | None = None


def parse_servers(text: str) -> list[ServerAddress]:
    """`host:port[,host:port…]` (IPv6 as `[addr]:port`) → addresses, in order."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ServerListError(f"--server {text!r}: expected HOST:PORT[,HOST:PORT…]")
    if len(parts) > MAX_SERVERS:
        raise ServerListError(f"--server lists {len(parts)} addresses; at most {MAX_SERVERS} allowed")
    out = []
    for part in parts:
        host, sep, port_text = part.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ServerListError(f"--server {part!r}: write an IPv6 address as [ADDRESS]:PORT")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ServerListError(f"--server {part!r}: expected HOST:PORT with a port from 1 to 65535")
        out.append(ServerAddress(host, int(port_text)))
    return out


def endpoints_for(server: ServerAddress, addresses: Sequence[str]) -> list[Endpoint]:
    """The endpoints of one configured server, given what its name resolved to (ignored for IP literals;
    an empty list means it did not resolve)."""
    if server.is_ip:
        return [Endpoint(_target(server.host, server.port), str(server))]
    unique = list(dict.fromkeys(addresses))[:MAX_SERVERS]
    return [Endpoint(_target(a, server.port), f"{server} ({a})", tls_name=server.host) for a in unique]


def _target(address: str, port: int) -> str:
    return f"ipv6:[{address}]:{port}" if ":" in address else f"ipv4:{address}:{port}"


@dataclass
class Rotation:
    """The failover state machine: which endpoint next, and after how long."""

    base: float = 0.25  # the backoff of Backoff (agent.py): U(0, min(cap, base·2^failures))
    cap: float = 5.0
    endpoints: tuple[Endpoint, ...] = ()
    position: int = 0
    failures: int = 0  # consecutive attempts that were not admitted

    def needs_resolving(self) -> bool:
        return self.position >= len(self.endpoints)

    def resolved(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self.position = 0

    def current(self) -> Endpoint | None:
        return self.endpoints[self.position] if self.position < len(self.endpoints) else None

    def ended(self, admitted: bool, rng: random.Random) -> float:
        """The stream to the current endpoint ended; `admitted` says whether it had been working. Moves
        to the next endpoint; returns the delay before trying it."""
        self.position += 1
        if admitted:
            self.failures = 0
            return rng.uniform(0, self.base)
        self.failures += 1
        return rng.uniform(0, min(self.cap, self.base * 2 ** min(self.failures, 20)))
