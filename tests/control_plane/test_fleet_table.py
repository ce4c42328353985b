"""The fleet table (SPEC §14): replicas of one PostgreSQL database heartbeat by the database's clock and
publish their nodes' statuses; each reads only what changed since its last read, tombstones forget a node,
a forgotten replica takes its rows with it, a read cut short claims only what it returned, and a clean stop
is visible at once. A SQLite store is one replica: nothing to share, through the same interface."""

from __future__ import annotations

import time
from pathlib import Path

from control_plane.store import SqliteStore
from control_plane.store.base import ReplicaRow
from control_plane.store.postgres import PostgresStore


def me(replica_id: str) -> ReplicaRow:
    return ReplicaRow(replica_id, f"replica-{replica_id}", time.time(), 0.0)


def test_a_sqlite_store_is_one_replica_with_nothing_to_share(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        table = store.fleet_table()
        assert not table.shared
        table.publish(me("a"), [("n1", b"x")])
        read = table.read("a", {}, 100)
        assert (read.replicas, read.rows) == ((), ()) and abs(read.now - time.time()) < 5
    finally:
        store.close()


def test_replicas_publish_heartbeats_and_read_each_others_changes_only(postgres_dsn: str) -> None:
    a, b = PostgresStore(postgres_dsn), PostgresStore(postgres_dsn)
    try:
        ta, tb = a.fleet_table(), b.fleet_table()
        assert ta.shared
        now = ta.publish(me("a"), [("n1", b"one"), ("n2", b"two")])
        assert abs(now - time.time()) < 5  # the database's clock
        tb.publish(me("b"), [])
        read = tb.read("b", {}, 100)
        assert {r.id: r.generation for r in read.replicas} == {"a": 1, "b": 0}
        assert sorted((r.replica, r.node_id, r.status) for r in read.rows) == [("a", "n1", b"one"), ("a", "n2", b"two")]
        assert read.generations == {"a": 1}  # its own rows are never read back
        # Nothing new: a heartbeat without rows does not move the generation, nothing is re-read.
        ta.publish(me("a"), [])
        quiet = tb.read("b", read.generations, 100)
        assert quiet.rows == () and quiet.generations == {}
        assert next(r.heartbeat_at for r in quiet.replicas if r.id == "a") > next(
            r.heartbeat_at for r in read.replicas if r.id == "a")
        # One change, one row; an empty status is a tombstone.
        ta.publish(me("a"), [("n2", b"")])
        change = tb.read("b", read.generations, 100)
        assert [(r.node_id, r.seq, r.status) for r in change.rows] == [("n2", 2, b"")]
        # A read cut short claims only the rows it returned in full.
        ta.publish(me("a"), [(f"m{i}", b"m") for i in range(5)])
        cut = tb.read("b", change.generations, 3)
        assert len(cut.rows) == 3 and cut.generations == {"a": 2}
        rest = tb.read("b", cut.generations, 100)
        assert len(rest.rows) == 5 and rest.generations == {"a": 3}
        # A clean stop is visible at once; forgetting a replica deletes its rows with it.
        ta.retire("a")
        assert [r.stopped for r in tb.read("b", {}, 100).replicas if r.id == "a"] == [True]
        tb.publish(me("b"), [], forget=["a", "b"])  # never itself
        gone = tb.read("b", {}, 100)
        assert [r.id for r in gone.replicas] == ["b"] and gone.rows == ()
    finally:
        a.close()
        b.close()
