"""Revocation latency (SPEC §12, B6), pure: for each store revision that revokes serials (an API write or a
fetched CRL), when it was published, when each node that serves the TrustConfig ACKed a TrustBundle built
from that revision or a later one, and when that node reported its revalidation of live connections done
(`RevalidationDone`) for a version it ACKed. The xDS server feeds it states and ACKs, the report servicer
feeds it revalidations; it returns what became enforced, and the glue observes the histogram.

Bounded: the last `MAX_REVOCATIONS` revocations, at most `MAX_NODES` node rows each and `MAX_ROWS` in all
(at 10,000 nodes the last 10 revocations are kept), a few ACKed versions and early revalidation reports per
node. In memory, per replica (docs/fleet-feedback.md says why)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mtlsgate.v1 import resources_pb2

from control_plane.rollouts.serving import revoked_serials

MAX_REVOCATIONS = 32  # kept, newest first in `latest`
MAX_NODES = 10_000  # node rows per revocation; nodes beyond are counted (`untracked`)
MAX_ROWS = 100_000  # node rows over all kept revocations: the oldest go first (~150 B a row; B4's < 500 MB)
MAX_SERIALS = 16  # serials listed per revocation (all are counted)
MAX_FINGERPRINTS = 16  # closed connections' fingerprints kept per node row
MAX_ACKED_VERSIONS = 8  # TrustBundle versions remembered per node (version → revision)
MAX_TRACKED_NODES = 20_000  # nodes whose ACKed versions are remembered
MAX_EARLY = 8  # revalidation reports per node that arrived before their ACK (the two streams race)
EARLY_SECONDS = 30.0
MAX_COVERS = 1_024  # TrustBundle versions whose covered revision is remembered (see `cover`)  # … kept this long; one for a version the node never ACKs is ignored

Revoked = frozenset[tuple[bytes, int]]  # (issuer DN, serial) as `revoked_serials` gives them


@dataclass(slots=True)
class NodeTimes:
    node_id: str
    acked_at: float = 0.0  # control-plane clock
    acked_version: str = ""
    enforced_at: float = 0.0  # the node's done time, within [published, acked_at] (see `_enforce`)
    closed: int = 0
    checked: int = 0
    closed_fingerprints: tuple[str, ...] = ()


@dataclass
class Revocation:
    sequence: int
    revision: int
    published_at: float  # the store write's time (the same on every replica)
    trust_configs: tuple[str, ...]
    serials: tuple[str, ...]  # lowercase hex, at most MAX_SERIALS
    serial_count: int
    nodes: dict[str, NodeTimes] = field(default_factory=dict)
    untracked: int = 0
    unacked: int = 0  # rows of `nodes` not ACKed yet: an ACK skips a revocation with none (B4: 10,000 ACKs a push)


@dataclass(frozen=True)
class Enforced:
    """One node's enforcement of one revocation, just recorded."""

    revocation: Revocation
    node: NodeTimes

    @property
    def seconds(self) -> float:
        return self.node.enforced_at - self.revocation.published_at


@dataclass(frozen=True)
class _Done:
    version: str
    done_time: float
    closed: int
    checked: int
    fingerprints: tuple[str, ...]
    received_at: float


class RevocationTracker:
    def __init__(self) -> None:
        self._revoked: dict[str, tuple[str, Revoked]] | None = None  # TrustConfig → (etag, revoked)
        self.latest: deque[Revocation] = deque()  # newest first; at most MAX_REVOCATIONS and MAX_ROWS rows
        self._acks: OrderedDict[str, OrderedDict[str, int]] = OrderedDict()  # node → version → revision
        self._early: dict[str, list[_Done]] = {}
        self._covers: OrderedDict[str, int] = OrderedDict()  # TrustBundle version → revision it carries
        self._sequence = 0
        self._rows = 0  # node rows over `latest`

    # ---------------------------------------------------------------- publication

    def on_state(self, revision: int, written_at: float, trust_configs: Mapping[str, resources_pb2.TrustConfig],
                 serving: Callable[[frozenset[str]], Iterable[str]]) -> Revocation | None:
        """A new store state. `serving(names)`: the connected nodes whose snapshot carries any of these
        TrustConfigs (full names). The first state only sets the baseline (a restart revokes nothing)."""
        before = self._revoked
        now: dict[str, tuple[str, Revoked]] = {}
        for name, tc in trust_configs.items():
            known = before.get(name) if before is not None else None
            etag = tc.etag or tc.SerializeToString(deterministic=True).hex()
            now[name] = known if known is not None and known[0] == etag else (etag, revoked_serials(tc))
        self._revoked = now
        if before is None:
            return None
        added: dict[str, Revoked] = {}
        for name, (_, revoked) in now.items():
            if name in before and (new := revoked - before[name][1]):
                added[name] = new
        if not added:
            return None
        serials = sorted({serial for new in added.values() for _, serial in new})
        self._sequence += 1
        revocation = Revocation(self._sequence, revision, written_at, tuple(sorted(added)),
                                tuple(format(s, "x") for s in serials[:MAX_SERIALS]), len(serials))
        for node_id in sorted(set(serving(frozenset(added)))):
            if len(revocation.nodes) >= MAX_NODES:
                revocation.untracked += 1
            else:
                revocation.nodes[node_id] = NodeTimes(node_id)
        revocation.unacked = len(revocation.nodes)
        self.latest.appendleft(revocation)
        self._rows += len(revocation.nodes)
        while len(self.latest) > MAX_REVOCATIONS or (self._rows > MAX_ROWS and len(self.latest) > 1):
            self._rows -= len(self.latest.pop().nodes)
        return revocation

    # ---------------------------------------------------------------- ACKs and revalidation reports

    def cover(self, version: str, revision: int) -> None:
        """TrustBundle `version` carries every revocation up to `revision`: a node held at a roll-out's
        base revision gets the revocations written since (revocationFastPath) in snapshots numbered with the
        base revision, so its pushes' revision alone would never count as an ACK of them."""
        self._covers[version] = max(revision, self._covers.pop(version, 0))
        while len(self._covers) > MAX_COVERS:
            self._covers.popitem(last=False)

    def on_ack(self, node_id: str, version: str, revision: int, now: float) -> list[Enforced]:
        """`node_id` ACKed TrustBundle `version`, pushed from store `revision`."""
        revision = max(revision, self._covers.get(version, 0))
        versions = self._acks.pop(node_id, None) or OrderedDict()
        versions[version] = max(revision, versions.pop(version, 0))
        del_count = len(versions) - MAX_ACKED_VERSIONS
        for old in list(versions)[:max(0, del_count)]:
            del versions[old]
        self._acks[node_id] = versions
        while len(self._acks) > MAX_TRACKED_NODES:
            gone, _ = self._acks.popitem(last=False)
            self._early.pop(gone, None)
        for revocation in self.latest:
            if not revocation.unacked or revocation.revision > revision:
                continue
            row = revocation.nodes.get(node_id)
            if row is not None and not row.acked_at:
                row.acked_at, row.acked_version = now, version
                revocation.unacked -= 1
        out: list[Enforced] = []
        for done in self._early.pop(node_id, []):
            if now - done.received_at < EARLY_SECONDS:
                out += self._revalidated(node_id, done, now)
        return out

    def on_revalidation(self, node_id: str, version: str, done_time: float, closed: int, checked: int,
                        fingerprints: Sequence[str], received_at: float) -> list[Enforced]:
        """`node_id` (the report stream's authenticated node) finished revalidating live connections under
        TrustBundle `version` at `done_time` (its clock)."""
        done = _Done(version, done_time, max(0, closed), max(0, checked),
                     tuple(fingerprints[:MAX_FINGERPRINTS]), received_at)
        return self._revalidated(node_id, done, received_at)

    def _revalidated(self, node_id: str, done: _Done, now: float) -> list[Enforced]:
        acked = self._acks.get(node_id)
        revision = acked.get(done.version) if acked is not None else None
        if revision is None:
            # Not ACKed (yet): the report may have overtaken the ACK on the other stream. A version this
            # node never ACKs expires here without effect.
            early = [d for d in self._early.get(node_id, []) if now - d.received_at < EARLY_SECONDS]
            early.append(done)
            if node_id in self._acks or len(self._early) < MAX_TRACKED_NODES:
                self._early[node_id] = early[-MAX_EARLY:]
            return []
        out = []
        for revocation in self.latest:
            row = revocation.nodes.get(node_id)
            if row is None or not row.acked_at or row.enforced_at or revocation.revision > revision:
                continue
            self._enforce(revocation, row, done)
            out.append(Enforced(revocation, row))
        return out

    @staticmethod
    def _enforce(revocation: Revocation, row: NodeTimes, done: _Done) -> None:
        # The node ACKs only once its workers revalidated, so enforcement is never later than the ACK; a
        # node clock behind or ahead of ours is kept inside [published, ACK].
        row.enforced_at = min(max(done.done_time, revocation.published_at), row.acked_at)
        row.closed, row.checked, row.closed_fingerprints = done.closed, done.checked, done.fingerprints

    def list(self, limit: int) -> list[Revocation]:
        return list(self.latest)[:max(0, limit)]
