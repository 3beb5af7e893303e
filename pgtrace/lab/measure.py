"""Server counters read before and after a run: WAL, checkpoints, index sizes, reads, catalogs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

#: The catalogs that temporary tables bloat (seed 004).
CATALOGS = ("pg_class", "pg_attribute", "pg_type", "pg_depend")


@dataclass(frozen=True)
class Counters:
    """Cumulative server counters at one moment."""

    wal_records: int
    wal_fpi: int
    wal_bytes: int
    checkpoints: int


def counters(conn: psycopg.Connection[Any]) -> Counters:
    """pg_stat_wal and the checkpoint count (pg_stat_checkpointer from PostgreSQL 17)."""
    version = conn.info.server_version
    ckpt = ("select num_timed + num_requested from pg_stat_checkpointer" if version >= 170000
            else "select checkpoints_timed + checkpoints_req from pg_stat_bgwriter")
    row = conn.execute(f"select wal_records, wal_fpi, wal_bytes::bigint, ({ckpt})"
                       " from pg_stat_wal").fetchone()
    assert row is not None
    return Counters(*(int(v) for v in row))


def wait_backends_gone(conn: psycopg.Connection[Any], pids: list[int],
                       timeout_s: float = 10.0) -> bool:
    """Wait until these backends have exited (and so flushed their statistics)."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = conn.execute("select count(*) from pg_stat_activity where pid = any(%s)",
                           (pids,)).fetchone()
        if row is None or row[0] == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def index_bytes(conn: psycopg.Connection[Any], table: str) -> int:
    """pg_indexes_size of `table`."""
    row = conn.execute("select pg_indexes_size(%s::regclass)", (table,)).fetchone()
    return int(row[0]) if row else 0


def reindex(conn: psycopg.Connection[Any], table: str) -> None:
    """Rebuild every index of `table`."""
    conn.execute(f"reindex table {_qualified(conn, table)}")


def block_reads(conn: psycopg.Connection[Any], table: str) -> int:
    """Heap and index blocks of `table` read from outside shared buffers, so far."""
    conn.execute("select pg_stat_clear_snapshot()")
    row = conn.execute(
        "select coalesce(heap_blks_read, 0) + coalesce(idx_blks_read, 0)"
        " from pg_statio_all_tables where relid = %s::regclass", (table,)).fetchone()
    return int(row[0]) if row else 0


def catalog_bytes(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """pg_total_relation_size of each bloat-prone catalog."""
    row = conn.execute("select " + ", ".join(f"pg_total_relation_size('{c}')"
                                             for c in CATALOGS)).fetchone()
    assert row is not None
    return {c: int(v) for c, v in zip(CATALOGS, row, strict=True)}


def vacuum_catalogs(conn: psycopg.Connection[Any]) -> int:
    """VACUUM the catalogs; the dead rows it had to leave (n_dead_tup after it)."""
    for c in CATALOGS:
        conn.execute(f"vacuum {c}")
    conn.execute("select pg_stat_clear_snapshot()")
    row = conn.execute("select sum(n_dead_tup)::bigint from pg_stat_sys_tables"
                       " where relname = any(%s) and schemaname = 'pg_catalog'",
                       (list(CATALOGS),)).fetchone()
    return int(row[0] or 0) if row else 0


def _qualified(conn: psycopg.Connection[Any], table: str) -> str:
    row = conn.execute("select %s::regclass::text", (table,)).fetchone()
    assert row is not None
    return str(row[0])
