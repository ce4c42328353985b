"""The store contract, run against every backend (SQLite and PostgreSQL): revisions, etags, audit rows,
no-op updates, atomic cross-resource checks, thread safety, notifications, reopening."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mtlsgate.v1 import resources_pb2

from control_plane.store import AlreadyExists, EtagMismatch, NotFound, SqliteStore, Store, StoreError
from control_plane.store.base import StoreState

# A backend's store factory: every call opens a store on the same database (for "reopen" checks).
OpenStore = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    opened: list[Store] = []
    if request.param == "sqlite":
        def factory() -> Store:
            store = SqliteStore(tmp_path / "s.db")
            opened.append(store)
            return store
    else:
        from control_plane.store.postgres import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")

        def factory() -> Store:
            store = PostgresStore(dsn)
            opened.append(store)
            return store
    try:
        yield factory
    finally:
        for store in opened:
            store.close()


def tc(description: str) -> resources_pb2.TrustConfig:
    return resources_pb2.TrustConfig(name="trustConfigs/t", description=description)


def test_revisions_etags_and_audit(open_store: OpenStore) -> None:
    store = open_store()
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
    store.delete("trustConfigs/t", actor="carol", role="admin")
    assert store.get("trustConfigs/t") is None and store.revision() == 3
    assert seen == [1, 2, 3]
    unsubscribe()
    store.create(tc("c"), actor="dave")
    assert seen == [1, 2, 3]
    assert [(r.revision, r.actor, r.method) for r in store.audit()] == [
        (1, "alice", "CREATE"), (2, "bob", "UPDATE"), (3, "carol", "DELETE"), (4, "dave", "CREATE")]
    assert [r.revision for r in store.audit("trustConfigs/t", after_revision=1, limit=2)] == [2, 3]
    assert [r.role for r in store.audit()] == ["", "", "admin", ""]
    store.close()
    reopened = open_store()
    assert reopened.revision() == 4 and reopened.get("trustConfigs/t").description == "c"  # type: ignore[union-attr]
    assert reopened.state().written_at == pytest.approx(store.state().written_at)


def test_state_snapshots_are_immutable(open_store: OpenStore) -> None:
    store = open_store()
    store.create(tc("a"), actor="x")
    before = store.state()
    store.update(tc("b"), actor="x")
    assert before.trust_configs["trustConfigs/t"].description == "a"
    assert store.state().trust_configs["trustConfigs/t"].description == "b"
    with pytest.raises(TypeError):
        before.trust_configs["trustConfigs/u"] = tc("u")  # type: ignore[index]


def test_threads_with_etag_retries_lose_no_update(open_store: OpenStore) -> None:
    store = open_store()
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


def test_a_failing_check_aborts_the_whole_write(open_store: OpenStore) -> None:
    """The API's cross-resource checks run inside the write: raising there stores nothing, spends no
    revision and writes no audit row — on every backend."""
    store = open_store()
    store.create(tc("a"), actor="x")
    seen: list[int] = []
    store.subscribe(seen.append)
    checked: list[tuple[int, str]] = []

    class Refused(StoreError):
        pass

    def refuse(state: StoreState, message: object) -> None:
        checked.append((state.revision, getattr(message, "description", "")))
        raise Refused("trustConfigs/t is referenced")

    with pytest.raises(Refused):
        store.update(tc("b"), actor="x", check=refuse)
    with pytest.raises(Refused):
        store.delete("trustConfigs/t", actor="x", check=refuse)
    assert checked == [(1, "b"), (1, "")]  # the check saw the state the write applied to, and the new message
    assert store.revision() == 1 and store.get("trustConfigs/t").description == "a"  # type: ignore[union-attr]
    assert [r.revision for r in store.audit()] == [1] and seen == []
    store.close()
    reopened = open_store()  # and nothing reached the disk or the database either
    assert reopened.revision() == 1 and reopened.get("trustConfigs/t").description == "a"  # type: ignore[union-attr]


def test_every_collection_round_trips(open_store: OpenStore) -> None:
    store = open_store()
    store.create(resources_pb2.TrustConfig(name="trustConfigs/a"), actor="x")
    store.create(resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/p"), actor="x")
    store.create(resources_pb2.Certificate(name="certificates/c", description="d"), actor="x")
    store.create(resources_pb2.Listener(name="listeners/l", port=8443), actor="x")
    store.delete("trustConfigs/a", actor="x")
    store.close()
    state = open_store().state()
    assert state.revision == 5
    assert (list(state.trust_configs), list(state.server_tls_policies), list(state.certificates),
            list(state.listeners)) == ([], ["serverTlsPolicies/p"], ["certificates/c"], ["listeners/l"])
    assert state.listeners["listeners/l"].port == 8443


def test_audit_records_the_role_and_nodes_are_a_collection(open_store: OpenStore) -> None:
    store = open_store()
    store.create(tc("a"), actor="spiffe://corp/ops/alice", role="editor")
    store.update(tc("b"), actor="system:crl-fetcher")
    node = resources_pb2.Node(name="nodes/edge-1", identity="spiffe://corp/node/edge-1", labels={"zone": "a"})
    store.create(node, actor="ci", role="admin")
    assert [(r.actor, r.role) for r in store.audit()] == [
        ("spiffe://corp/ops/alice", "editor"), ("system:crl-fetcher", ""), ("ci", "admin")]
    store.close()
    reopened = open_store()
    assert dict(reopened.state().nodes["nodes/edge-1"].labels) == {"zone": "a"}
    assert [r.role for r in reopened.audit()] == ["editor", "", "admin"]


def test_every_write_keeps_a_bounded_history_and_past_states_rebuild(open_store: OpenStore) -> None:
    from control_plane.store.base import MAX_REVISIONS_PER_RESOURCE, HistoryTruncated

    store = open_store()
    store.create(tc("v1"), actor="x")  # revision 1
    store.create(resources_pb2.Listener(name="listeners/l", port=1), actor="x")  # 2
    store.update(tc("v2"), actor="x")  # 3
    store.delete("listeners/l", actor="x", detail="roll-out r-1 halted: wave 1 NACKed")  # 4
    store.create(resources_pb2.Certificate(name="certificates/c"), actor="x")  # 5
    at2 = store.state_at(2)
    assert at2.revision == 2 and at2.trust_configs["trustConfigs/t"].description == "v1"
    assert list(at2.listeners) == ["listeners/l"] and not at2.certificates
    at4 = store.state_at(4)
    assert at4.trust_configs["trustConfigs/t"].description == "v2" and not at4.listeners and not at4.certificates
    assert store.state_at(5) is store.state()
    assert [(r.revision, r.resource is None) for r in store.revisions("listeners/l")] == [(4, True), (2, False)]
    assert store.audit()[-2].detail == "roll-out r-1 halted: wave 1 NACKed"
    with pytest.raises(StoreError, match="revision 6 does not exist"):
        store.state_at(6)
    # Bounded: MAX_REVISIONS_PER_RESOURCE per resource, however many writes; older states are refused
    # by name rather than rebuilt wrongly.
    for i in range(MAX_REVISIONS_PER_RESOURCE + 5):
        store.update(tc(f"w{i}"), actor="x")
    assert len(store.revisions("trustConfigs/t", limit=1000)) == MAX_REVISIONS_PER_RESOURCE
    with pytest.raises(HistoryTruncated, match="older than the kept history of trustConfigs/t"):
        store.state_at(3)
    assert store.state_at(store.revision() - 1).trust_configs["trustConfigs/t"].description == \
        f"w{MAX_REVISIONS_PER_RESOURCE + 3}"
    store.close()
    reopened = open_store()  # the history is durable
    assert [r.revision for r in reopened.revisions("listeners/l")] == [4, 2]
    assert reopened.state_at(reopened.revision() - 2).trust_configs["trustConfigs/t"].description == \
        f"w{MAX_REVISIONS_PER_RESOURCE + 2}"
    assert reopened.audit()[3].detail == "roll-out r-1 halted: wave 1 NACKed"


def test_node_reports_are_kept_in_order_filtered_by_node_and_aged_out(open_store) -> None:
    store = open_store()
    store.record_reports([("a", 100.0, b"r1"), ("b", 101.0, b"r2")], keep_seconds=3600)
    store.record_reports([("a", 102.0, b"r3")], keep_seconds=3600)
    assert store.reports(since=0) == [("a", 100.0, b"r1"), ("b", 101.0, b"r2"), ("a", 102.0, b"r3")]
    assert store.reports(since=0, node_ids=["a"]) == [("a", 100.0, b"r1"), ("a", 102.0, b"r3")]
    assert store.reports(since=101.0, node_ids=["a", "c"]) == [("a", 102.0, b"r3")]
    store.record_reports([("c", 200.0, b"r4")], keep_seconds=99.5)  # everything before 100.5 ages out
    assert store.reports(since=0) == [("b", 101.0, b"r2"), ("a", 102.0, b"r3"), ("c", 200.0, b"r4")]
    assert store.reports(since=0, node_ids=[]) == []
