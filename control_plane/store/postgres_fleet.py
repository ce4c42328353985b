"""The fleet table on PostgreSQL (SPEC §14): each replica heartbeats its row in `mtlsgate_replicas` and
upserts the statuses of the nodes it holds into `mtlsgate_fleet`; every replica reads the others' rows
incrementally (by each replica's generation). Heartbeats are stamped with the database's clock. What the
rows mean (who is alive, which view of a node to show) is decided in `control_plane.xds.replicas`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import psycopg
from psycopg_pool import ConnectionPool

from control_plane.store.base import FleetRead, FleetRow, ReplicaRow, StoreError, StoreUnavailable

_NOW = "extract(epoch from clock_timestamp())::double precision"


class PostgresFleetTable:
    shared = True

    def __init__(self, pool: ConnectionPool, describe: str) -> None:
        self._pool = pool
        self._describe = describe  # the redacted DSN, for errors

    def _failed(self, what: str, exc: psycopg.Error) -> StoreError:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, psycopg.OperationalError):
            return StoreUnavailable(f"fleet table {what}: PostgreSQL at {self._describe} cannot be reached ({text})")
        return StoreError(f"fleet table {what} failed: {text}")

    def publish(self, replica: ReplicaRow, rows: Sequence[tuple[str, bytes]],
                forget: Sequence[str] = ()) -> float:
        try:
            with self._pool.connection() as conn, conn.transaction():
                head = conn.execute(
                    f"INSERT INTO mtlsgate_replicas (id, name, started_at, heartbeat_at, generation) "
                    f"VALUES (%s, %s, %s, {_NOW}, %s) ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
                    f"heartbeat_at = excluded.heartbeat_at, stopped = false, "
                    f"generation = mtlsgate_replicas.generation + %s RETURNING generation, heartbeat_at",
                    (replica.id, replica.name, replica.started_at, 1 if rows else 0, 1 if rows else 0),
                ).fetchone()
                assert head is not None
                generation, now = int(head[0]), float(head[1])
                if rows:
                    with conn.cursor() as cursor:
                        cursor.executemany(
                            "INSERT INTO mtlsgate_fleet (replica, node_id, seq, status) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (replica, node_id) DO UPDATE SET seq = excluded.seq, "
                            "status = excluded.status",
                            [(replica.id, node_id, generation, status) for node_id, status in rows])
                if forget:
                    conn.execute("DELETE FROM mtlsgate_replicas WHERE id = ANY(%s) AND id <> %s",
                                 (list(forget), replica.id))
                return now
        except psycopg.Error as exc:
            raise self._failed("heartbeat", exc) from None

    def read(self, local_replica: str, after: Mapping[str, int], max_rows: int) -> FleetRead:
        try:
            with self._pool.connection() as conn, conn.transaction():
                # One snapshot: the generations read are exactly those of the rows returned.
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                now_row = conn.execute(f"SELECT {_NOW}").fetchone()
                assert now_row is not None
                replicas = tuple(
                    ReplicaRow(r[0], r[1], float(r[2]), float(r[3]), bool(r[4]), int(r[5]))
                    for r in conn.execute("SELECT id, name, started_at, heartbeat_at, stopped, generation "
                                          "FROM mtlsgate_replicas ORDER BY id LIMIT %s", (max_rows,)))
                wanted = {r.id: after.get(r.id, 0) for r in replicas
                          if r.id != local_replica and r.generation > after.get(r.id, 0)}
                rows: tuple[FleetRow, ...] = ()
                if wanted:
                    ids, since = list(wanted), [wanted[i] for i in wanted]
                    rows = tuple(FleetRow(r[0], r[1], int(r[2]), bytes(r[3])) for r in conn.execute(
                        "SELECT f.replica, f.node_id, f.seq, f.status FROM mtlsgate_fleet f "
                        "JOIN unnest(%s::text[], %s::bigint[]) AS w(replica, after) "
                        "ON f.replica = w.replica AND f.seq > w.after ORDER BY f.replica COLLATE \"C\", f.seq LIMIT %s",
                        (ids, since, max_rows)))
                generations = {r.id: r.generation for r in replicas if r.id in wanted}
                if len(rows) >= max_rows:  # cut short: claim only what was read in full
                    last = rows[-1]
                    order = sorted(wanted)
                    generations = {i: generations[i] for i in order[:order.index(last.replica)]}
                    generations[last.replica] = last.seq - 1
                return FleetRead(float(now_row[0]), replicas, rows, generations)
        except psycopg.Error as exc:
            raise self._failed("read", exc) from None

    def retire(self, replica_id: str) -> None:
        try:
            with self._pool.connection() as conn:
                conn.execute("UPDATE mtlsgate_replicas SET stopped = true WHERE id = %s", (replica_id,))
        except psycopg.Error as exc:
            raise self._failed("retire", exc) from None
