"""How a received configuration becomes active on the node: the `ConfigApplier` interface (the worker pool
implements it) and listener port reservations on the node's listen address."""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from typing import Protocol

from mtlsgate.v1 import resources_pb2

from data_plane.node.config import ConfigRejected, NodeConfig


class ConfigApplier(Protocol):
    async def apply(self, config: NodeConfig) -> None:
        """Return once `config` is active; raise ConfigRejected (the last good config stays active)."""
        ...

    async def close(self) -> None: ...


class PortReservations:
    """Holds one bound socket per listener port so that a port taken by another program is found (and the
    config NACKed) before anything changes. Sockets use SO_REUSEPORT so workers can bind the same port."""

    def __init__(self, address: str = "0.0.0.0") -> None:
        self.address = address
        self._sockets: dict[int, socket.socket] = {}

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(self._sockets)

    def _bind(self, port: int, owner: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.address, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigRejected(f"{owner}: port {port} is already in use on this node "
                                     f"(listen address {self.address})") from exc
            raise ConfigRejected(f"{owner}: cannot bind port {port} on {self.address}: {exc.strerror}") from exc
        return sock

    def update(self, listeners: Mapping[str, resources_pb2.Listener]) -> None:
        """Reserve the ports of `listeners` and release the others, all or nothing."""
        wanted = {int(lst.port): name for name, lst in sorted(listeners.items())}
        added: dict[int, socket.socket] = {}
        try:
            for port, owner in sorted(wanted.items()):
                if port not in self._sockets:
                    added[port] = self._bind(port, owner)
        except ConfigRejected:
            for sock in added.values():
                sock.close()
            raise
        self._sockets.update(added)
        for port in [p for p in self._sockets if p not in wanted]:
            self._sockets.pop(port).close()

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


class PortReservingApplier:
    """The applier used until worker processes serve the listeners: it makes a config active by reserving
    its ports (so a port conflict is NACKed exactly as it will be with workers)."""

    def __init__(self, reservations: PortReservations) -> None:
        self.reservations = reservations
        self.active: NodeConfig | None = None

    async def apply(self, config: NodeConfig) -> None:
        self.reservations.update(config.listeners)
        self.active = config

    async def close(self) -> None:
        self.reservations.close()
