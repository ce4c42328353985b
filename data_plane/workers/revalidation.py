"""What revalidation on update did when one configuration version was applied (SPEC §12, B6), pure: each
worker's result is merged into one per version, and the supervisor's reporter takes the merged ones for the
node's next report (`RevalidationDone`). Bounded: a few versions, a bounded list of fingerprints each."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

MAX_FINGERPRINTS = 1_000  # per version (the control plane's bound on closed_fingerprints)
MAX_VERSIONS = 16  # merged results waiting for the reporter; the oldest is dropped beyond


@dataclass(frozen=True)
class Revalidation:
    """One version's revalidation on this node: `versions` are the node's per-type versions it ran under;
    `applied_time` / `done_time` are wall-clock (apply started, last worker finished)."""

    versions: tuple[tuple[str, str], ...]
    applied_time: float
    done_time: float
    checked: int  # live connections re-judged
    closed: int  # of them closed because their certificate is now refused
    closed_fingerprints: tuple[str, ...]  # SHA-256 of the closed connections' leaves, bounded


@dataclass
class _Partial:
    done_time: float = 0.0
    checked: int = 0
    closed: int = 0
    fingerprints: dict[str, None] | None = None


class Revalidations:
    """Worker results by configuration version (`add`), sealed into one `Revalidation` once every worker
    has applied it (`seal`), drained by the reporter (`take`)."""

    def __init__(self) -> None:
        self._partial: OrderedDict[str, _Partial] = OrderedDict()
        self._ready: list[Revalidation] = []

    def add(self, version: str, checked: int, closed_fingerprints: Iterable[str], closed: int, done_time: float) -> None:
        partial = self._partial.get(version)
        if partial is None:
            partial = self._partial[version] = _Partial(fingerprints={})
            while len(self._partial) > MAX_VERSIONS:
                self._partial.popitem(last=False)
        partial.done_time = max(partial.done_time, done_time)
        partial.checked += max(0, checked)
        partial.closed += max(0, closed)
        assert partial.fingerprints is not None
        for fingerprint in closed_fingerprints:
            if len(partial.fingerprints) >= MAX_FINGERPRINTS:
                break
            partial.fingerprints[fingerprint] = None

    def seal(self, version: str, versions: Iterable[tuple[str, str]], applied_time: float) -> Revalidation | None:
        """Every worker runs `version` now: its merged result (None when no worker revalidated)."""
        partial = self._partial.pop(version, None)
        if partial is None:
            return None
        assert partial.fingerprints is not None
        done = Revalidation(tuple(sorted(versions)), applied_time, max(partial.done_time, applied_time),
                            partial.checked, partial.closed, tuple(partial.fingerprints))
        self._ready.append(done)
        del self._ready[:-MAX_VERSIONS]
        return done

    def take(self) -> list[Revalidation]:
        ready, self._ready = self._ready, []
        return ready

    def pending(self) -> bool:
        return bool(self._ready)
