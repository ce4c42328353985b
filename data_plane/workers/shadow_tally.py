"""Shadow evaluation counts between two reports (SPEC §12) — pure, bounded.

Every new handshake on a listener with shadow candidates is judged under each candidate too; the worker
records here how many it judged per candidate and, where the candidate's verdict differs from the active
one in `accepted`, the disagreement (direction, client fingerprint, both error strings). It ships `take()`
to the pool once a second and the pool `merge()`s every worker's rows until the node reporter takes them.
At most `limit` distinct disagreements are itemised per listener; further ones are still counted, in one
entry per (candidate, revision, direction) whose candidate error is OVERFLOW, so totals are never lost."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MAX_ENTRIES = 64  # distinct disagreements itemised per listener per interval

NO_DISAGREEMENT, WOULD_NEWLY_REJECT, WOULD_NEWLY_ACCEPT = 0, 1, 2  # = ShadowDisagreement.Direction
OVERFLOW = "(further disagreements, not itemised: more distinct ones than a report carries)"

# (listener, candidate, candidate_version, direction, fingerprint_sha256, active_error, candidate_error, count);
# direction NO_DISAGREEMENT with empty strings = the handshakes judged under that candidate.
Row = tuple[str, str, str, int, str, str, str, int]
_Key = tuple[str, str, int, str, str, str]


def direction(active: Any, candidate: Any) -> int:
    """How the candidate's verdict differs from the active one's (in `accepted`: what is enforced)."""
    if active.accepted == candidate.accepted:
        return NO_DISAGREEMENT
    return WOULD_NEWLY_REJECT if active.accepted else WOULD_NEWLY_ACCEPT


class ShadowTally:
    def __init__(self, limit: int = MAX_ENTRIES) -> None:
        self.limit = limit
        self._judged: dict[tuple[str, str, str], int] = {}
        self._entries: dict[str, dict[_Key, int]] = {}  # listener → disagreement key → count

    def judged(self, listener: str, candidate: str, version: str, count: int = 1) -> None:
        key = (listener, candidate, version)
        self._judged[key] = self._judged.get(key, 0) + count

    def disagreed(self, listener: str, candidate: str, version: str, way: int, fingerprint: str,
                  active_error: str, candidate_error: str, count: int = 1) -> None:
        entries = self._entries.setdefault(listener, {})
        key = (candidate, version, way, fingerprint, active_error, candidate_error)
        if key not in entries and len(entries) >= self.limit and candidate_error != OVERFLOW:
            key = (candidate, version, way, "", "", OVERFLOW)
        entries[key] = entries.get(key, 0) + count

    def take(self) -> list[Row]:
        """Everything since the last take; the tally starts empty again."""
        rows: list[Row] = [(listener, candidate, version, NO_DISAGREEMENT, "", "", "", n)
                           for (listener, candidate, version), n in self._judged.items()]
        rows += [(listener, *key, n) for listener, entries in self._entries.items() for key, n in entries.items()]
        self._judged, self._entries = {}, {}
        return rows

    def merge(self, rows: Iterable[Row]) -> None:
        for listener, candidate, version, way, fingerprint, active_error, candidate_error, count in rows:
            if int(way) == NO_DISAGREEMENT:
                self.judged(str(listener), str(candidate), str(version), int(count))
            else:
                self.disagreed(str(listener), str(candidate), str(version), int(way), str(fingerprint),
                               str(active_error), str(candidate_error), int(count))

    def __len__(self) -> int:
        return len(self._judged) + sum(len(e) for e in self._entries.values())
