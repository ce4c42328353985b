"""Durable resource storage: the `Store` interface (base.py), SQLite for one control plane (sqlite.py) and
PostgreSQL for replicated ones (postgres.py); `open_store(db)` picks by the `--db` value."""

from control_plane.store.base import (
    AlreadyExists,
    AuditRecord,
    EtagMismatch,
    NotFound,
    Store,
    StoreError,
    StoreState,
    is_postgres_url,
)
from control_plane.store.sqlite import SqliteStore


def open_store(db: str) -> Store:
    """`postgresql://…` (or `postgres://…`): the shared PostgreSQL store; anything else: a SQLite file
    (`:memory:` for a throwaway one)."""
    if is_postgres_url(db):
        from control_plane.store.postgres import PostgresStore  # psycopg only when it is used

        return PostgresStore(db)
    return SqliteStore(db)


def describe_db(db: str) -> str:
    """`db` as it may be printed: a PostgreSQL URL loses its password."""
    if is_postgres_url(db):
        from control_plane.store.postgres import redact

        return redact(db)
    return db


__all__ = ["AlreadyExists", "AuditRecord", "EtagMismatch", "NotFound", "SqliteStore", "Store", "StoreError",
           "StoreState", "describe_db", "is_postgres_url", "open_store"]
