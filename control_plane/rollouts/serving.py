"""Which configuration each node serves during a roll-out, and revocations that skip the waves (pure).

While a run is active (PREPARING, RUNNING, PAUSED, HALTED) a node the run has reached serves the store's
current state; every other node serves the run's base revision, with the revocations written since merged
in when the policy's `revocationFastPath` is on (the default): a change that only adds revoked serials is
never held back. Versions are content hashes, so a node held at the base keeps exactly the versions it had.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping

from cryptography import x509
from mtlsgate.v1 import resources_pb2, rollouts_pb2

from control_plane.store.base import COLLECTION_FIELDS, StoreState, content_etag, copy_message, make_state

ACTIVE_STATES = frozenset({rollouts_pb2.RolloutRun.PREPARING, rollouts_pb2.RolloutRun.RUNNING,
                           rollouts_pb2.RolloutRun.PAUSED, rollouts_pb2.RolloutRun.HALTED})
# The collections a node's configuration is built from.
SERVED_COLLECTIONS = ("trustConfigs", "serverTlsPolicies", "certificates", "listeners")


def active_run(state: StoreState) -> rollouts_pb2.RolloutRun | None:
    """The run that holds nodes back, if any (at most one is active at a time)."""
    active = [run for run in state.rollouts.values() if run.state in ACTIVE_STATES]
    return max(active, key=lambda run: run.base_revision) if active else None


@functools.lru_cache(maxsize=256)
def _revoked(der_or_pem: bytes, pem: bool) -> frozenset[tuple[bytes, int]]:
    try:
        crl = x509.load_pem_x509_crl(der_or_pem) if pem else x509.load_der_x509_crl(der_or_pem)
        issuer = crl.issuer.public_bytes()
        return frozenset((issuer, entry.serial_number) for entry in crl)
    except ValueError:
        return frozenset()


def revoked_serials(tc: resources_pb2.TrustConfig) -> frozenset[tuple[bytes, int]]:
    """(issuer DN, serial) of every certificate the TrustConfig's CRLs (written and fetched) revoke."""
    out: set[tuple[bytes, int]] = set()
    for store in tc.trust_stores:
        for crl in store.crls:
            out |= _revoked(crl.pem_crl.encode(), True)
    for status in tc.crl_source_status:
        if status.der_crl:
            out |= _revoked(status.der_crl, False)
    return frozenset(out)


def _without_crls(tc: resources_pb2.TrustConfig) -> bytes:
    out = resources_pb2.TrustConfig()
    out.CopyFrom(tc)
    for field in ("etag", "create_time", "update_time", "crl_source_status"):
        out.ClearField(field)
    for store in out.trust_stores:
        del store.crls[:]
    return out.SerializeToString(deterministic=True)


def with_revocations(base: resources_pb2.TrustConfig, latest: resources_pb2.TrustConfig
                     ) -> resources_pb2.TrustConfig | None:
    """`base` with the CRLs of `latest`, when that only adds revocations (every serial `base` revokes stays
    revoked) and the trust stores line up; None otherwise (nothing to merge, or not a revocation)."""
    if len(base.trust_stores) != len(latest.trust_stores):
        return None
    merged = resources_pb2.TrustConfig()
    merged.CopyFrom(base)
    for mine, theirs in zip(merged.trust_stores, latest.trust_stores, strict=True):
        del mine.crls[:]
        mine.crls.extend(theirs.crls)
    del merged.crl_source_status[:]
    merged.crl_source_status.extend(latest.crl_source_status)
    merged.etag = content_etag(merged)
    if merged.etag == base.etag or not revoked_serials(merged) >= revoked_serials(base):
        return None
    return merged


def is_revocation_only(before: resources_pb2.TrustConfig, after: resources_pb2.TrustConfig) -> bool:
    """Whether `before` → `after` changes only CRLs and revokes at least everything `before` did."""
    return (_without_crls(before) == _without_crls(after) and
            revoked_serials(after) >= revoked_serials(before))


def served_base(base: StoreState, latest: StoreState, fast_path: bool) -> StoreState:
    """What a node not yet reached serves: the base revision, plus the revocations written since."""
    if not fast_path:
        return base
    merged: dict[str, resources_pb2.TrustConfig] = {}
    for name, tc in base.trust_configs.items():
        now = latest.trust_configs.get(name)
        if now is not None and now.etag != tc.etag:
            candidate = with_revocations(tc, now)
            if candidate is not None:
                merged[name] = candidate
    if not merged:
        return base
    maps = {c: dict(base.collection(c)) for c in COLLECTION_FIELDS}
    maps["trustConfigs"].update(merged)
    return make_state(base.revision, base.written_at, maps)


def changed_names(base: StoreState, target: StoreState) -> list[str]:
    """The served resources whose content differs between two states, in name order."""
    out = []
    for collection in SERVED_COLLECTIONS:
        before, after = base.collection(collection), target.collection(collection)
        for name in sorted(set(before) | set(after)):
            a, b = before.get(name), after.get(name)
            if (a is None) != (b is None) or (a is not None and b is not None and
                                              content_etag(a) != content_etag(b)):
                out.append(name)
    return out


def fingerprint(versions: Mapping[str, str]) -> str:
    return hashlib.sha256(repr(sorted(versions.items())).encode()).hexdigest()[:16]


def targeted(nodes: Mapping[str, Mapping[str, str]], base_versions: Mapping[str, Mapping[str, str]],
             target_versions: Mapping[str, Mapping[str, str]]) -> dict[str, Mapping[str, str]]:
    """The nodes (ID → labels) whose configuration versions differ between the base and the target."""
    return {n: labels for n, labels in nodes.items() if base_versions.get(n) != target_versions.get(n)}


def copy_run(run: rollouts_pb2.RolloutRun) -> rollouts_pb2.RolloutRun:
    out = copy_message(run)
    assert isinstance(out, rollouts_pb2.RolloutRun)
    return out


def trim(items: Iterable[object], limit: int) -> list[object]:
    listed = list(items)
    return listed[-limit:]
