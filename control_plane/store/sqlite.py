"""The default store: one SQLite file (WAL journal, `synchronous=FULL`, so an acknowledged write survives
`kill -9` and power loss), or `:memory:` for tests. The whole state is also kept in memory as an immutable
`StoreState`, replaced on every write, so reads never touch the disk."""

from __future__ import annotations

import builtins
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from google.protobuf.message import Message

from control_plane.resource_names import kind_for_collection
from control_plane.store.base import (
    COLLECTION_FIELDS,
    MAX_REVISIONS_PER_RESOURCE,
    AlreadyExists,
    AuditRecord,
    EtagMismatch,
    LocalFleetTable,
    NotFound,
    PastVersion,
    ResourceRevision,
    StoreError,
    StoreState,
    WriteCheck,
    WriteResult,
    content_etag,
    copy_message,
    make_state,
    past_version,
    state_from_history,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    name TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    etag TEXT NOT NULL,
    revision INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    revision INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    method TEXT NOT NULL,
    resource_name TEXT NOT NULL,
    etag_before TEXT NOT NULL,
    etag_after TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_by_resource ON audit (resource_name, revision);
CREATE TABLE IF NOT EXISTS history (
    name TEXT NOT NULL,
    revision INTEGER NOT NULL,
    collection TEXT NOT NULL,
    etag_before TEXT NOT NULL,
    etag TEXT NOT NULL,
    data BLOB,
    PRIMARY KEY (name, revision)
);
CREATE INDEX IF NOT EXISTS history_by_revision ON history (revision);
CREATE TABLE IF NOT EXISTS reports (
    node_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_by_time ON reports (received_at);
"""

log = logging.getLogger(__name__)

# Keep the newest MAX_REVISIONS_PER_RESOURCE revisions of one resource.
_PRUNE = ("DELETE FROM history WHERE name = ? AND revision < (SELECT revision FROM history WHERE name = ? "
          "ORDER BY revision DESC LIMIT 1 OFFSET ?)")


def _parse(collection: str, data: bytes) -> Message:
    message = kind_for_collection(collection).message()
    message.ParseFromString(bytes(data))
    return message

class SqliteStore:
    """`Store` on SQLite. Thread-safe: writes are serialised by a lock, each in one IMMEDIATE transaction;
    one process should own a database file at a time."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[int], None]] = []
        self._owner_lock: int | None = None
        if self.path != ":memory:":
            self._owner_lock = _lock_owner(self.path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            if self.path != ":memory:":
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self.path}: could not enable the WAL journal (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(audit)")}
            if "role" not in columns:  # a store written before roles (SPEC §8) existed
                self._db.execute("ALTER TABLE audit ADD COLUMN role TEXT NOT NULL DEFAULT ''")
            if "detail" not in columns:  # … or before roll-outs (SPEC §12)
                self._db.execute("ALTER TABLE audit ADD COLUMN detail TEXT NOT NULL DEFAULT ''")
            if self._db.execute("SELECT 1 FROM history LIMIT 1").fetchone() is None:
                # A store from before revisions were kept: its current resources start the history
                # ('?': what came before them is unknown).
                self._db.execute("INSERT INTO history (name, revision, collection, etag_before, etag, data) "
                                 "SELECT name, revision, collection, '?', etag, data FROM resources")
        except sqlite3.Error as exc:
            self._release_owner_lock()
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._state = self._load()

    # ------------------------------------------------------------------ reads

    def _load(self) -> StoreState:
        maps: dict[str, dict[str, Message]] = {c: {} for c in COLLECTION_FIELDS}
        for name, collection, data in self._db.execute("SELECT name, collection, data FROM resources"):
            kind = kind_for_collection(collection)
            message = kind.message()
            message.ParseFromString(data)
            maps[collection][name] = message
        row = self._db.execute("SELECT revision, time FROM audit ORDER BY revision DESC LIMIT 1").fetchone()
        revision, written_at = (int(row[0]), float(row[1])) if row else (0, 0.0)
        return make_state(revision, written_at, maps)

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
                 "FROM audit WHERE revision > ?")
        params: list[object] = [after_revision]
        if resource_name:
            query += " AND resource_name = ?"
            params.append(resource_name)
        query += " ORDER BY revision LIMIT ?"
        params.append(max(1, limit))
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        return [AuditRecord(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows]

    def revisions(self, name: str, *, limit: int = MAX_REVISIONS_PER_RESOURCE) -> builtins.list[ResourceRevision]:
        with self._lock:
            rows = self._db.execute("SELECT revision, collection, etag, data FROM history WHERE name = ? "
                                    "ORDER BY revision DESC LIMIT ?", (name, max(1, limit))).fetchall()
        return [ResourceRevision(int(r[0]), name, r[2], _parse(r[1], r[3]) if r[3] is not None else None)
                for r in rows]

    def state_at(self, revision: int) -> StoreState:
        current = self._state
        if revision == current.revision:
            return current
        if not 0 <= revision < current.revision:
            raise StoreError(f"revision {revision} does not exist (the store is at {current.revision})")
        with self._lock:
            names = [r[0] for r in self._db.execute(
                "SELECT DISTINCT name FROM history WHERE revision > ? AND revision <= ?",
                (revision, current.revision))]
            past: dict[str, PastVersion] = {}
            for name in names:
                collection = name.partition("/")[0]
                row = self._db.execute("SELECT data, etag_before FROM history WHERE name = ? AND revision <= ? "
                                       "ORDER BY revision DESC LIMIT 1", (name, revision)).fetchone()
                oldest = self._db.execute("SELECT etag_before FROM history WHERE name = ? ORDER BY revision "
                                          "LIMIT 1", (name,)).fetchone()
                past[name] = past_version(row, oldest[0] if oldest else None,
                                          lambda data, c=collection: _parse(c, data))
            written = self._db.execute("SELECT time FROM audit WHERE revision = ?", (revision,)).fetchone()
        return state_from_history(current, revision, float(written[0]) if written else 0.0, past)

    # ------------------------------------------------------------------ writes

    def create(self, resource: Message, *, actor: str, role: str = "",
               check: WriteCheck | None = None, detail: str = "") -> WriteResult:
        with self._lock:
            if self._state.get(resource.name) is not None:  # type: ignore[attr-defined]
                raise AlreadyExists(f"{resource.name} already exists")  # type: ignore[attr-defined]
            return self._write("CREATE", resource.name, resource, None, (actor, role, detail), check)  # type: ignore[attr-defined]

    def update(self, resource: Message, *, actor: str, role: str = "", expected_etag: str = "",
               allow_missing: bool = False, check: WriteCheck | None = None, detail: str = "") -> WriteResult:
        name: str = resource.name  # type: ignore[attr-defined]
        with self._lock:
            before = self._state.get(name)
            if before is None:
                if not allow_missing:
                    raise NotFound(f"{name} not found")
                if expected_etag:
                    raise EtagMismatch(f"{name} does not exist, but an etag precondition was given")
                return self._write("CREATE", name, resource, None, (actor, role, detail), check)
            self._check_etag(name, before, expected_etag)
            if content_etag(resource) == before.etag:  # type: ignore[attr-defined]
                return WriteResult(copy_message(before), copy_message(before), self._state.revision, changed=False)
            return self._write("UPDATE", name, resource, before, (actor, role, detail), check)

    def delete(self, name: str, *, actor: str, role: str = "", expected_etag: str = "",
               check: WriteCheck | None = None, detail: str = "") -> WriteResult:
        with self._lock:
            before = self._state.get(name)
            if before is None:
                raise NotFound(f"{name} not found")
            self._check_etag(name, before, expected_etag)
            return self._write("DELETE", name, None, before, (actor, role, detail), check)

    @staticmethod
    def _check_etag(name: str, before: Message, expected_etag: str) -> None:
        current = before.etag  # type: ignore[attr-defined]
        if expected_etag and expected_etag != current:
            raise EtagMismatch(
                f"etag mismatch for {name}: the request carries {expected_etag!r} but the stored resource "
                f"has {current!r} (it was changed since you read it; get it again and retry)"
            )

    def _write(self, method: str, name: str, resource: Message | None, before: Message | None,
               who: tuple[str, str, str], check: WriteCheck | None) -> WriteResult:
        """Commit one write; called with the lock held."""
        state = self._state
        now = time.time()
        stored: Message | None = None
        if resource is not None:
            stored = copy_message(resource)
            stored.etag = content_etag(stored)  # type: ignore[attr-defined]
            if before is not None:
                stored.create_time.CopyFrom(before.create_time)  # type: ignore[attr-defined]
            else:
                stored.create_time.FromNanoseconds(int(now * 1e9))  # type: ignore[attr-defined]
            stored.update_time.FromNanoseconds(int(now * 1e9))  # type: ignore[attr-defined]
        if check is not None:
            check(state, stored)
        collection = name.partition("/")[0]
        revision = state.revision + 1
        etag_before = before.etag if before is not None else ""  # type: ignore[attr-defined]
        etag_after = stored.etag if stored is not None else ""  # type: ignore[attr-defined]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if stored is None:
                    self._db.execute("DELETE FROM resources WHERE name = ?", (name,))
                else:
                    self._db.execute(
                        "INSERT OR REPLACE INTO resources (name, collection, etag, revision, data) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (name, collection, etag_after, revision, stored.SerializeToString(deterministic=True)),
                    )
                self._db.execute(
                    "INSERT INTO audit (revision, time, actor, role, method, resource_name, etag_before, "
                    "etag_after, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (revision, now, who[0], who[1], method, name, etag_before, etag_after, who[2]),
                )
                self._db.execute(
                    "INSERT INTO history (name, revision, collection, etag_before, etag, data) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (name, revision, collection, etag_before, etag_after,
                     stored.SerializeToString(deterministic=True) if stored is not None else None),
                )
                self._db.execute(_PRUNE, (name, name, MAX_REVISIONS_PER_RESOURCE - 1))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc
        maps = {c: dict(state.collection(c)) for c in COLLECTION_FIELDS}
        if stored is None:
            del maps[collection][name]
        else:
            maps[collection][name] = stored
        self._state = make_state(revision, now, maps)
        result = WriteResult(copy_message(stored) if stored is not None else None,
                             copy_message(before) if before is not None else None, revision, changed=True)
        # Notify outside the lock would reorder notifications across threads; inside keeps them in
        # revision order. Callbacks must be quick and must not write.
        for callback in list(self._subscribers):
            try:
                callback(revision)
            except Exception:  # a subscriber's bug must not turn a committed write into an error
                log.exception("store subscriber %r failed for revision %d", callback, revision)
        return result

    def record_reports(self, rows: Iterable[tuple[str, float, bytes]], *, keep_seconds: float) -> None:
        """Keep node reports `(node_id, received_at, serialized NodeReport)` in one transaction, and
        forget those older than `keep_seconds` (SPEC §12)."""
        rows = builtins.list(rows)
        with self._lock:
            try:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO reports (node_id, received_at, data) VALUES (?, ?, ?)", rows)
                newest = max((r[1] for r in rows), default=time.time())
                self._db.execute("DELETE FROM reports WHERE received_at < ?", (newest - keep_seconds,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StoreError(f"keeping node reports failed: {exc}") from exc

    def reports(self, *, since: float = 0.0, node_ids: Iterable[str] | None = None) -> builtins.list[tuple[str, float, bytes]]:
        """Kept node reports received at or after `since`, oldest first, optionally for some nodes."""
        wanted = None if node_ids is None else set(node_ids)
        with self._lock:
            rows = self._db.execute("SELECT node_id, received_at, data FROM reports WHERE received_at >= ? "
                                    "ORDER BY received_at, rowid", (since,)).fetchall()
        return [(r[0], float(r[1]), bytes(r[2])) for r in rows if wanted is None or r[0] in wanted]

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def fleet_table(self) -> LocalFleetTable:
        # One process owns the file (flock): it is the only replica, its memory is the whole fleet.
        return LocalFleetTable()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._release_owner_lock()

    def _release_owner_lock(self) -> None:
        if self._owner_lock is not None:
            os.close(self._owner_lock)
            self._owner_lock = None


def _lock_owner(path: str) -> int:
    """Hold an exclusive flock on the database file for the store's lifetime: the in-memory state is only
    right if this process is the file's only writer. (flock is independent of SQLite's POSIX locks; the
    descriptor is closed only after SQLite closed the file, which keeps SQLite's locks intact.)"""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open store {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(f"store {path} is in use by another control plane process") from None
    return fd

