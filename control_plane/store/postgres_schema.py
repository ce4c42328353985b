"""The PostgreSQL schema as numbered migrations, and the rules for applying them.

Migration N is the SQL that takes the schema from version N-1 to N; each runs in its own transaction
together with the row that records it, under an advisory lock, so replicas started at the same moment
never apply one twice. An empty database is initialised at start-up; an older schema is upgraded only by
`mtlsgate control-plane --db … --migrate` (a deliberate step, once, for the whole fleet of replicas); a
schema newer than this code knows is refused, since an older replica would misread it.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from control_plane.store.base import StoreError

MIGRATIONS: tuple[str, ...] = (
    # 1: resources, the audit log and the global revision (one row; writers serialise on it).
    """
    CREATE TABLE mtlsgate_revision (
        id integer PRIMARY KEY CHECK (id = 1),
        revision bigint NOT NULL,
        written_at double precision NOT NULL
    );
    INSERT INTO mtlsgate_revision (id, revision, written_at) VALUES (1, 0, 0);
    CREATE TABLE mtlsgate_resources (
        name text PRIMARY KEY,
        collection text NOT NULL,
        etag text NOT NULL,
        revision bigint NOT NULL,
        data bytea NOT NULL
    );
    CREATE TABLE mtlsgate_audit (
        revision bigint PRIMARY KEY,
        time double precision NOT NULL,
        actor text NOT NULL,
        method text NOT NULL,
        resource_name text NOT NULL,
        etag_before text NOT NULL,
        etag_after text NOT NULL
    );
    CREATE INDEX mtlsgate_audit_by_resource ON mtlsgate_audit (resource_name, revision);
    """,
    # 2: the audit log records the writer's role (SPEC §8).
    """
    ALTER TABLE mtlsgate_audit ADD COLUMN role text NOT NULL DEFAULT '';
    """,
    # 3: fleet status shared by the replicas (SPEC §14): one heartbeat row per replica, and per replica the
    # statuses of the nodes it holds (serialised mtlsgate.v1.NodeStatus; empty = forgotten).
    """
    CREATE TABLE mtlsgate_replicas (
        id text PRIMARY KEY,
        name text NOT NULL,
        started_at double precision NOT NULL,
        heartbeat_at double precision NOT NULL,
        stopped boolean NOT NULL DEFAULT false,
        generation bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE mtlsgate_fleet (
        replica text NOT NULL REFERENCES mtlsgate_replicas (id) ON DELETE CASCADE,
        node_id text NOT NULL,
        seq bigint NOT NULL,
        status bytea NOT NULL,
        PRIMARY KEY (replica, node_id)
    );
    CREATE INDEX mtlsgate_fleet_by_seq ON mtlsgate_fleet (replica, seq);
    """,
    # 4: every write keeps the resource's previous revisions (bounded; SPEC §12 roll-outs serve nodes not
    # yet reached from them), and the audit log says why for the control plane's own writes. The current
    # resources start the history ('?': what came before them is unknown).
    """
    ALTER TABLE mtlsgate_audit ADD COLUMN detail text NOT NULL DEFAULT '';
    CREATE TABLE mtlsgate_history (
        name text NOT NULL,
        revision bigint NOT NULL,
        collection text NOT NULL,
        etag_before text NOT NULL,
        etag text NOT NULL,
        data bytea,
        PRIMARY KEY (name, revision)
    );
    CREATE INDEX mtlsgate_history_by_revision ON mtlsgate_history (revision);
    INSERT INTO mtlsgate_history (name, revision, collection, etag_before, etag, data)
        SELECT name, revision, collection, '?', etag, data FROM mtlsgate_resources;
    """,
    # 5: node reports (SPEC §12), shared by the replicas and aged out by whoever writes.
    """
    CREATE TABLE mtlsgate_reports (
        id bigserial PRIMARY KEY,
        node_id text NOT NULL,
        received_at double precision NOT NULL,
        data bytea NOT NULL
    );
    CREATE INDEX mtlsgate_reports_by_time ON mtlsgate_reports (received_at);
    """,
)

# Any constant both replicas agree on; only mtlsgate's migrations take this advisory lock.
_MIGRATION_LOCK = 0x6D746C73  # "mtls"


class SchemaError(StoreError):
    """The database's schema is not the one this code runs on (the message says what to do)."""


def schema_version(conn: psycopg.Connection) -> int:
    """The applied schema version; 0 for a database mtlsgate never used."""
    exists = conn.execute("SELECT to_regclass('mtlsgate_schema') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM mtlsgate_schema").fetchone()
    return int(row[0]) if row else 0


def apply_migrations(conn: psycopg.Connection, migrations: Sequence[str] = MIGRATIONS) -> tuple[int, int]:
    """Bring the schema to the newest version; returns (version before, version after). `conn` must be in
    autocommit mode (each migration is its own transaction)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS mtlsgate_schema ("
                     "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
    before = schema_version(conn)
    refuse_newer(before, migrations)
    for version in range(before + 1, len(migrations) + 1):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            if schema_version(conn) >= version:  # another replica got there first
                continue
            conn.execute(migrations[version - 1])  # type: ignore[arg-type]
            conn.execute("INSERT INTO mtlsgate_schema (version) VALUES (%s)", (version,))
    return before, schema_version(conn)


def refuse_newer(version: int, migrations: Sequence[str]) -> None:
    if version > len(migrations):
        raise SchemaError(
            f"the database schema is at version {version}, newer than this mtlsgate knows "
            f"(version {len(migrations)}): a newer mtlsgate migrated it; run that version (refusing to "
            f"read or write a schema this code does not understand)")


def ensure_current(conn: psycopg.Connection, migrations: Sequence[str] = MIGRATIONS) -> None:
    """At start-up: initialise an empty database, accept the current schema, refuse anything else.

    The version is read under the migration lock, and an empty database gets every migration in that
    same transaction: a replica starting at the same moment waits on the lock and then sees either no
    schema or the current one, never a half-initialised one it would refuse as "older"."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        version = schema_version(conn)
        refuse_newer(version, migrations)
        if version == 0:
            conn.execute("CREATE TABLE IF NOT EXISTS mtlsgate_schema ("
                         "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            for number, migration in enumerate(migrations, start=1):
                conn.execute(migration)  # type: ignore[arg-type]
                conn.execute("INSERT INTO mtlsgate_schema (version) VALUES (%s)", (number,))
            return
    if version < len(migrations):
        raise SchemaError(
            f"the database schema is at version {version}; this mtlsgate needs version {len(migrations)}: "
            f"run `mtlsgate control-plane --db URL --migrate` once, then start the replicas")
