"""Durable resource storage: the `Store` interface (base.py) and its SQLite implementation (sqlite.py)."""

from control_plane.store.base import (
    AlreadyExists,
    AuditRecord,
    EtagMismatch,
    NotFound,
    Store,
    StoreError,
    StoreState,
)
from control_plane.store.sqlite import SqliteStore

__all__ = ["AlreadyExists", "AuditRecord", "EtagMismatch", "NotFound", "SqliteStore", "Store", "StoreError",
           "StoreState"]
