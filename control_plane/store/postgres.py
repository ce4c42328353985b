"""The replicated store: PostgreSQL shared by any number of control-plane replicas (SPEC §14).

Every write is one transaction that first takes the single revision row (`UPDATE … RETURNING`), so writes
from all replicas are serialised, revisions have no gaps and commit in order. Inside it the replica brings
its in-memory state up to the database, checks the etag precondition and the caller's cross-resource
check against that state, writes the resource and its audit row, and `NOTIFY`s the new revision (delivered
only on commit). Each replica keeps the whole state in memory as an immutable `StoreState` (reads never
touch the database) and follows the other replicas' writes with `LISTEN`, plus a revision poll every
`poll_interval` seconds, so a lost notification (a dropped listener connection) only delays a change.
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence

import psycopg
from google.protobuf.message import Message
from psycopg_pool import ConnectionPool

from control_plane.resource_names import kind_for_collection
from control_plane.store.base import (
    COLLECTION_FIELDS,
    MAX_REVISIONS_PER_RESOURCE,
    AuditRecord,
    PastVersion,
    ResourceRevision,
    StoreError,
    StoreState,
    StoreUnavailable,
    WriteCheck,
    WritePlan,
    WriteResult,
    copy_message,
    is_postgres_url,
    make_state,
    past_version,
    plan_create,
    plan_delete,
    plan_update,
    stamp,
    state_from_history,
    with_change,
)
from control_plane.store.postgres_fleet import PostgresFleetTable
from control_plane.store.postgres_schema import MIGRATIONS, apply_migrations, ensure_current

log = logging.getLogger(__name__)

CHANNEL = "mtlsgate_revision"
CONNECT_TIMEOUT = 5  # seconds, for every connection we open
_WAKE_INTERVAL = 0.25  # the listener checks for close() this often


def redact(dsn: str) -> str:
    """The DSN without its password, for logs and error messages."""
    if is_postgres_url(dsn):
        parts = urllib.parse.urlsplit(dsn)
        if parts.password is not None:
            host = parts.hostname or ""
            netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
            parts = parts._replace(netloc=netloc)
        query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
        return urllib.parse.urlunsplit(parts._replace(query=query))
    return re.sub(r"(?i)(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def migrate(dsn: str, migrations: Sequence[str] = MIGRATIONS) -> tuple[int, int]:
    """`mtlsgate control-plane --migrate`: apply pending migrations; returns (version before, after)."""
    with _connect(dsn, "mtlsgate-migrate") as conn:
        try:
            return apply_migrations(conn, migrations)
        except psycopg.Error as exc:
            raise StoreError(f"migrating {redact(dsn)} failed: {_one_line(exc)}") from None


def _connect(dsn: str, application_name: str) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                               application_name=application_name)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to PostgreSQL at {redact(dsn)}: {_one_line(exc)}") from None


_CHANGES = """
SELECT a.revision, a.time, a.resource_name, r.collection, r.data
FROM mtlsgate_audit a LEFT JOIN mtlsgate_resources r ON r.name = a.resource_name
WHERE a.revision > %s ORDER BY a.revision
"""


def _parse(collection: str, data: bytes) -> Message:
    message = kind_for_collection(collection).message()
    message.ParseFromString(bytes(data))
    return message


class PostgresStore:
    """`Store` on PostgreSQL. Thread-safe; any number of processes may share one database."""

    def __init__(self, dsn: str, *, poll_interval: float = 1.0, pool_size: int = 4,
                 migrations: Sequence[str] = MIGRATIONS, channel: str = CHANNEL) -> None:
        self.dsn = dsn
        self.poll_interval = poll_interval
        self._channel = channel
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[int], None]] = []
        self._closed = threading.Event()
        with _connect(dsn, "mtlsgate-control-plane") as conn:
            try:
                ensure_current(conn, migrations)
            except psycopg.Error as exc:
                raise StoreError(f"cannot initialise the schema in {redact(dsn)}: {_one_line(exc)}") from None
        self._state = make_state(0, 0.0, {})
        self._pool = ConnectionPool(
            # A write waits at most CONNECT_TIMEOUT for a connection: while the database is down the API
            # answers UNAVAILABLE within clients' deadlines instead of hanging.
            dsn, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT, open=False, name="mtlsgate-store",
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT,
                    "application_name": "mtlsgate-control-plane"},
            check=ConnectionPool.check_connection,
        )
        self._pool.open(wait=True, timeout=10)
        try:
            with self._pool.connection() as conn:
                self._load(conn)
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreError(f"cannot load the store from {redact(dsn)}: {_one_line(exc)}") from None
        self._listener = threading.Thread(target=self._follow, name="mtlsgate-store-listen", daemon=True)
        self._listen_ready = threading.Event()
        self._listener.start()
        self._listen_ready.wait(CONNECT_TIMEOUT)

    def __repr__(self) -> str:
        return f"PostgresStore({redact(self.dsn)!r})"

    # ------------------------------------------------------------------ reads

    def state(self) -> StoreState:
        return self._state

    def revision(self) -> int:
        return self._state.revision

    def get(self, name: str) -> Message | None:
        found = self._state.get(name)
        return copy_message(found) if found is not None else None

    def list(self, collection: str) -> list[Message]:
        return [copy_message(m) for m in self._state.collection(collection).values()]

    def audit(self, resource_name: str = "", *, after_revision: int = 0, limit: int = 100) -> builtins.list[AuditRecord]:
        query = ("SELECT revision, time, actor, method, resource_name, etag_before, etag_after, role, detail "
                 "FROM mtlsgate_audit WHERE revision > %s")
        params: list[object] = [after_revision]
        if resource_name:
            query += " AND resource_name = %s"
            params.append(resource_name)
        query += " ORDER BY revision LIMIT %s"
        params.append(max(1, limit))
        try:
            with self._pool.connection() as conn:
                rows = conn.execute(query, params).fetchall()  # type: ignore[arg-type]
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"store unavailable: PostgreSQL at {redact(self.dsn)} cannot be reached "
                                   f"({_one_line(exc)})") from None
        except psycopg.Error as exc:
            raise StoreError(f"reading the audit log failed: {_one_line(exc)}") from None
        return [AuditRecord(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows]

    def _read(self, what: str, work: Callable[[psycopg.Connection], object]) -> object:
        try:
            with self._pool.connection() as conn:
                return work(conn)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"store unavailable: PostgreSQL at {redact(self.dsn)} cannot be reached "
                                   f"({_one_line(exc)})") from None
        except psycopg.Error as exc:
            raise StoreError(f"reading {what} failed: {_one_line(exc)}") from None

    def record_reports(self, rows: Iterable[tuple[str, float, bytes]], *, keep_seconds: float) -> None:
        """Keep node reports in one transaction and forget those older than `keep_seconds` (SPEC §12)."""
        rows = builtins.list(rows)
        newest = max((r[1] for r in rows), default=time.time())

        def work(conn: psycopg.Connection) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany("INSERT INTO mtlsgate_reports (node_id, received_at, data) VALUES (%s, %s, %s)",
                                rows)
                cur.execute("DELETE FROM mtlsgate_reports WHERE received_at < %s", (newest - keep_seconds,))

        self._read("node reports (write)", work)

    def reports(self, *, since: float = 0.0, node_ids: Iterable[str] | None = None) -> builtins.list[tuple[str, float, bytes]]:
        """Kept node reports received at or after `since`, oldest first, optionally for some nodes."""
        if node_ids is None:
            query, params = ("SELECT node_id, received_at, data FROM mtlsgate_reports WHERE received_at >= %s "
                             "ORDER BY received_at, id", (since,))
        else:
            query, params = ("SELECT node_id, received_at, data FROM mtlsgate_reports WHERE received_at >= %s "
                             "AND node_id = ANY(%s) ORDER BY received_at, id", (since, builtins.list(node_ids)))
        rows: list[tuple[object, ...]] = self._read("node reports", lambda conn: conn.execute(  # type: ignore[assignment]
            query, params).fetchall())
        return [(str(r[0]), float(r[1]), bytes(r[2])) for r in rows]  # type: ignore[arg-type]

    def revisions(self, name: str, *, limit: int = MAX_REVISIONS_PER_RESOURCE) -> builtins.list[ResourceRevision]:
        rows: list[tuple[object, ...]] = self._read("the revision history", lambda conn: conn.execute(  # type: ignore[assignment]
            "SELECT revision, collection, etag, data FROM mtlsgate_history WHERE name = %s "
            "ORDER BY revision DESC LIMIT %s", (name, max(1, limit))).fetchall())
        return [ResourceRevision(int(r[0]), name, str(r[2]), _parse(str(r[1]), r[3]) if r[3] is not None else None)  # type: ignore[call-overload, arg-type]
                for r in rows]

    def state_at(self, revision: int) -> StoreState:
        current = self._state
        if revision == current.revision:
            return current
        if not 0 <= revision < current.revision:
            raise StoreError(f"revision {revision} does not exist (the store is at {current.revision})")

        def work(conn: psycopg.Connection) -> tuple[dict[str, PastVersion], float]:
            past: dict[str, PastVersion] = {}
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                names = [r[0] for r in conn.execute(
                    "SELECT DISTINCT name FROM mtlsgate_history WHERE revision > %s AND revision <= %s",
                    (revision, current.revision))]
                for name in names:
                    collection = name.partition("/")[0]
                    row = conn.execute("SELECT data, etag_before FROM mtlsgate_history WHERE name = %s AND "
                                       "revision <= %s ORDER BY revision DESC LIMIT 1", (name, revision)).fetchone()
                    oldest = conn.execute("SELECT etag_before FROM mtlsgate_history WHERE name = %s ORDER BY "
                                          "revision LIMIT 1", (name,)).fetchone()
                    past[name] = past_version(row, oldest[0] if oldest else None,  # type: ignore[arg-type]
                                              lambda data, c=collection: _parse(c, data))
                written = conn.execute("SELECT time FROM mtlsgate_audit WHERE revision = %s", (revision,)).fetchone()
            return past, float(written[0]) if written else 0.0

        past, written_at = self._read("the revision history", work)  # type: ignore[misc]
        return state_from_history(current, revision, written_at, past)

    # ------------------------------------------------------------------ writes

    def create(self, resource: Message, *, actor: str, role: str = "",
               check: WriteCheck | None = None, detail: str = "") -> WriteResult:
        return self._write(lambda state: plan_create(state, resource), (actor, role, detail), check)

    def update(self, resource: Message, *, actor: str, role: str = "", expected_etag: str = "",
               allow_missing: bool = False, check: WriteCheck | None = None, detail: str = "") -> WriteResult:
        return self._write(lambda state: plan_update(state, resource, expected_etag, allow_missing),
                           (actor, role, detail), check)

    def delete(self, name: str, *, actor: str, role: str = "", expected_etag: str = "",
               check: WriteCheck | None = None, detail: str = "") -> WriteResult:
        return self._write(lambda state: plan_delete(state, name, expected_etag), (actor, role, detail), check)

    def _write(self, decide: Callable[[StoreState], WritePlan | WriteResult], who: tuple[str, str, str],
               check: WriteCheck | None) -> WriteResult:
        """One transaction: lock the revision row, catch up, decide against the database's state, commit."""
        with self._lock:
            unchanged: WriteResult | None = None
            start = self._state.revision
            committed = reached_commit = False
            try:
                with self._pool.connection() as conn, conn.transaction():
                    row = conn.execute("UPDATE mtlsgate_revision SET revision = revision + 1 WHERE id = 1 "
                                       "RETURNING revision").fetchone()
                    assert row is not None
                    revision = int(row[0])
                    # Holding the row lock: every revision below ours has committed, none above can.
                    self._catch_up(conn)
                    state = self._state
                    if state.revision != revision - 1:
                        raise StoreError(f"store is inconsistent: revision row says {revision - 1}, "
                                         f"the audit log {state.revision}")
                    plan = decide(state)
                    if isinstance(plan, WriteResult):
                        unchanged = plan
                        raise psycopg.Rollback()
                    now = time.time()
                    stored = stamp(plan.resource, plan.before, now) if plan.resource is not None else None
                    if check is not None:
                        check(state, stored)
                    self._insert(conn, plan, stored, revision, now, who)
                    reached_commit = True  # leaving the block commits
                committed = unchanged is None
            except psycopg.OperationalError as exc:  # connection refused/lost, pool timeout, shutdown
                during = "; it may or may not have committed" if reached_commit else "; nothing was written"
                raise StoreUnavailable(f"store unavailable: PostgreSQL at {redact(self.dsn)} cannot be reached "
                                       f"({_one_line(exc)}){during}") from None
            except psycopg.Error as exc:
                raise StoreError(f"store write failed: {_one_line(exc)}") from None
            finally:
                if not committed and self._state.revision != start:
                    self._notify(self._state.revision)  # the catch-up learnt of other replicas' writes
            if unchanged is not None:
                return unchanged
            # Committed. A notification for our own revision will arrive too; the catch-up skips it.
            if self._state.revision == revision - 1:
                self._state = with_change(self._state, revision, now, plan.name, stored)
            self._notify(revision)
            return WriteResult(copy_message(stored) if stored is not None else None,
                               copy_message(plan.before) if plan.before is not None else None, revision,
                               changed=True)

    def _insert(self, conn: psycopg.Connection, plan: WritePlan, stored: Message | None, revision: int,
                now: float, who: tuple[str, str, str]) -> None:
        etag_before = plan.before.etag if plan.before is not None else ""  # type: ignore[attr-defined]
        etag_after = stored.etag if stored is not None else ""  # type: ignore[attr-defined]
        if stored is None:
            conn.execute("DELETE FROM mtlsgate_resources WHERE name = %s", (plan.name,))
        else:
            conn.execute(
                "INSERT INTO mtlsgate_resources (name, collection, etag, revision, data) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                "collection = excluded.collection, etag = excluded.etag, revision = excluded.revision, "
                "data = excluded.data",
                (plan.name, plan.name.partition("/")[0], etag_after, revision,
                 stored.SerializeToString(deterministic=True)),
            )
        conn.execute(
            "INSERT INTO mtlsgate_audit (revision, time, actor, role, method, resource_name, etag_before, "
            "etag_after, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (revision, now, who[0], who[1], plan.method, plan.name, etag_before, etag_after, who[2]),
        )
        conn.execute(
            "INSERT INTO mtlsgate_history (name, revision, collection, etag_before, etag, data) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (plan.name, revision, plan.name.partition("/")[0], etag_before, etag_after,
             stored.SerializeToString(deterministic=True) if stored is not None else None),
        )
        conn.execute("DELETE FROM mtlsgate_history WHERE name = %s AND revision < (SELECT revision FROM "
                     "mtlsgate_history WHERE name = %s ORDER BY revision DESC LIMIT 1 OFFSET %s)",
                     (plan.name, plan.name, MAX_REVISIONS_PER_RESOURCE - 1))
        conn.execute("UPDATE mtlsgate_revision SET written_at = %s WHERE id = 1", (now,))
        conn.execute("SELECT pg_notify(%s, %s)", (self._channel, str(revision)))

    # ------------------------------------------------------------------ following other replicas

    def _catch_up(self, conn: psycopg.Connection) -> bool:
        """Apply every committed change newer than our state (one statement: one consistent snapshot).
        Returns whether anything changed. Called with the lock held, or before the store is shared."""
        with self._lock:
            state = self._state
            rows = conn.execute(_CHANGES, (state.revision,)).fetchall()
            if not rows:
                return False
            maps: dict[str, dict[str, Message]] = {c: dict(state.collection(c)) for c in COLLECTION_FIELDS}
            for _, _, name, collection, data in rows:
                for names in maps.values():
                    names.pop(name, None)
                if data is not None:
                    message = kind_for_collection(collection).message()
                    message.ParseFromString(bytes(data))
                    maps[collection][name] = message
            last = rows[-1]
            self._state = make_state(int(last[0]), float(last[1]), maps)
            return True

    def _load(self, conn: psycopg.Connection) -> None:
        """The whole state from the resources table, in one snapshot: at start-up (cost independent of
        the length of the history) and when the database is behind us (restored from a backup)."""
        with self._lock, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            head = conn.execute("SELECT revision, written_at FROM mtlsgate_revision WHERE id = 1").fetchone()
            rows = conn.execute("SELECT name, collection, data FROM mtlsgate_resources").fetchall()
            maps: dict[str, dict[str, Message]] = {c: {} for c in COLLECTION_FIELDS}
            for name, collection, data in rows:
                message = kind_for_collection(collection).message()
                message.ParseFromString(bytes(data))
                maps[collection][name] = message
            revision, written_at = (int(head[0]), float(head[1])) if head else (0, 0.0)
            self._state = make_state(revision, written_at, maps)

    def _refresh(self, conn: psycopg.Connection) -> None:
        with self._lock:
            row = conn.execute("SELECT revision FROM mtlsgate_revision WHERE id = 1").fetchone()
            if row is not None and int(row[0]) < self._state.revision:
                log.warning("the database is at revision %d, behind this replica's %d (restored from a "
                            "backup?): reloading the whole state from it", int(row[0]), self._state.revision)
                self._load(conn)
                self._notify(self._state.revision)
            elif self._catch_up(conn):
                self._notify(self._state.revision)

    def _follow(self) -> None:
        """The listener thread: LISTEN, catch up after every notification and every `poll_interval`;
        reconnect with backoff when the connection drops (and catch up then: notifications sent while
        we were away are lost)."""
        attempt = 0
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                     application_name="mtlsgate-listen") as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    self._refresh(conn)
                    self._listen_ready.set()
                    attempt = 0
                    next_poll = time.monotonic() + self.poll_interval
                    while not self._closed.is_set():
                        # Short waits, so that close() is not kept waiting for a long poll interval.
                        wait = max(0.0, min(_WAKE_INTERVAL, next_poll - time.monotonic()))
                        heard = any(True for _ in conn.notifies(timeout=wait, stop_after=1))
                        if self._closed.is_set():
                            return
                        if heard or time.monotonic() >= next_poll:
                            self._refresh(conn)
                            next_poll = time.monotonic() + self.poll_interval
            except psycopg.Error as exc:
                if self._closed.is_set():
                    return
                attempt += 1
                delay = min(5.0, 0.1 * 2 ** min(attempt, 6))
                log.warning("lost the PostgreSQL notification connection (%s); reconnecting in %.1fs",
                            _one_line(exc), delay)
                self._closed.wait(delay)
            except Exception:  # a bug must not stop this replica from following the others for good
                log.exception("store listener failed; restarting it")
                self._closed.wait(1.0)

    def _notify(self, revision: int) -> None:
        # Inside the lock: notifications stay in revision order. Callbacks must be quick and must not write.
        for callback in list(self._subscribers):
            try:
                callback(revision)
            except Exception:  # a subscriber's bug must not turn a committed write into an error
                log.exception("store subscriber %r failed for revision %d", callback, revision)

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def fleet_table(self) -> PostgresFleetTable:
        return PostgresFleetTable(self._pool, redact(self.dsn))

    def close(self) -> None:
        self._closed.set()
        self._pool.close()
        self._listener.join(_WAKE_INTERVAL + CONNECT_TIMEOUT)
