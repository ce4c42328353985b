"""What only a shared database adds to the store contract: several replicas on one PostgreSQL database —
following each other's writes (NOTIFY, and the poll when a notification is lost), preconditions checked
against the database rather than a replica's possibly stale memory, one global revision, versioned schema
migrations, a database restart, and passwords kept out of messages."""

from __future__ import annotations

import threading

import psycopg
import pytest
from mtlsgate.v1 import resources_pb2

from control_plane.store import AlreadyExists, EtagMismatch, StoreError
from control_plane.store.postgres import PostgresStore, migrate, redact
from control_plane.store.postgres_schema import MIGRATIONS, SchemaError
from tests.postgres import PostgresServer, database
from tests.support import wait_until


def tc(name: str, description: str = "") -> resources_pb2.TrustConfig:
    return resources_pb2.TrustConfig(name=f"trustConfigs/{name}", description=description)


def deaf(dsn: str, *, poll_interval: float = 3600.0) -> PostgresStore:
    """A replica that never hears NOTIFY (it listens on another channel): it learns of other replicas'
    writes only from its own writes and its revision poll."""
    return PostgresStore(dsn, channel="nobody_notifies_this", poll_interval=poll_interval)


def test_a_replica_follows_another_replicas_writes(postgres_dsn: str) -> None:
    a, b = PostgresStore(postgres_dsn, poll_interval=3600), PostgresStore(postgres_dsn, poll_interval=3600)
    try:
        seen: list[int] = []
        b.subscribe(seen.append)
        a.create(tc("t", "one"), actor="alice")
        # NOTIFY alone (the poll is an hour away) brings the write to B, and B's subscribers hear of it.
        wait_until(lambda: b.revision() == 1 and seen == [1], timeout=5, message="replica B to follow")
        assert b.get("trustConfigs/t").description == "one"  # type: ignore[union-attr]
        b.delete("trustConfigs/t", actor="bob")
        wait_until(lambda: a.revision() == 2, timeout=5, message="replica A to follow")
        assert a.get("trustConfigs/t") is None
        assert [(r.revision, r.actor) for r in a.audit()] == [(1, "alice"), (2, "bob")]
    finally:
        a.close()
        b.close()


def test_preconditions_are_checked_against_the_database_not_a_stale_replica(postgres_dsn: str) -> None:
    a, b = PostgresStore(postgres_dsn), deaf(postgres_dsn)
    try:
        created = a.create(tc("t", "one"), actor="alice").resource
        assert created is not None and b.revision() == 0  # B has not heard
        with pytest.raises(AlreadyExists):
            b.create(tc("t", "two"), actor="bob")
        assert b.revision() == 1  # the refused write still brought B up to date
        a.update(tc("t", "three"), actor="alice")
        assert b.get("trustConfigs/t").description == "one"  # type: ignore[union-attr]
        with pytest.raises(EtagMismatch):  # B's copy is stale; the database's is what counts
            b.update(tc("t", "four"), actor="bob", expected_etag=created.etag)
        assert [r.revision for r in a.audit()] == [1, 2]
    finally:
        a.close()
        b.close()


def test_a_lost_notification_only_delays_the_change(postgres_dsn: str) -> None:
    a, b = PostgresStore(postgres_dsn), deaf(postgres_dsn, poll_interval=0.2)
    try:
        seen: list[int] = []
        b.subscribe(seen.append)
        a.create(tc("t"), actor="alice")
        a.create(tc("u"), actor="alice")
        wait_until(lambda: b.revision() == 2, timeout=5, message="the revision poll to bring the writes")
        assert sorted(b.state().trust_configs) == ["trustConfigs/t", "trustConfigs/u"] and seen[-1] == 2
    finally:
        a.close()
        b.close()


def test_a_dropped_listener_connection_reconnects_and_catches_up(postgres_dsn: str,
                                                                 postgres_server: PostgresServer) -> None:
    a, b = PostgresStore(postgres_dsn), PostgresStore(postgres_dsn, poll_interval=3600)
    try:
        database = postgres_dsn.rpartition("/")[2]
        with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = %s AND application_name = 'mtlsgate-listen'",
                                   (database,)).fetchone()
        assert killed == (2,)
        a.create(tc("t"), actor="alice")  # most likely while B is not listening: its NOTIFY is lost
        wait_until(lambda: b.revision() == 1, timeout=10, message="replica B to reconnect and catch up")
    finally:
        a.close()
        b.close()


def test_concurrent_writers_on_two_replicas_lose_no_update(postgres_dsn: str) -> None:
    replicas = [PostgresStore(postgres_dsn), PostgresStore(postgres_dsn)]
    try:
        replicas[0].create(tc("t", "0"), actor="x")
        wait_until(lambda: replicas[1].revision() == 1, timeout=5, message="replica 1 to follow")

        def increment(store: PostgresStore, times: int) -> None:
            for _ in range(times):
                while True:
                    current = store.get("trustConfigs/t")
                    assert current is not None
                    try:
                        store.update(tc("t", str(int(current.description) + 1)), actor="t",
                                     expected_etag=current.etag)
                        break
                    except EtagMismatch:
                        wait_until(lambda s=store, c=current: s.get("trustConfigs/t").etag != c.etag,  # type: ignore[misc, union-attr]
                                   timeout=5, message="the newer version to arrive")

        threads = [threading.Thread(target=increment, args=(replicas[i % 2], 15)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for store in replicas:
            wait_until(lambda s=store: s.revision() == 91, timeout=5, message="both replicas at revision 91")
            assert store.get("trustConfigs/t").description == "90"  # type: ignore[union-attr]
        assert [r.revision for r in replicas[1].audit(limit=1000)] == list(range(1, 92))  # no gaps, no repeats
    finally:
        for store in replicas:
            store.close()


def test_a_newer_schema_is_refused(postgres_dsn: str) -> None:
    PostgresStore(postgres_dsn).close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO mtlsgate_schema (version) VALUES (%s)", (len(MIGRATIONS) + 1,))
    latest = len(MIGRATIONS)
    with pytest.raises(SchemaError, match=rf"schema is at version {latest + 1}, newer than this mtlsgate knows "
                                          rf"\(version {latest}\)"):
        PostgresStore(postgres_dsn)
    with pytest.raises(SchemaError, match="newer than this mtlsgate knows"):
        migrate(postgres_dsn)


def test_an_older_schema_needs_migrate_and_migrate_upgrades_it(postgres_dsn: str) -> None:
    # A database made by the first release of the schema (version 1: audit without roles) …
    old = PostgresStore(postgres_dsn, migrations=MIGRATIONS[:1])
    old.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:  # … holding a write of that release
        conn.execute("UPDATE mtlsgate_revision SET revision = 1, written_at = 1")
        conn.execute("INSERT INTO mtlsgate_resources VALUES ('trustConfigs/t', 'trustConfigs', 'e', 1, %s)",
                     (tc("t", "kept").SerializeToString(),))
        conn.execute("INSERT INTO mtlsgate_audit VALUES (1, 1, 'x', 'CREATE', 'trustConfigs/t', '', 'e')")
    latest = len(MIGRATIONS)
    with pytest.raises(SchemaError, match=rf"version 1; this mtlsgate needs version {latest}: run `mtlsgate "
                                          r"control-plane --db URL --migrate`"):
        PostgresStore(postgres_dsn)
    assert migrate(postgres_dsn) == (1, latest)
    assert migrate(postgres_dsn) == (latest, latest)  # idempotent
    upgraded = PostgresStore(postgres_dsn)
    try:
        assert upgraded.get("trustConfigs/t").description == "kept"  # type: ignore[union-attr]
        upgraded.update(tc("t", "new"), actor="y", role="editor")
        assert [(r.actor, r.role) for r in upgraded.audit()] == [("x", ""), ("y", "editor")]
    finally:
        upgraded.close()


def test_replicas_starting_together_on_an_empty_database_initialise_it_once(postgres_dsn: str) -> None:
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(PostgresStore(postgres_dsn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == [] and len(stores) == 4
        with psycopg.connect(postgres_dsn) as conn:
            versions = conn.execute("SELECT version FROM mtlsgate_schema ORDER BY version").fetchall()
            assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
    finally:
        for store in stores:
            store.close()


def test_a_replica_starting_while_another_initialises_waits_instead_of_refusing(postgres_dsn: str) -> None:
    """Replica A initialises an empty database; replica B starts before A has finished. B must see either
    no schema or the whole of it, never A's half (which it would refuse as an older schema). A slow last
    migration holds A inside the window; the events order the two starts, no sleep in the test."""
    slow = (*MIGRATIONS, "SELECT pg_sleep(1)")
    a_inside = threading.Event()
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []

    def start(signal: threading.Event | None) -> None:
        try:
            if signal is not None:
                signal.set()
            stores.append(PostgresStore(postgres_dsn, migrations=slow))
        except BaseException as exc:
            errors.append(exc)

    first = threading.Thread(target=start, args=(a_inside,))
    first.start()
    a_inside.wait(10)
    wait_until(lambda: _initialising(postgres_dsn), timeout=10, message="replica A inside its initialisation")
    second = threading.Thread(target=start, args=(None,))
    second.start()
    first.join(30)
    second.join(30)
    try:
        assert errors == [] and len(stores) == 2
    finally:
        for store in stores:
            store.close()


def _initialising(dsn: str) -> bool:
    """True while a session holds the migration lock (replica A is initialising)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted").fetchone()
        return bool(row and row[0])


def test_the_password_stays_out_of_messages(postgres_server: PostgresServer) -> None:
    wrong = postgres_server.dsn().replace(postgres_server.password, "s3cret-Pa55")
    with pytest.raises(StoreError) as refused:
        PostgresStore(wrong)
    assert "password authentication failed" in str(refused.value)
    assert "s3cret-Pa55" not in str(refused.value) and ":***@" in str(refused.value)
    assert redact("postgresql://u:p%40ss@h:5/db?sslmode=require&password=x") == \
        "postgresql://u:***@h:5/db?sslmode=require&password=***"
    assert redact("host=h user=u password='a b' dbname=d") == "host=h user=u password=*** dbname=d"


def test_writes_during_a_database_restart_fail_whole_and_the_replicas_recover(postgres_server: PostgresServer) -> None:
    with database(postgres_server) as dsn:
        a, b = PostgresStore(dsn), PostgresStore(dsn, poll_interval=0.2)
        try:
            a.create(tc("t", "before"), actor="x")
            postgres_server.stop()
            with pytest.raises(StoreError):
                a.update(tc("t", "during"), actor="x")
            assert a.get("trustConfigs/t").description == "before"  # type: ignore[union-attr]
            postgres_server.restart()
            wait_until(lambda: a.update(tc("t", "after"), actor="x").changed, timeout=20,
                       message="writes to succeed again after the restart")
            wait_until(lambda: b.get("trustConfigs/t").description == "after", timeout=10,  # type: ignore[union-attr]
                       message="replica B to reconnect and follow")
            assert [(r.revision, r.method) for r in b.audit()] == [(1, "CREATE"), (2, "UPDATE")]
        finally:
            a.close()
            b.close()


def test_start_up_loads_the_state_not_the_history(postgres_dsn: str) -> None:
    """A replica starts from the resources table (one snapshot), so its start-up does not grow with the
    audit log — and a database restored to an older revision is reloaded whole by running replicas."""
    a = PostgresStore(postgres_dsn)
    a.create(tc("t", "one"), actor="x")
    a.update(tc("t", "two"), actor="x")
    a.create(tc("u"), actor="x")
    a.delete("trustConfigs/u", actor="x")
    b = PostgresStore(postgres_dsn, poll_interval=0.2)
    try:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM mtlsgate_audit")  # the history is not what start-up reads
        c = PostgresStore(postgres_dsn)
        assert c.revision() == 4 and sorted(c.state().trust_configs) == ["trustConfigs/t"]
        assert c.get("trustConfigs/t").description == "two"  # type: ignore[union-attr]
        assert c.state().written_at == pytest.approx(a.state().written_at)
        c.close()
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:  # "restored" to revision 1
            conn.execute("UPDATE mtlsgate_revision SET revision = 1")
            conn.execute("UPDATE mtlsgate_resources SET data = %s", (tc("t", "one").SerializeToString(),))
        wait_until(lambda: b.revision() == 1, timeout=5, message="replica B to reload the restored database")
        assert b.get("trustConfigs/t").description == "one"  # type: ignore[union-attr]
    finally:
        a.close()
        b.close()
