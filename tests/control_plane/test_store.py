"""SqliteStore on its own: revisions, etags, audit rows, no-op updates, thread safety, notifications."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from mtlsgate.v1 import resources_pb2

from control_plane.store import AlreadyExists, EtagMismatch, NotFound, SqliteStore


def tc(description: str) -> resources_pb2.TrustConfig:
    return resources_pb2.TrustConfig(name="trustConfigs/t", description=description)


def test_revisions_etags_and_audit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    seen: list[int] = []
    unsubscribe = store.subscribe(seen.append)
    first = store.create(tc("a"), actor="alice")
    assert first.revision == 1 and first.resource is not None and first.resource.etag
    with pytest.raises(AlreadyExists):
        store.create(tc("a"), actor="alice")
    same = store.update(tc("a"), actor="bob")
    assert not same.changed and same.revision == 1  # identical content: nothing written
    with pytest.raises(EtagMismatch):
        store.update(tc("b"), actor="bob", expected_etag="stale")
    second = store.update(tc("b"), actor="bob", expected_etag=first.resource.etag)
    assert second.revision == 2 and second.resource is not None
    assert second.resource.create_time == first.resource.create_time
    assert store.state().written_at == pytest.approx(second.resource.update_time.ToNanoseconds() / 1e9)
    with pytest.raises(NotFound):
        store.delete("trustConfigs/other", actor="bob")
    store.delete("trustConfigs/t", actor="carol")
    assert store.get("trustConfigs/t") is None and store.revision() == 3
    assert seen == [1, 2, 3]
    unsubscribe()
    store.create(tc("c"), actor="dave")
    assert seen == [1, 2, 3]
    assert [(r.revision, r.actor, r.method) for r in store.audit()] == [
        (1, "alice", "CREATE"), (2, "bob", "UPDATE"), (3, "carol", "DELETE"), (4, "dave", "CREATE")]
    assert [r.revision for r in store.audit("trustConfigs/t", after_revision=1, limit=2)] == [2, 3]
    store.close()
    reopened = SqliteStore(tmp_path / "s.db")
    assert reopened.revision() == 4 and reopened.get("trustConfigs/t").description == "c"  # type: ignore[union-attr]
    reopened.close()


def test_state_snapshots_are_immutable() -> None:
    store = SqliteStore()
    store.create(tc("a"), actor="x")
    before = store.state()
    store.update(tc("b"), actor="x")
    assert before.trust_configs["trustConfigs/t"].description == "a"
    assert store.state().trust_configs["trustConfigs/t"].description == "b"
    with pytest.raises(TypeError):
        before.trust_configs["trustConfigs/u"] = tc("u")  # type: ignore[index]


def test_threads_with_etag_retries_lose_no_update() -> None:
    store = SqliteStore()
    store.create(resources_pb2.TrustConfig(name="trustConfigs/t", description="0"), actor="x")
    conflicts = []

    def increment(times: int) -> None:
        for _ in range(times):
            while True:
                current = store.get("trustConfigs/t")
                assert current is not None
                bumped = resources_pb2.TrustConfig(name=current.name, description=str(int(current.description) + 1))
                try:
                    store.update(bumped, actor="t", expected_etag=current.etag)
                    break
                except EtagMismatch:
                    conflicts.append(1)

    threads = [threading.Thread(target=increment, args=(25,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    final = store.get("trustConfigs/t")
    assert final is not None and final.description == "150"
    assert store.revision() == 151
    assert [r.revision for r in store.audit(limit=1000)] == list(range(1, 152))
