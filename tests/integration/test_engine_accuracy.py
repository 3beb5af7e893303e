"""Engine accuracy: each bucket of the attribution model against an independent source.

See /work/shared/attribution-model.md. Every check compares what the BPF engine reports
(`run_attach` -> frame/summary) with something the engine does not see: pgbench's own
transaction count and latency log, /proc/<pid>/schedstat, pg_stat_wal, pg_stat_database,
pg_wait_sampling, libpq's protocol trace, a lock held or a sleep of known length.

Attaching and detaching cost seconds, so the workloads share three traces (module fixtures):

- ``bench``: a private WAL-quiet cluster (no walwriter flushes, no checkpoints, no
  autovacuum, wal_level=minimal) where every WAL flush is a backend's commit: pgbench
  single-row inserts at 1, 8 and 40 clients, then WAL segment switches. Each phase has
  its own pg_stat_wal snapshots and its own pgbench backends (selected by pid).
- ``scenarios``: the shared test cluster: a lock held 500 ms, pg_sleep(0.2), literal
  variants of statements, psycopg and pgbench in every protocol mode, and a CPU-bound
  query beside CPU hogs (one per CPU). Traced with query_text=True.
- ``cold``: a private cluster with shared_buffers=16MB and a 200 MB table read cold.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pandas as pd
import psycopg
import pytest
from psycopg import pq

from pgtrace import attach
from pgtrace.cluster import TempCluster, start_cluster
from pgtrace.collect.frame import records_frame
from pgtrace.collect.session import TraceSession
from tests.integration.workload import (
    Pgbench,
    ProtocolTrace,
    Traced,
    cpu_hogs,
    drop_caches,
    pgbench,
    schedstat,
    traced,
    wait_for,
    wait_idle,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf]

Conn = psycopg.Connection[tuple[Any, ...]]
MS = 1_000_000
# PostgreSQL times a write or a flush around the system call; pgtrace from the syscall's
# entry to its exit. Its timer therefore holds pgtrace's interval, and the two directions
# of a comparison have different slack:
#: Over-count (pgtrace's time above PostgreSQL's), per write: only PostgreSQL's rounding.
#: Up to 16, pg_stat_wal and pg_stat_database add each duration truncated to whole
#: microseconds (INSTR_TIME_GET_MICROSEC), losing < 1 us a write; pg_stat_io keeps
#: nanoseconds. pgtrace's time may not exceed theirs by more than that. Measured on
#: 2026-12-05 (the tests print "PostgreSQL's time ... us a write above pgtrace's"): WAL
#: writes +0.04/+0.49 us (15, 1 and 8 clients), +0.51/+3.47 (17), +0.84/+1.17 (18); dirty
#: buffer writes +0.19 (15), +0.86 (17); extensions and writes +0.51-0.70 (17); under a
#: load average of ~10, up to +13 us. Never below pgtrace's: no over-count was seen, and
#: one of 1 us a write fails this bound.
TRUNC_US = 1.0
#: Under-count (PostgreSQL's time above pgtrace's), per write: the syscall entry and exit
#: and the user-space steps inside PostgreSQL's timer but outside pgtrace's programs
#: (0.45-0.7 us measured on the 2026-11 VM; 1.2 us on the 2026-12 one, where a bare system
#: call takes ~200 ns; 0.04-1.17 us on 2026-12-05 on a quiet machine, see TRUNC_US). The
#: bounds that use it also add the requests' run-queue (and cpu) time, where the rest of a
#: busy machine's excess goes.
WRITE_GAP_US = 2.0
#: Per WAL flush, the same under-count gap: the user-space part of issue_xlog_fsync and
#: the syscall entry and exit around fdatasync (~0.2 us measured on the 2026-11 VM; 1.3-1.4
#: us on the 2026-12 one, with the code of either date). Under 2% of a flush on both. The
#: over-count direction has no slack: `fsync` (run-queue waits excluded) <= wal_sync_time.
SYNC_USER_US = 2.0

INSERT = "insert into t(data) values(1);"

#: Every WAL flush is done by the committing backend, inside its request: no walwriter
#: flushes (delay 10 s, sync commit), no checkpoints, no autovacuum, no standby snapshots
#: (wal_level=minimal: the bgwriter logs none, so the walwriter has nothing to flush).
QUIET_WAL = {
    "wal_writer_delay": "10s",
    "wal_writer_flush_after": "1GB",
    "synchronous_commit": "on",
    "autovacuum": "off",
    "checkpoint_timeout": "1h",
    "max_wal_size": "4GB",
    "wal_level": "minimal",
    "max_wal_senders": "0",
}


def connect(dsn: str, **kw: Any) -> Conn:
    return psycopg.connect(dsn, autocommit=True, **kw)


def one(conn: Conn, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def per_op_us(ms: float, n: int) -> float:
    """A difference in ms, per operation, in us."""
    return ms * 1000 / n if n else float("nan")


def pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f}%" if b else "n/a"


def pid_rows(frame: pd.DataFrame, pids: set[int] | list[int]) -> pd.DataFrame:
    """The requests of these backends, in time order."""
    sel = frame[frame["pid"].isin(list(pids))]
    return sel.sort_values("t_start").reset_index(drop=True)


def window_pids(frame: pd.DataFrame, t0: int, t1: int, exclude: set[int]) -> set[int]:
    """Backends with requests starting inside [t0, t1], minus our own control sessions."""
    sel = frame[(frame["t_start"] >= t0) & (frame["t_start"] <= t1)]
    return {int(p) for p in sel["pid"].unique()} - exclude


# === the bench trace: pgbench on a WAL-quiet private cluster ==================================


@dataclass
class Phase:
    name: str
    clients: int
    t0: int
    t1: int
    wal0: dict[str, Any]
    wal1: dict[str, Any]
    bench: Pgbench | None = None
    pids: set[int] = field(default_factory=set)
    frame: pd.DataFrame = field(default_factory=pd.DataFrame)
    extra: dict[str, Any] = field(default_factory=dict)

    def wal_delta(self, key: str) -> float:
        return float(self.wal1[key]) - float(self.wal0[key])


@dataclass
class BenchRun:
    trace: Traced[dict[str, Phase]]
    phases: dict[str, Phase]
    conversions: int = 0  # record batches turned into frames while tracing


def wal_stats(conn: Conn) -> dict[str, Any]:
    if conn.info.server_version >= 180000:  # WAL I/O moved from pg_stat_wal to pg_stat_io
        cur = conn.execute(
            "select sum(fsyncs) as wal_sync, sum(fsync_time) as wal_sync_time,"
            " sum(writes) as wal_write, sum(write_time) as wal_write_time,"
            " pg_walfile_name(pg_current_wal_lsn()) as segment from pg_stat_io"
            " where object = 'wal' and context = 'normal'"
        )
    else:
        cur = conn.execute(
            "select wal_sync, wal_sync_time, wal_write, wal_write_time,"
            " pg_walfile_name(pg_current_wal_lsn()) as segment from pg_stat_wal"
        )
    row = cur.fetchone()
    assert row is not None and cur.description is not None
    return {d.name: v for d, v in zip(cur.description, row, strict=True)}


def fresh_segment(conn: Conn) -> None:
    """Switch to a new WAL segment and create it now, outside any measured window."""
    conn.execute("select pg_switch_wal()")
    conn.execute("insert into t(data) values(0)")


@pytest.fixture(scope="module")
def quiet_cluster() -> Iterator[TempCluster]:
    c = start_cluster(settings=QUIET_WAL)
    try:
        with connect(c.dsn) as conn:
            conn.execute("create table t(id bigint generated always as identity, data int)")
            conn.execute("create extension pg_wait_sampling")
        yield c
    finally:
        c.stop()


def flush_stats(conn: Conn) -> None:
    """This backend's pending statistics reach shared memory before it answers."""
    conn.execute("select pg_stat_force_next_flush()")


def others_gone(conn: Conn) -> None:
    """Wait until every other client backend has exited, its last statistics flushed
    (a backend flushes them before it leaves pg_stat_activity; pgbench does not wait)."""
    wait_for(
        lambda: one(conn, "select count(*) from pg_stat_activity where backend_type ="
                          " 'client backend' and pid <> pg_backend_pid()") == 0,
        30, "the pgbench backends to exit",
    )


@pytest.fixture(scope="module")
def bench(quiet_cluster: TempCluster) -> BenchRun:
    c = quiet_cluster

    def work(session: TraceSession) -> dict[str, Phase]:
        phases: dict[str, Phase] = {}
        with connect(c.dsn) as ctl:
            ctl_pid = ctl.info.backend_pid

            def phase(name: str, clients: int, seconds: int) -> Phase:
                lost0 = session.counters()["lost"]
                w0 = wal_stats(ctl)
                t0 = time.monotonic_ns()
                b = pgbench(c, INSERT, clients=clients, seconds=seconds)
                t1 = time.monotonic_ns()
                others_gone(ctl)
                p = Phase(name, clients, t0, t1, w0, wal_stats(ctl), bench=b,
                          extra={"ctl": ctl_pid})
                p.extra["lost"] = session.counters()["lost"] - lost0
                return p

            for name, clients in (("1c", 1), ("8c", 8)):
                fresh_segment(ctl)  # 16 MB of room: no segment is created inside the phase
                flush_stats(ctl)  # ctl's own syncs are counted now, not inside the phase
                phases[name] = phase(name, clients, 3)

            ctl.execute("select pg_wait_sampling_reset_profile()")
            phases["40c"] = phase("40c", 40, 5)
            phases["40c"].extra["profile"] = ctl.execute(
                "select pid, event, count from pg_wait_sampling_profile"
                " where event_type = 'LWLock'"
            ).fetchall()

            # WAL segment switches: each new segment is created (zero-filled and synced)
            # by the backend whose commit first writes into it.
            with connect(c.dsn) as seg:
                flush_stats(ctl)
                w0 = wal_stats(ctl)
                t0 = time.monotonic_ns()
                for _ in range(3):
                    seg.execute("select pg_switch_wal()")
                    seg.execute("insert into t(data) values(2)")
                t1 = time.monotonic_ns()
                flush_stats(seg)
                phases["segments"] = Phase("segments", 1, t0, t1, w0, wal_stats(ctl),
                                           pids={seg.info.backend_pid})
        return phases

    # a small spool: the records are turned into frames in many batches while tracing,
    # as on a long run, and every test below checks the batches add up
    conversions = 0
    convert = records_frame

    def counted(*args: Any, **kw: Any) -> pd.DataFrame:
        nonlocal conversions
        conversions += 1
        return convert(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attach, "SPOOL_RECORDS", 2_000)
        mp.setattr(attach, "records_frame", counted)
        tr = traced(c.postmaster_pid, work)
    frame = tr.run.frame
    for p in tr.value.values():
        if not p.pids:
            p.pids = window_pids(frame, p.t0, p.t1, {p.extra["ctl"]})
        p.frame = pid_rows(frame, p.pids)
    return BenchRun(tr, tr.value, conversions)


def test_records_converted_in_batches(bench: BenchRun) -> None:
    """The spool path ran: more than one batch, and (tests below) nothing lost between."""
    n = len(bench.trace.run.frame)
    assert n > 10_000 and bench.conversions > 3, (bench.conversions, n)
    assert not bench.trace.run.frame.duplicated(["pid", "seq"]).any()


# --- 1. buckets sum to server time ----------------------------------------------------------


@pytest.mark.parametrize("phase", ["1c", "40c"])
def test_buckets_sum_to_server_time(bench: BenchRun, phase: str) -> None:
    p = bench.phases[phase]
    df = p.frame
    assert len(df) > 0, f"no requests traced in phase {phase}"
    buckets = {b: int(df[b].sum()) for b in ("cpu", "runqueue", "fsync", "wal_write", "lwlock",
                                              "lock", "io_read", "io_write", "other_wait",
                                              "unexplained")}
    server = int(df["server_ns"].sum())
    shown = json.dumps({k: round(v / MS, 3) for k, v in buckets.items()})
    print(f"{phase}: {len(df)} requests, server {server / MS:.1f} ms, buckets (ms) {shown}")
    assert sum(buckets.values()) == server, (
        f"{phase}: buckets sum to {sum(buckets.values())} ns, server time is {server} ns "
        f"(ms: {shown})"
    )
    assert abs(buckets["unexplained"]) <= 0.01 * server, (
        f"{phase}: unexplained {buckets['unexplained'] / MS:.3f} ms is more than 1% of "
        f"server time {server / MS:.3f} ms (ms: {shown})"
    )
    # the summary's totals are the frame's (whole trace): they must add up too
    s = bench.trace.run.summary
    assert sum(s["buckets_ns"].values()) == s["server_ns"]["sum"], s["buckets_ns"]
    open_ctx = int((df["depth_at_end"] != 0).sum())
    assert open_ctx == 0, f"{phase}: {open_ctx} requests ended with a wait context still open"


# --- 2. every request counted -----------------------------------------------------------------


@pytest.mark.parametrize("phase", ["1c", "40c"])
def test_every_request_counted(bench: BenchRun, phase: str) -> None:
    p = bench.phases[phase]
    assert p.bench is not None
    seen, processed = len(p.frame), p.bench.processed
    assert p.bench.failed == 0, p.bench.output
    assert len(p.pids) == p.clients, (
        f"{phase}: requests from {len(p.pids)} backends, pgbench ran {p.clients} clients"
    )
    assert abs(seen - processed) <= p.clients, (
        f"{phase}: pgtrace saw {seen} requests from the pgbench backends, pgbench processed "
        f"{processed} transactions (difference {seen - processed}, allowed ±{p.clients})"
    )
    assert (p.frame["server_ns"] > 0).all()
    print(f"{phase}: pgtrace {seen} requests, pgbench {processed} transactions")


@pytest.mark.parametrize("phase", ["1c", "40c"])
def test_no_record_lost(bench: BenchRun, phase: str) -> None:
    p = bench.phases[phase]
    lost = p.extra["lost"]
    assert lost == 0, (
        f"{phase}: {lost} request records lost (bpf_ringbuf_output failed) with {p.clients} "
        f"clients "
        f"({bench.trace.run.summary['lost']} in the whole trace)"
    )


# --- 4. fsync agrees with pg_stat_wal.wal_sync_time -------------------------------------------


def flush_wall_ms(df: pd.DataFrame) -> float:
    """Wall time inside the WAL flush syscalls: `fsync` plus the run-queue waits that
    interrupted it (the model puts those in `runqueue`; `runqueue:fsync` keeps them
    apart), i.e. the same interval PostgreSQL's wal_sync_time times."""
    return float(df["fsync"].sum() + df["runqueue:fsync"].sum()) / MS


def fsync_numbers(p: Phase) -> tuple[float, float, int, int, float, str]:
    df = p.frame
    assert p.wal0["segment"] == p.wal1["segment"], (
        f"{p.name}: WAL moved from {p.wal0['segment']} to {p.wal1['segment']} inside the phase"
    )
    fsync_ms = df["fsync"].sum() / MS
    sync_ms = p.wal_delta("wal_sync_time")
    n_fsync, n_sync = int(df["n_fsync"].sum()), int(p.wal_delta("wal_sync"))
    synced = df[df["n_fsync"] > 0]
    # PostgreSQL's timer also covers the user-space part of issue_xlog_fsync and the
    # syscall entry/exit around fdatasync: SYNC_USER_US per sync.
    upper_ms = (synced["fsync"].sum() + synced["runqueue"].sum()) / MS + int(
        synced["n_fsync"].sum()
    ) * SYNC_USER_US / 1000
    detail = (
        f"{p.name}: pgtrace fsync {fsync_ms:.1f} ms vs pg_stat_wal.wal_sync_time "
        f"{sync_ms:.1f} ms ({pct(fsync_ms, sync_ms)}, ratio {fsync_ms / sync_ms:.3f}); "
        f"syncs: pgtrace {n_fsync}, pg_stat_wal {n_sync}; fsync + all runqueue of the "
        f"syncing requests {upper_ms:.1f} ms ({pct(upper_ms, sync_ms)}); fsync + "
        f"runqueue:fsync {flush_wall_ms(df):.1f} ms ({pct(flush_wall_ms(df), sync_ms)}); "
        f"mean fsync "
        f"{fsync_ms / max(n_fsync, 1) * 1000:.0f} us, mean runqueue of a syncing request "
        f"{synced['runqueue'].mean() / 1000:.1f} us"
    )
    print(detail)
    assert n_sync > 100, f"only {n_sync} WAL syncs: not a WAL-flush workload; {detail}"
    return fsync_ms, sync_ms, n_fsync, n_sync, upper_ms, detail


@pytest.mark.parametrize("phase", ["1c", "8c"])
def test_fsync_matches_wal_sync_time(bench: BenchRun, phase: str) -> None:
    """On the WAL-quiet cluster every WAL flush is the committing backend's, inside its
    request. wal_sync_time is the wall time PostgreSQL measures around issue_xlog_fsync;
    `fsync` is the time inside fdatasync minus run-queue waits (among them the wait for
    a CPU after the I/O completes), which pgtrace keeps as `runqueue:fsync`. Their sum
    must agree with wal_sync_time within 10%, and `fsync` alone may not exceed it."""
    fsync_ms, sync_ms, _n, _m, _upper, detail = fsync_numbers(bench.phases[phase])
    wall_ms = flush_wall_ms(bench.phases[phase].frame)
    assert abs(wall_ms - sync_ms) <= 0.10 * sync_ms, detail
    assert fsync_ms <= sync_ms, detail


@pytest.mark.parametrize("phase", ["1c", "8c"])
def test_fsync_bounded_by_wal_sync_time(bench: BenchRun, phase: str) -> None:
    """Whatever the CPU pressure: the same flushes are counted, and wal_sync_time (wall
    time) lies between `fsync` (run-queue waits excluded) and `fsync` plus every run-queue
    wait of the requests that synced."""
    fsync_ms, sync_ms, n_fsync, n_sync, upper_ms, detail = fsync_numbers(bench.phases[phase])
    assert n_fsync == n_sync, detail
    assert fsync_ms <= sync_ms <= upper_ms, detail


@pytest.mark.parametrize("phase", ["1c", "8c"])
def test_wal_write_bounded_by_wal_write_time(bench: BenchRun, phase: str) -> None:
    """With the WAL writer held off and no segment created in the phase, every WAL write
    is a committing backend's, inside its request: the same writes, and the time inside
    them bounded by pg_stat_wal.wal_write_time.

    PostgreSQL adds each write's duration truncated to whole microseconds, and its timer
    also covers the syscall's entry and exit outside pgtrace's programs (0.45-0.7 us
    measured here) and any run-queue wait there. Writes are short (4-8 us), so the bounds
    are per write: wal_write + runqueue:wal_write <= wal_write_time + TRUNC_US per write
    (over-count), and wal_write_time <= that + the writing requests' other run-queue waits
    + WRITE_GAP_US per write (under-count).
    """
    p = bench.phases[phase]
    df = p.frame
    assert p.wal0["segment"] == p.wal1["segment"], f"{phase}: a segment switch in the phase"
    wall_ms = float(df["wal_write"].sum() + df["runqueue:wal_write"].sum()) / MS
    write_ms = p.wal_delta("wal_write_time")
    n_ours, n_pg = int(df["n_wal_write"].sum()), int(p.wal_delta("wal_write"))
    writing = df[df["n_wal_write"] > 0]
    upper_ms = wall_ms + float(writing["runqueue:none"].sum()) / MS + n_pg * WRITE_GAP_US / 1000
    detail = (f"{phase}: wal_write + runqueue:wal_write {wall_ms:.1f} ms vs "
              f"wal_write_time {write_ms:.1f} ms ({pct(wall_ms, write_ms)}; PostgreSQL's "
              f"time {per_op_us(write_ms - wall_ms, n_pg):+.2f} us a write above pgtrace's); "
              f"upper bound {upper_ms:.1f} ms; writes: pgtrace {n_ours}, pg_stat_wal {n_pg}")
    print(detail)
    assert n_pg > 100, f"not a WAL-writing workload: {detail}"
    assert n_ours == n_pg, detail
    assert wall_ms <= write_ms + n_pg * TRUNC_US / 1000, f"over-count: {detail}"
    assert write_ms <= upper_ms, f"under-count: {detail}"


# --- 4b. WAL segment creation is not the WAL flush --------------------------------------------


def test_wal_segment_creation_is_not_a_wal_flush(bench: BenchRun) -> None:
    """A backend that must create the next WAL segment zero-fills it and fsyncs it
    (PostgreSQL's WalInitWrite/WalInitSync waits). pg_stat_wal counts neither; the
    `fsync` bucket must hold the WAL flushes only (issue_xlog_fsync), like wal_sync_time.
    """
    p = bench.phases["segments"]
    df = p.frame
    assert p.wal0["segment"] != p.wal1["segment"]
    n_fsync, n_sync = int(df["n_fsync"].sum()), int(p.wal_delta("wal_sync"))
    fsync_ms, sync_ms = df["fsync"].sum() / MS, p.wal_delta("wal_sync_time")
    writes, pg_writes = int(df["n_wal_write"].sum()), int(p.wal_delta("wal_write"))
    detail = (
        f"3 segment switches: pgtrace counted {n_fsync} WAL syncs ({fsync_ms:.2f} ms), "
        f"pg_stat_wal {n_sync} ({sync_ms:.2f} ms); WAL writes: pgtrace {writes} "
        f"({df['wal_write'].sum() / MS:.2f} ms), pg_stat_wal {pg_writes} "
        f"({p.wal_delta('wal_write_time'):.2f} ms)"
    )
    print(detail)
    assert n_fsync == n_sync, detail
    wall_ms = flush_wall_ms(df)
    assert abs(wall_ms - sync_ms) <= 0.10 * sync_ms, (
        f"{detail}; fsync + runqueue:fsync {wall_ms:.2f} ms"
    )


# --- 8. WALWrite dominates LWLock time at 40 clients -----------------------------------------


def test_walwrite_dominates_lwlock_time(bench: BenchRun) -> None:
    p = bench.phases["40c"]
    df = p.frame
    tranches = {c.split(":", 1)[1]: int(df[c].sum()) for c in df.columns
                if c.startswith("lwlock:")}
    total = int(df["lwlock"].sum())
    assert total > 0, "no LWLock waits at 40 clients"
    top = max(tranches, key=lambda k: tranches[k])
    shares = {k: round(v / total, 3) for k, v in sorted(tranches.items(), key=lambda kv: -kv[1])}
    assert sum(tranches.values()) == total, (tranches, total)
    assert top == "WALWrite", f"largest LWLock tranche is {top}: {shares}"
    assert tranches["WALWrite"] > 0.5 * total, f"WALWrite is not > 50% of LWLock time: {shares}"

    # pg_wait_sampling, sampling the same backends every 10 ms, agrees on the largest one
    samples: dict[str, int] = {}
    for pid, event, count in p.extra["profile"]:
        if int(pid) in p.pids:
            samples[event] = samples.get(event, 0) + int(count)
    assert samples, "pg_wait_sampling saw no LWLock waits of the pgbench backends"
    n = sum(samples.values())
    sampled = {k: round(v / n, 3) for k, v in sorted(samples.items(), key=lambda kv: -kv[1])}
    print(f"LWLock shares, pgtrace (time): {shares}; pg_wait_sampling ({n} samples): {sampled}")
    assert max(samples, key=lambda k: samples[k]) == "WALWrite", (
        f"pg_wait_sampling's largest LWLock event differs: {sampled} (pgtrace: {shares})"
    )


# --- 10 (half). no query text unless asked ----------------------------------------------------


def test_query_text_absent_by_default(bench: BenchRun) -> None:
    run = bench.trace.run
    assert "query" not in run.frame.columns
    assert run.header["query_texts"] == {}
    fps = set(bench.phases["1c"].frame["fingerprint"])
    assert len(fps) == 1 and "" not in fps, f"one statement, fingerprints {fps}"


# === the scenarios trace: the shared cluster ==================================================

LOCK_HOLD_S = 0.5
SLEEP_S = 0.2
#: generate_series in the select list (ProjectSet): in FROM it would fill a tuplestore
#: that spills to a temporary file, which is not CPU time
CPU_QUERY = "select count(g) from (select generate_series(1, %s) as g) s"
PSYCOPG_N = 20
PIPELINE_N = 50
PGBENCH_N = 100

Window = tuple[int, int]


def _fetch_all(conn: Conn, sql: str) -> list[Any]:
    return conn.execute(sql).fetchall()


def timed(fn: Callable[[], Any]) -> Window:
    t0 = time.monotonic_ns()
    fn()
    return t0, time.monotonic_ns()


def lock_scenario(dsn: str) -> dict[str, Any]:
    """B's select waits for A's access exclusive lock, released 500 ms after B sent it."""
    with connect(dsn) as a, connect(dsn) as b:
        b_pid = b.info.backend_pid
        a.execute("begin")
        a.execute("lock table accuracy_lock in access exclusive mode")
        box: dict[str, Any] = {}
        sent = threading.Event()

        def blocked() -> None:
            try:
                box["t0"] = time.monotonic_ns()
                sent.set()
                b.execute("select * from accuracy_lock").fetchall()
                box["t1"] = time.monotonic_ns()
            except BaseException as exc:
                box["error"] = exc

        th = threading.Thread(target=blocked)
        th.start()
        try:
            assert sent.wait(5)
            wait_for(
                lambda: one(a, "select count(*) from pg_locks where pid = %s and not granted",
                            (b_pid,)) > 0,
                LOCK_HOLD_S * 0.8, "B to wait for the lock",
            )
            delay = box["t0"] + int(LOCK_HOLD_S * 1e9) - time.monotonic_ns()
            time.sleep(max(delay, 0) / 1e9)
            released = time.monotonic_ns()
            a.execute("commit")
        finally:
            th.join(10)
        if "error" in box:
            raise box["error"]
        return {"pid": b_pid, "sent": box["t0"], "done": box["t1"], "released": released}


def cpu_scenario(dsn: str) -> dict[str, Any]:
    """A CPU-bound query while one hog per CPU keeps every CPU busy; schedstat around it."""
    with connect(dsn) as conn:
        pid = conn.info.backend_pid
        # warm: catalogs and the code pages of this plan (page faults block: not CPU time)
        conn.execute(CPU_QUERY, (1000,)).fetchall()
        with cpu_hogs(sorted(os.sched_getaffinity(0))):
            wait_idle(pid)
            s0 = schedstat(pid)
            window = timed(lambda: conn.execute(CPU_QUERY, (20_000_000,)).fetchall())
            wait_idle(pid)
            s1 = schedstat(pid)
        return {"pid": pid, "window": window, "s0": s0, "s1": s1}


def psycopg_scenarios(dsn: str) -> dict[str, Any]:
    sql = "insert into accuracy_t(data) values (%s)"

    def record(k: Conn, tr: ProtocolTrace, calls: list[Window]) -> dict[str, Any]:
        return {"pid": k.info.backend_pid, "calls": calls, "syncs": tr.sent("Sync"),
                "queries": tr.sent("Query"), "parses": tr.sent("Parse")}

    out: dict[str, Any] = {}
    # parameterized statements (extended protocol), never prepared
    with connect(dsn, prepare_threshold=None) as k:
        with ProtocolTrace(k) as tr:
            calls = [timed(partial(k.execute, sql, (i,))) for i in range(PSYCOPG_N)]
        out["params"] = record(k, tr, calls)

    # prepared statement: the first call prepares it (Parse+Sync), then executes it
    with connect(dsn) as k:
        with ProtocolTrace(k) as tr:
            calls = [timed(partial(k.execute, sql, (i,), prepare=True))
                     for i in range(PSYCOPG_N)]
        out["prepared"] = record(k, tr, calls)

    # psycopg pipeline: statements queued, Syncs only where psycopg sends them
    with connect(dsn, prepare_threshold=None) as k:
        with ProtocolTrace(k) as tr:
            t0 = time.monotonic_ns()
            with k.pipeline():
                cur = k.cursor()
                for i in range(PIPELINE_N):
                    cur.execute(sql, (i,))
            window = (t0, time.monotonic_ns())
        out["pipeline"] = record(k, tr, [window])

    # libpq pipeline through psycopg.pq: one Sync after every statement, all in flight
    with connect(dsn) as k:
        with ProtocolTrace(k) as tr:
            pg = k.pgconn
            t0 = time.monotonic_ns()
            pg.enter_pipeline_mode()
            for i in range(PIPELINE_N):
                pg.send_query_params(b"insert into accuracy_t(data) values ($1)", [b"%d" % i])
                pg.pipeline_sync()
            synced = 0
            while synced < PIPELINE_N:
                r = pg.get_result()  # flushes what is still unsent, then waits
                if r is None:
                    continue  # the end of one statement's results
                if r.status == pq.ExecStatus.PIPELINE_SYNC:
                    synced += 1
                elif r.status != pq.ExecStatus.COMMAND_OK:
                    raise AssertionError(r.error_message.decode())
            pg.exit_pipeline_mode()
            window = (t0, time.monotonic_ns())
        out["pq_pipeline"] = record(k, tr, [window])
    return out


FINGERPRINT_SQL = [
    ("arith", "select 101 + 1 as v"),
    ("arith", "select 20202 + 1 as v"),
    ("arith", "select 3 + 1 as v"),
    ("text", "select 'abc' = 'abd' as v"),
    ("text", "select 'x' = 'a longer string' as v"),
    ("other", "select 101 - 1 as v"),
]


@dataclass
class ScenarioRun:
    trace: Traced[dict[str, Any]]

    @property
    def frame(self) -> pd.DataFrame:
        return self.trace.run.frame

    def __getitem__(self, key: str) -> Any:
        return self.trace.value[key]


@pytest.fixture(scope="module")
def scenarios(pg_cluster: Any) -> ScenarioRun:
    if not pg_cluster.postmaster_pid:
        pytest.skip("the test server's postmaster is not visible from this machine")
    dsn = pg_cluster.dsn
    with connect(dsn) as conn:
        conn.execute("drop table if exists accuracy_t, accuracy_lock")
        conn.execute("create table accuracy_t(id bigint generated always as identity, data int)")
        conn.execute("create table accuracy_lock(id int)")
        conn.execute("insert into accuracy_lock values (1), (2)")

    def work(_session: TraceSession) -> dict[str, Any]:
        out: dict[str, Any] = {"lock": lock_scenario(dsn)}
        with connect(dsn) as conn:
            out["sleep"] = {"pid": conn.info.backend_pid,
                            "window": timed(lambda: conn.execute(f"select pg_sleep({SLEEP_S})"))}
        with connect(dsn) as conn:
            out["fingerprints"] = {"pid": conn.info.backend_pid,
                                   "calls": [timed(partial(_fetch_all, conn, s))
                                             for _, s in FINGERPRINT_SQL]}
        out["psycopg"] = psycopg_scenarios(dsn)
        for mode in ("simple", "extended", "prepared"):
            t0 = time.monotonic_ns()
            b = pgbench(pg_cluster, "insert into accuracy_t(data) values(1);", clients=1,
                        transactions=PGBENCH_N, mode=mode, log=True)
            out[f"pgbench-{mode}"] = {"bench": b, "window": (t0, time.monotonic_ns())}
        out["cpu"] = cpu_scenario(dsn)
        return out

    try:
        return ScenarioRun(traced(pg_cluster.postmaster_pid, work, query_text=True))
    finally:
        with connect(dsn) as conn:
            conn.execute("drop table if exists accuracy_t, accuracy_lock")


def started_in(frame: pd.DataFrame, pid: int, window: Window) -> pd.DataFrame:
    """The requests of `pid` that started while the client waited for one call."""
    t0, t1 = window
    sel = frame[(frame["pid"] == pid) & (frame["t_start"] >= t0) & (frame["t_start"] <= t1)]
    return sel.sort_values("t_start")


def the_request(frame: pd.DataFrame, pid: int, window: Window) -> pd.Series:
    """The one request of `pid` that started inside the client's call [send, receive]."""
    sel = started_in(frame, pid, window)
    around = frame[frame["pid"] == pid][["t_start", "t_end", "server_ns"]]
    assert len(sel) == 1, (
        f"expected one request of backend {pid} starting in the client's window "
        f"{window} ({(window[1] - window[0]) / MS:.3f} ms), found {len(sel)}; its requests:"
        f"\n{around}"
    )
    return sel.iloc[0]


# --- 3. cpu and runqueue against /proc/<pid>/schedstat --------------------------------------


def test_cpu_and_runqueue_match_schedstat(scenarios: ScenarioRun) -> None:
    """schedstat is read while the backend sleeps idle, before the query is sent and after
    its answer came back: its deltas cover the request plus the wake-up that delivered it
    (the request's wakeup_ns, a run-queue wait before t_start) and a few microseconds of
    going back to sleep. The query is CPU-bound, so on-CPU time outside `cpu` is nil."""
    sc = scenarios["cpu"]
    r = the_request(scenarios.frame, sc["pid"], sc["window"])
    d_cpu = sc["s1"][0] - sc["s0"][0]
    d_wait = sc["s1"][1] - sc["s0"][1]
    cpu, runq, wake = int(r["cpu"]), int(r["runqueue"]), int(r["wakeup_ns"])
    server = int(r["server_ns"])
    others = server - cpu - runq
    detail = (
        f"request {server / MS:.1f} ms: cpu {cpu / MS:.1f} ms vs schedstat run "
        f"{d_cpu / MS:.1f} ms ({pct(cpu, d_cpu)}); runqueue {runq / MS:.1f} + wake-up "
        f"{wake / MS:.3f} ms vs schedstat wait {d_wait / MS:.1f} ms "
        f"({pct(runq + wake, d_wait)}); other buckets {others / MS:.3f} ms; "
        f"preemptions {int(r['n_ivcsw'])}, blocked {int(r['n_vcsw'])} times"
    )
    print(detail)
    assert runq > 0.2 * server, f"the hogs did not make the run queue large: {detail}"
    assert others <= 0.05 * server, f"not a CPU-bound request: {detail}"
    # the same interval: the totals agree closely, whatever the split (the other buckets
    # may be blocked time, which schedstat does not count, or on-CPU time, which it does)
    gap = (d_cpu + d_wait) - (cpu + runq + wake)
    assert -0.01 * (d_cpu + d_wait) <= gap <= 0.01 * (d_cpu + d_wait) + others, detail
    assert abs(cpu - d_cpu) <= 0.05 * d_cpu, detail
    assert abs((runq + wake) - d_wait) <= 0.05 * d_wait, detail


# --- 5. a heavyweight lock held 500 ms ----------------------------------------------------------


def test_lock_wait_shows_as_lock_relation(scenarios: ScenarioRun) -> None:
    sc = scenarios["lock"]
    r = the_request(scenarios.frame, sc["pid"], (sc["sent"], sc["done"]))
    lock_ns = int(r.get("lock:relation", 0))
    held = (sc["released"] - sc["sent"]) / MS
    detail = (
        f"lock:relation {lock_ns / MS:.1f} ms (lock bucket {int(r['lock']) / MS:.1f} ms, "
        f"server {int(r['server_ns']) / MS:.1f} ms, runqueue {int(r['runqueue']) / MS:.3f} ms); "
        f"the lock was held {held:.1f} ms after B sent its query"
    )
    print(detail)
    assert abs(lock_ns - LOCK_HOLD_S * 1e9) <= 0.10 * LOCK_HOLD_S * 1e9, detail
    assert lock_ns == int(r["lock"]), f"lock time outside lock:relation: {detail}"
    assert lock_ns <= (sc["done"] - sc["sent"]), detail


# --- 6. pg_sleep --------------------------------------------------------------------------------


def test_pg_sleep_is_other_wait(scenarios: ScenarioRun) -> None:
    sc = scenarios["sleep"]
    r = the_request(scenarios.frame, sc["pid"], sc["window"])
    other = int(r["other_wait"])
    detail = (
        f"pg_sleep({SLEEP_S}): other_wait {other / MS:.1f} ms, server "
        f"{int(r['server_ns']) / MS:.1f} ms, cpu {int(r['cpu']) / MS:.3f} ms"
    )
    print(detail)
    assert abs(other - SLEEP_S * 1e9) <= 0.10 * SLEEP_S * 1e9, detail


# --- 9. requests delimited in every protocol mode ---------------------------------------------


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_requests_delimited_pgbench(scenarios: ScenarioRun, mode: str) -> None:
    """pgbench -M simple sends Query; -M extended Parse/Bind/Describe/Execute/Sync;
    -M prepared first prepares the statement with its own round trip (PQprepare:
    Parse+Sync), then Bind/Describe/Execute/Sync per transaction."""
    sc = scenarios[f"pgbench-{mode}"]
    b: Pgbench = sc["bench"]
    assert b.processed == PGBENCH_N, b.output
    t0, t1 = sc["window"]
    pids = window_pids(scenarios.frame, t0, t1, exclude=set())
    assert len(pids) == 1, f"-M {mode}: requests from backends {pids}, expected pgbench's one"
    df = pid_rows(scenarios.frame, pids)
    expected = PGBENCH_N + (1 if mode == "prepared" else 0)
    assert len(df) == expected, (
        f"-M {mode}: {len(df)} requests for {PGBENCH_N} transactions (expected {expected})"
    )
    assert (df["server_ns"] > 0).all()
    # pgbench's per-transaction latency log (us): each transaction's request(s) fit in it
    lat_us = [int(line.split()[2]) for line in b.log_lines]
    assert len(lat_us) == PGBENCH_N
    server = list(df["server_ns"])
    if mode == "prepared":
        server = [server[0] + server[1], *server[2:]]
    # (latency is whole microseconds: the true latency is below latency + 1 us)
    too_long = [(i, s, lat) for i, (s, lat) in enumerate(zip(server, lat_us, strict=True))
                if s > lat * 1000 + 1000]
    print(f"-M {mode}: {len(df)} requests for {b.processed} transactions; server time above "
          f"pgbench's latency in {len(too_long)}")
    assert not too_long, (
        f"-M {mode}: {len(too_long)} of {PGBENCH_N} transactions: server time above pgbench's "
        f"latency (transaction, server ns, latency us): {too_long[:8]}"
    )


@pytest.mark.parametrize("case", ["params", "prepared", "pipeline", "pq_pipeline"])
def test_requests_delimited_psycopg(scenarios: ScenarioRun, case: str) -> None:
    """One request per Sync, counted by libpq's own protocol trace. Each request belongs
    to the client call during which it started; for non-pipelined calls its server time
    fits in the call's latency, and it ends before the client has the answer."""
    sc = scenarios["psycopg"][case]
    df = pid_rows(scenarios.frame, {sc["pid"]})
    syncs, queries = sc["syncs"], sc["queries"]
    statements = PSYCOPG_N if case in ("params", "prepared") else PIPELINE_N
    detail = (
        f"{case}: {statements} statements, libpq sent {syncs} Sync, {queries} Query, "
        f"{sc['parses']} Parse; pgtrace saw {len(df)} requests"
    )
    assert queries == 0, detail
    assert len(df) == syncs, detail
    if case in ("params", "pq_pipeline"):
        assert syncs == statements, detail
    elif case == "prepared":
        assert syncs == statements + 1, detail  # the Parse+Sync round trip of the first call
    assert (df["server_ns"] > 0).all(), detail
    assert (df["t_start"].iloc[1:].to_numpy() >= df["t_end"].iloc[:-1].to_numpy()).all(), (
        f"{case}: requests of one backend overlap"
    )
    calls: list[Window] = sc["calls"]
    per_call = [started_in(df, sc["pid"], w) for w in calls]
    assert sum(len(r) for r in per_call) == len(df), (
        f"{detail}; {len(df) - sum(len(r) for r in per_call)} requests started outside "
        f"every client call"
    )
    if case in ("pipeline", "pq_pipeline"):
        # autocommit: each Sync commits, and the commit's WAL flush is inside its request
        no_flush = df[(df["fsync"] <= 0) | (df["n_fsync"] < 1)]
        assert no_flush.empty, (
            f"{detail}; requests without their commit's WAL flush:\n"
            f"{no_flush[['t_start', 'server_ns', 'fsync', 'n_fsync']]}"
        )
    late = [(i, int(r["t_end"].max()) - z, int(r["runqueue"].sum()), int(r["n_ivcsw"].sum()))
            for i, ((_a, z), r) in enumerate(zip(calls, per_call, strict=True))
            if len(r) and r["t_end"].max() > z]
    print(f"{detail}; calls whose request ended after the client had the answer: {len(late)}")
    expected = {"params": [1] * len(calls), "prepared": [2] + [1] * (len(calls) - 1)}
    if case in expected:
        assert [len(r) for r in per_call] == expected[case], [len(r) for r in per_call]
        over = [(i, int(r["server_ns"].sum()), z - a) for i, ((a, z), r)
                in enumerate(zip(calls, per_call, strict=True)) if r["server_ns"].sum() > z - a]
        assert not over, (
            f"{case}: {len(over)} of {len(calls)} calls: server_ns above the client's latency "
            f"(call, server ns, client ns): {over[:8]}"
        )
    assert not late, (
        f"{case}: {len(late)} of {len(calls)} calls: the request ended after the client had "
        f"the answer (call, t_end - client receipt ns, runqueue ns, preemptions): {late[:8]}"
    )


# --- 10. fingerprints -----------------------------------------------------------------------------


def test_fingerprints_and_query_text(scenarios: ScenarioRun) -> None:
    sc = scenarios["fingerprints"]
    frame = scenarios.frame
    assert "query" in frame.columns, "query_text=True but the frame has no query column"
    rows = [the_request(frame, sc["pid"], w) for w in sc["calls"]]
    got = [(kind, sql, r["fingerprint"], r["query"]) for (kind, sql), r in
           zip(FINGERPRINT_SQL, rows, strict=True)]
    for _kind, sql, fp, text in got:
        assert fp, f"no fingerprint for {sql!r}"
        assert text == sql, f"query text {text!r}, sent {sql!r}"
    by_kind: dict[str, set[str]] = {}
    for kind, _sql, fp, _text in got:
        by_kind.setdefault(kind, set()).add(fp)
    assert all(len(v) == 1 for v in by_kind.values()), f"literal variants differ: {got}"
    assert len({next(iter(v)) for v in by_kind.values()}) == len(by_kind), (
        f"different statements share a fingerprint: {got}"
    )
    normalized = scenarios.trace.run.texts.get(next(iter(by_kind["arith"])), "")
    assert normalized and not any(x in normalized for x in ("101", "20202", "3")), normalized
    # parameterized inserts with different values: one fingerprint
    params = pid_rows(frame, {scenarios["psycopg"]["params"]["pid"]})
    assert params["fingerprint"].nunique() == 1, params["fingerprint"].unique()


# === the cold read: a private cluster with small shared buffers ===============================

BIG_PAGES = 25_600  # 200 MB: one ~650-byte row per page (fillfactor 10)


@dataclass
class ColdRun:
    trace: Traced[dict[str, Any]]


@pytest.fixture(scope="module")
def cold() -> Iterator[ColdRun]:
    c = start_cluster(settings={"shared_buffers": "16MB", "autovacuum": "off",
                                "max_parallel_workers_per_gather": "0"})
    try:
        with connect(c.dsn) as conn:
            conn.execute(
                "create unlogged table big with (fillfactor = 10) as"
                f" select g as id, repeat('x', 600) as pad from generate_series(1, {BIG_PAGES}) g"
            )
            pages = one(conn, "select pg_relation_size('big') / 8192")
            assert pages >= BIG_PAGES, pages
            # set hint bits and the visibility map now: the measured scan only reads
            conn.execute("vacuum (freeze) big")
        c.restart()  # the shutdown checkpoint writes everything; shared buffers start empty
        drop_caches()

        def work(_session: TraceSession) -> dict[str, Any]:
            with connect(c.dsn) as stats, connect(c.dsn) as reader:
                q = ("select blk_read_time, blks_read from pg_stat_database"
                     " where datname = current_database()")
                for conn in (stats, reader):  # warm catalogs, flush their stats now
                    conn.execute(q).fetchall()
                    conn.execute("select pg_stat_force_next_flush()")
                reader.execute("set max_parallel_workers_per_gather = 0")
                reader.execute("explain select count(*) from big").fetchall()
                reader.execute("select pg_stat_force_next_flush()")
                before = stats.execute(q).fetchone()
                window = timed(lambda: reader.execute("select count(*) from big").fetchall())
                reader.execute("select pg_stat_force_next_flush()")  # flushed before it answers
                after = stats.execute(q).fetchone()
                assert before is not None and after is not None
                io_method = stats.execute("select current_setting('io_method', true)").fetchone()
                return {"pid": reader.info.backend_pid, "window": window,
                        "io_method": io_method[0] if io_method else None,
                        "read_ms": float(after[0]) - float(before[0]),
                        "blocks": int(after[1]) - int(before[1])}

        yield ColdRun(traced(c.postmaster_pid, work))
    finally:
        c.stop()


# --- 7. a cold read is io_read ----------------------------------------------------------------


def test_cold_read_is_io_read(cold: ColdRun) -> None:
    sc = cold.trace.value
    r = the_request(cold.trace.run.frame, sc["pid"], sc["window"])
    io_ms, server_ms = int(r["io_read"]) / MS, int(r["server_ns"]) / MS
    # blk_read_time is wall time inside the reads: io_read plus the run-queue waits that
    # interrupted them (kept apart as runqueue:io_read), as for fsync and wal_sync_time
    wall_ms = io_ms + int(r["runqueue:io_read"]) / MS
    read_ms = sc["read_ms"]
    detail = (
        f"cold scan of {BIG_PAGES} pages: server {server_ms:.1f} ms, io_read {io_ms:.1f} ms "
        f"({io_ms / server_ms:.0%} of it), cpu {int(r['cpu']) / MS:.1f} ms, runqueue "
        f"{int(r['runqueue']) / MS:.1f} ms, io_write {int(r['io_write']) / MS:.1f} ms, "
        f"other_wait {int(r['other_wait']) / MS:.1f} ms, writes {int(r['n_write'])}; "
        f"io_read + runqueue:io_read {wall_ms:.1f} ms; "
        f"pg_stat_database.blk_read_time {read_ms:.1f} ms "
        f"({pct(wall_ms, read_ms)}); reads: pgtrace {int(r['n_read'])}, blks_read {sc['blocks']}"
    )
    print(detail)
    assert sc["blocks"] >= BIG_PAGES * 0.9, f"the scan was not cold: {detail}"
    if sc["io_method"] in (None, "sync"):
        assert int(r["n_read"]) == sc["blocks"], f"every buffer read is in the request: {detail}"
    else:
        # 18's asynchronous I/O: an I/O worker (or io_uring) reads, the backend waits for
        # some of the reads (AioIoCompletion), each up to io_combine_limit blocks
        assert 0 < int(r["n_read"]) <= sc["blocks"], f"reads waited for: {detail}"
    assert wall_ms > 0.5 * server_ms, detail
    assert io_ms <= read_ms, detail
    if sc["io_method"] in (None, "sync"):
        assert abs(wall_ms - read_ms) <= 0.10 * read_ms, detail
    else:
        # 18's timer also covers the backend's own work on the asynchronous path (staging,
        # handing the read to a worker, completing it): CPU time to pgtrace. 5-6 us a read
        # on the 2026-12 VM, 21% of blk_read_time there; so the read lies between the
        # waits and the waits plus the request's CPU time
        cpu_ms = int(r["cpu"]) / MS
        assert wall_ms <= read_ms <= wall_ms + cpu_ms, detail


# === the backend writing dirty buffers itself: io_write ===========================================

def stats_around(stats: Conn, actor: Conn, q: str,
                 fn: Callable[[], Any]) -> tuple[Window, Any, Any]:
    """(window of fn, q's row before, q's row after) with `actor`'s statistics flushed
    on both sides: fn runs on `actor`, q is read on `stats`."""
    for conn in (stats, actor):
        conn.execute(q).fetchall()  # warm catalogs, flush their stats now
        conn.execute("select pg_stat_force_next_flush()")
    before = stats.execute(q).fetchone()
    window = timed(fn)
    actor.execute("select pg_stat_force_next_flush()")
    after = stats.execute(q).fetchone()
    assert before is not None and after is not None
    return window, before, after


DIRTY_ROWS = 40_000  # ~1,300 pages of 8 kB through 1 MB of shared buffers


@pytest.fixture(scope="module")
def dirty() -> Iterator[Traced[dict[str, Any]]]:
    """A scan that must write the pages it dirties: the first read of freshly inserted rows
    sets their hint bits (the page is dirtied), and with 1 MB of shared buffers and the
    background writer off, the scanning backend writes each one out itself to make room.
    No relation extension happens inside the measured request."""
    c = start_cluster(settings={"shared_buffers": "1MB", "bgwriter_lru_maxpages": "0",
                                "autovacuum": "off", "checkpoint_timeout": "1h",
                                "max_wal_size": "4GB", "max_parallel_workers_per_gather": "0"})
    try:
        with connect(c.dsn) as conn:
            conn.execute("create table w (id int, pad text)")
            conn.execute("insert into w select g, repeat('x', 200) from generate_series(1, %s) g",
                          (DIRTY_ROWS,))

        def work(_session: TraceSession) -> dict[str, Any]:
            with connect(c.dsn) as stats, connect(c.dsn) as scanner:
                new_io = one(stats, "select count(*) from pg_class where relname = 'pg_stat_io'")
                if new_io:  # 16+: the client backends' own writes
                    q = ("select coalesce(sum(write_time), 0), coalesce(sum(writes), 0)"
                         " from pg_stat_io where backend_type = 'client backend'"
                         " and object = 'relation'")
                else:
                    q = ("select (select blk_write_time from pg_stat_database"
                         " where datname = current_database()),"
                         " (select buffers_backend from pg_stat_bgwriter)")
                window, before, after = stats_around(
                    stats, scanner, q, lambda: scanner.execute("select count(*) from w").fetchall())
                return {"pid": scanner.info.backend_pid, "window": window, "pg_stat_io": new_io,
                        "write_ms": float(after[0]) - float(before[0]),
                        "writes": int(after[1]) - int(before[1])}

        yield traced(c.postmaster_pid, work)
    finally:
        c.stop()


#: Inside PostgreSQL's write and extend timers, outside pgtrace's io_write: forwarding the
#: segment's fsync request to the checkpointer (register_dirty_segment, after mdwrite's
#: probe) under this LWLock, a wait on a busy machine (8 ms once here, 15, load ~10).
FSYNC_REQUEST_LWLOCK = "lwlock:CheckpointerComm"


def io_write_bounds(r: pd.Series, ops: int) -> tuple[float, float, float]:
    """(io_write + runqueue:io_write; what PostgreSQL's rounding may take off `ops`
    operations, the over-count slack; the upper bound of PostgreSQL's time: that wall time
    + the request's cpu, its other run-queue time and its waits to forward fsync requests
    + the gap outside pgtrace's interval per operation), all in ms."""
    wall_ms = (int(r["io_write"]) + int(r["runqueue:io_write"])) / MS
    trunc_ms = ops * TRUNC_US / 1000
    gap_ms = ops * WRITE_GAP_US / 1000
    outside = (int(r["cpu"]) + int(r["runqueue:none"]) + int(r["runqueue:lwlock"])
               + int(r.get(FSYNC_REQUEST_LWLOCK, 0)))
    return wall_ms, trunc_ms, wall_ms + outside / MS + gap_ms


def elsewhere(r: pd.Series) -> str:
    """The request's other waits, for the failure message."""
    cols = ["other_wait", "runqueue:lwlock", "runqueue:lock", "fsync", "wal_write",
            *(c for c in r.index if str(c).startswith(("lwlock:", "lock:")))]
    return ", ".join(f"{c} {int(r[c]) / MS:.2f}" for c in cols if int(r[c]))


def test_evicting_dirty_buffers_is_io_write(dirty: Traced[dict[str, Any]]) -> None:
    """The backend's own buffer writes, against the number PostgreSQL counts (pg_stat_io,
    16+; 15's buffers_backend reaches pg_stat_bgwriter only when the checkpointer reports
    it, so it lags and is not compared) and the time it measures (pg_stat_io's write_time,
    pg_stat_database.blk_write_time on 15).

    PostgreSQL's timer (around smgrwrite) holds the probes' interval (mdwrite's write)
    plus work outside it, which pgtrace counts as cpu or runqueue: the segment lookup,
    forwarding the fsync request to the checkpointer (under CheckpointerCommLock, which
    it may wait for: lwlock:CheckpointerComm), the syscall's entry and exit. And it adds
    each write truncated to whole microseconds (up to 15). So:
    io_write + runqueue:io_write <= write time + TRUNC_US per write (over-count) <= that +
    the request's cpu, other run-queue time and CheckpointerComm waits + WRITE_GAP_US per
    write (under-count).
    """
    sc = dirty.value
    r = the_request(dirty.run.frame, sc["pid"], sc["window"])
    n_ours = int(r["n_write"])
    wall_ms, trunc_ms, upper_ms = io_write_bounds(r, n_ours)
    detail = (f"scan of {DIRTY_ROWS} fresh rows: server {int(r['server_ns']) / MS:.1f} ms, "
              f"io_write {int(r['io_write']) / MS:.1f} ms, + runqueue:io_write {wall_ms:.1f} ms"
              f" vs PostgreSQL's write time {sc['write_ms']:.1f} ms "
              f"({pct(wall_ms, sc['write_ms'])}; PostgreSQL's time "
              f"{per_op_us(sc['write_ms'] - wall_ms, n_ours):+.2f} us a write above pgtrace's); "
              f"upper bound {upper_ms:.1f} ms; writes: pgtrace {n_ours}, PostgreSQL "
              f"{sc['writes']}; elsewhere (ms): {elsewhere(r)}")
    print(detail)
    assert n_ours > 500, f"the backend hardly wrote: {detail}"
    if sc["pg_stat_io"]:
        assert n_ours == sc["writes"], detail
    assert wall_ms <= sc["write_ms"] + trunc_ms, detail
    assert sc["write_ms"] <= upper_ms, detail


# === relation extension: io_write =================================================================

EXTEND_ROWS = 60_000  # ~4,500 pages of 8 kB, added by one INSERT ... SELECT


@pytest.fixture(scope="module")
def extend() -> Iterator[Traced[dict[str, Any]]]:
    """One bulk insert into an empty table: the backend extends the relation (16+:
    mdzeroextend's fallocate or pwritev of zeroes, many blocks at a time) and writes the
    filled pages out through its bulk-write ring. Both are I/O that PostgreSQL times in
    pg_stat_io (extend_time, write_time); the extensions happen outside the smgr write
    probes, so only the system calls tell pgtrace about them."""
    c = start_cluster(settings={"shared_buffers": "16MB", "bgwriter_lru_maxpages": "0",
                                "autovacuum": "off", "checkpoint_timeout": "1h",
                                "max_wal_size": "4GB"})
    try:
        with connect(c.dsn) as conn:
            conn.execute("create table e (id int, pad text)")

        def work(_session: TraceSession) -> dict[str, Any]:
            with connect(c.dsn) as stats, connect(c.dsn) as writer:
                q = ("select coalesce(sum(extend_time), 0), coalesce(sum(write_time), 0),"
                     " coalesce(sum(extends), 0), coalesce(sum(writes), 0) from pg_stat_io"
                     " where backend_type = 'client backend' and object = 'relation'")
                window, before, after = stats_around(stats, writer, q, lambda: writer.execute(
                    "insert into e select g, repeat('x', 500) from generate_series(1, %s) g",
                    (EXTEND_ROWS,)))
                return {"pid": writer.info.backend_pid, "window": window,
                        "extend_ms": float(after[0]) - float(before[0]),
                        "write_ms": float(after[1]) - float(before[1]),
                        "extends": int(after[2]) - int(before[2]),
                        "writes": int(after[3]) - int(before[3]),
                        "pages": one(writer, "select pg_relation_size('e') / 8192")}

        yield traced(c.postmaster_pid, work)
    finally:
        c.stop()


@pytest.mark.pg(">= 16")
def test_relation_extension_is_io_write(extend: Traced[dict[str, Any]]) -> None:
    """io_write holds the extensions' system calls as well as the buffer writes: against
    PostgreSQL's extend_time + write_time (timers around smgrzeroextend/smgrextend and
    smgrwrite, each truncated to whole microseconds), with the same bounds as the dirty
    buffer test. And the extensions are in io_write: it holds more than the buffer writes
    could (their time + TRUNC_US each), whenever extending takes visible time.

    Flaky before on a busy machine (17: with 2 us a write of slack in that last bound,
    -19.2% once in a full matrix; here 2 of 6 runs beside two busy loops and a dd failed
    it, wall - write_time 10-12 ms against 12 ms of slack); now the slack is the writes'
    rounding only (1985 writes: 2 ms)."""
    sc = extend.value
    r = the_request(extend.run.frame, sc["pid"], sc["window"])
    pg_ms = sc["extend_ms"] + sc["write_ms"]
    wall_ms, trunc_ms, upper_ms = io_write_bounds(r, sc["extends"] + sc["writes"])
    detail = (f"insert of {EXTEND_ROWS} rows ({sc['pages']} pages): server "
              f"{int(r['server_ns']) / MS:.1f} ms, io_write {int(r['io_write']) / MS:.1f} ms, "
              f"+ runqueue:io_write {wall_ms:.1f} ms vs PostgreSQL's extend_time "
              f"{sc['extend_ms']:.1f} ms + write_time {sc['write_ms']:.1f} ms "
              f"({pct(wall_ms, pg_ms)}); upper bound {upper_ms:.1f} ms; PostgreSQL: "
              f"{sc['extends']} pages extended, "
              f"{sc['writes']} written; pgtrace: {int(r['n_write'])} probe writes; "
              f"PostgreSQL's time {per_op_us(pg_ms - wall_ms, sc['extends'] + sc['writes']):+.2f}"
              f" us an operation above pgtrace's; elsewhere (ms): {elsewhere(r)}")
    print(detail)
    assert sc["extends"] >= EXTEND_ROWS // 20, f"the table hardly grew: {detail}"
    assert int(r["n_write"]) == sc["writes"], detail
    assert wall_ms <= pg_ms + trunc_ms, detail
    assert pg_ms <= upper_ms, detail
    # the extensions are in io_write: more than the buffer writes alone could be (their
    # time, with its rounding: the over-count bound of the writes by themselves). Measured
    # here (17, 2026-12-05): wall - write_time 9-14 ms quiet, 7-23 ms beside two busy loops
    # and a dd, against 2 ms of rounding; extend_time 13-24 ms.
    writes_alone_ms = sc["write_ms"] + sc["writes"] * TRUNC_US / 1000
    assert wall_ms > writes_alone_ms or sc["extend_ms"] < trunc_ms, (
        f"the extensions are not in io_write: {detail}")
