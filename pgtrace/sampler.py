"""The 1 Hz timeline beside a trace: pg_stat_wal, checkpointer counters, PSI, active backends.

Counters are cumulative as the server reports them; the report takes differences.
Without a DSN only what /proc shows is sampled (PSI).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

_ACTIVE = """(select count(*) from pg_stat_activity
         where state = 'active' and backend_type = 'client backend') as active_backends"""
#: WAL writes and syncs: pg_stat_wal up to 17, pg_stat_io (object 'wal', context 'normal':
#: not the zero-filling of new segments) from 18
_WAL_IO_14 = "w.wal_write, w.wal_sync, w.wal_write_time, w.wal_sync_time"
_WAL_IO_18 = """(select sum(writes) from pg_stat_io where object = 'wal' and context = 'normal'),
       (select sum(fsyncs) from pg_stat_io where object = 'wal' and context = 'normal'),
       (select sum(write_time) from pg_stat_io where object = 'wal' and context = 'normal'),
       (select sum(fsync_time) from pg_stat_io where object = 'wal' and context = 'normal')"""
#: checkpointer counters: pg_stat_bgwriter up to 16, pg_stat_checkpointer from 17 (the
#: backends' own buffer writes then come from pg_stat_io)
_CKPT_16 = "b.checkpoints_timed, b.checkpoints_req, b.buffers_checkpoint, b.buffers_backend"
_CKPT_17 = """c.num_timed, c.num_requested, c.buffers_written,
       (select sum(writes) from pg_stat_io where object = 'relation'
         and backend_type not in ('checkpointer', 'background writer'))"""


def server_sql(server_version_num: int) -> str:
    """The sampling query for a server (``server_version_num``, e.g. 180001): the columns of
    SERVER_COLUMNS, under their PostgreSQL 14-16 names whatever the version calls them."""
    major = server_version_num // 10000
    wal_io = _WAL_IO_18 if major >= 18 else _WAL_IO_14
    ckpt = _CKPT_17 if major >= 17 else _CKPT_16
    sources = "pg_stat_wal w, pg_stat_bgwriter b"
    if major >= 17:
        sources += ", pg_stat_checkpointer c"
    if major < 14:  # no pg_stat_wal before 14
        wal = "null, null, null, null, null, null, null"
        sources = "pg_stat_bgwriter b"
    else:
        wal = f"w.wal_records, w.wal_fpi, w.wal_bytes::bigint, {wal_io}"
    return f"select {wal},\n       {ckpt},\n       b.buffers_clean,\n       {_ACTIVE}\n" \
        f"  from {sources}"


#: The query for PostgreSQL 14-16.
SERVER_SQL = server_sql(160000)
SERVER_COLUMNS = (
    "wal_records", "wal_fpi", "wal_bytes", "wal_write", "wal_sync", "wal_write_time",
    "wal_sync_time", "checkpoints_timed", "checkpoints_req", "buffers_checkpoint",
    "buffers_backend", "buffers_clean", "active_backends",
)


#: Seconds to wait for the server when connecting for the timeline (libpq's minimum is 2).
CONNECT_TIMEOUT = 5


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, application_name="pgtrace sampler",
                           connect_timeout=CONNECT_TIMEOUT)


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def dsn_problem(dsn: str) -> str | None:
    """Why the timeline cannot sample through `dsn` (one line), or None when it can."""
    try:
        with _connect(dsn) as conn:
            conn.execute(server_sql(conn.info.server_version).encode()).fetchone()
    except psycopg.Error as exc:
        return _error_line(exc)
    return None


def psi_total_us(resource: str) -> int | None:
    """Cumulative 'some' stall time of /proc/pressure/<resource>, in microseconds."""
    try:
        with open(f"/proc/pressure/{resource}") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class Sampler:
    """Samples once per `interval` seconds in a thread until stop()."""

    def __init__(self, dsn: str | None, interval: float = 1.0) -> None:
        self.dsn = dsn
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgtrace-sampler", daemon=True)
        self._conn: psycopg.Connection[Any] | None = None
        self._sql = SERVER_SQL

    def start(self) -> None:
        """Begin sampling (the first sample is taken at once)."""
        if self.dsn is not None:
            try:
                self._conn = _connect(self.dsn)
                self._sql = server_sql(self._conn.info.server_version)
            except psycopg.Error as exc:
                self.error = _error_line(exc)
        self._thread.start()

    def stop(self) -> list[dict[str, Any]]:
        """Take a last sample, stop, and return the samples."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        return self.samples

    def _run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(self.interval):
                self.samples.append(self.sample())
                return

    def sample(self) -> dict[str, Any]:
        """One sample now: CLOCK_MONOTONIC ns, PSI totals, server counters if connected."""
        row: dict[str, Any] = {
            "t": time.monotonic_ns(),
            "psi_cpu_some_us": psi_total_us("cpu"),
            "psi_io_some_us": psi_total_us("io"),
        }
        if self._conn is not None:
            try:
                values = self._conn.execute(self._sql.encode()).fetchone()
            except psycopg.Error as exc:
                self.error = _error_line(exc)
                self._conn = None
            else:
                if values is not None:
                    row.update({k: (float(v) if v is not None else None)
                                for k, v in zip(SERVER_COLUMNS, values, strict=True)})
        return row
