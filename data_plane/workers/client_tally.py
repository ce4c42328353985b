"""Client certificates seen, per listener, between two reports (SPEC §12 node reports) — pure, bounded.

A worker calls `saw()` once per handshake (a dict update: nothing is parsed or hashed on that path),
ships `take()` to the pool with its counters once a second, and the pool `merge()`s what every worker sent
until the node reporter takes it. At most `limit` distinct certificates are kept, the least recently seen
dropped first ("newest kept")."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

MAX_CLIENTS = 1_000

# (listener, leaf DER or b"" without a certificate) -> [first, last, count, verified, accepted, error, allowlisted]
Row = tuple[str, bytes, float, float, int, bool, bool, str, bool]


class ClientTally:
    def __init__(self, limit: int = MAX_CLIENTS) -> None:
        self.limit = limit
        self._seen: OrderedDict[tuple[str, bytes], list[Any]] = OrderedDict()

    def saw(self, listener: str, verdict: Any, now: float) -> None:
        """One handshake judged by `verdict` (None: the listener asks for no client certificate)."""
        leaf = (verdict.leaf or b"") if verdict is not None else b""
        verified = bool(verdict is not None and verdict.chain_verified)
        accepted = bool(verdict is None or verdict.accepted)
        error = verdict.error if verdict is not None else ""
        allowlisted = verdict is not None and verdict.reason == "allowlisted"
        self._add((listener, leaf), now, now, 1, verified, accepted, error, allowlisted)

    def _add(self, key: tuple[str, bytes], first: float, last: float, count: int, verified: bool, accepted: bool,
             error: str, allowlisted: bool) -> None:
        entry = self._seen.get(key)
        if entry is None:
            if len(self._seen) >= self.limit:
                self._seen.popitem(last=False)
            self._seen[key] = [first, last, count, verified, accepted, error, allowlisted]
            return
        self._seen.move_to_end(key)
        entry[0] = min(entry[0], first)
        entry[2] += count
        if last >= entry[1]:  # the latest verdict wins
            entry[1], entry[3], entry[4], entry[5], entry[6] = last, verified, accepted, error, allowlisted

    def take(self) -> list[Row]:
        """Everything since the last take, oldest sighting first; the tally starts empty again."""
        rows = [(k[0], k[1], *v) for k, v in self._seen.items()]
        self._seen = OrderedDict()
        return rows  # type: ignore[return-value]

    def merge(self, rows: Iterable[Row]) -> None:
        for listener, leaf, first, last, count, verified, accepted, error, allowlisted in rows:
            self._add((str(listener), bytes(leaf)), float(first), float(last), int(count), bool(verified),
                      bool(accepted), str(error), bool(allowlisted))

    def __len__(self) -> int:
        return len(self._seen)
