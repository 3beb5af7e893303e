"""The lab engine: set up, run and profile every variant, measure, put everything back.

Runner levels are the outer loop and variants the inner one, as in seed 001.
Each step that changes the cluster registers its undo first (teardown SQL,
settings, the horizon holder), so an error or Ctrl-C leaves the cluster as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from typing import Any

import psycopg

from pgtrace.capture import write_capture
from pgtrace.cluster import start_cluster
from pgtrace.collect.loader import check_root
from pgtrace.driver.options import LoadSpec
from pgtrace.driver.workloads import get_workload
from pgtrace.errors import ServerError, UsageError
from pgtrace.lab import gucs, measure
from pgtrace.lab.horizon import HorizonHolder
from pgtrace.lab.hypotheses import evaluate
from pgtrace.lab.interrupt import Interrupt
from pgtrace.lab.spec import Experiment, Variant, get_experiment
from pgtrace.lab.walthrottle import throttled_wal
from pgtrace.model import E2E_BUCKETS, REPORT_BUCKETS
from pgtrace.run import RunOptions, RunOutcome, run_profile

Row = dict[str, Any]


@dataclass
class LabOptions:
    """Which experiment, at which scale, where."""

    name: str
    scale: str = "full"              # full, quick, smoke
    dsn: str | None = None           # None: a private throwaway cluster
    out_dir: str | None = None       # captures; None: no captures
    duration: float | None = None    # override the scale's seconds per run


@dataclass
class LabProgress:
    """Where the run is: the current step and seconds of load done out of the total."""

    label: str
    done_s: float
    total_s: float


@dataclass
class LabResult:
    """Rows, evaluated hypotheses, notes and the captures written."""

    experiment: Experiment
    scale: str
    rows: list[Row]
    hypotheses: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    captures: list[str] = field(default_factory=list)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True, application_name="pgtrace lab")
    except psycopg.Error as exc:
        raise ServerError(f"cannot connect to PostgreSQL: {exc}".splitlines()[0]) from None


def run_sql(dsn: str, statements: tuple[str, ...], params: dict[str, int],
            intr: Interrupt | None = None) -> None:
    """Run each statement in its own transaction, `{name}` replaced by the scale's params.

    With `intr`, Ctrl-C cancels the statement running (a long preload) instead of
    waiting for it; teardown SQL runs without, to the end.
    """
    if not statements:
        return
    with _connect(dsn) as conn:
        for sql in statements:
            text = sql.format(**params).encode()
            try:
                if intr is None:
                    conn.execute(text)
                else:
                    intr.check()
                    intr.run(partial(conn.execute, text), tick=lambda: None,
                             on_interrupt=conn.cancel_safe)
            except psycopg.Error as exc:
                raise ServerError(f"lab SQL failed: {str(exc).splitlines()[0]}",
                                  sql.strip().splitlines()[0][:80]) from None


def _tables(exp: Experiment) -> list[str]:
    return sorted({t for v in exp.variants for t in (v.table, _workload_table(v)) if t})


def _workload_table(v: Variant) -> str | None:
    return get_workload(v.workload).table if v.workload else None


def _check_absent(dsn: str, tables: list[str]) -> None:
    """Refuse to run where a table the lab creates and drops already exists."""
    with _connect(dsn) as conn:
        there = [t for t in tables
                 if (row := conn.execute("select to_regclass(%s)", (t,)).fetchone())
                 and row[0] is not None]
    if there:
        raise UsageError(f"table {', '.join(there)} exists; the experiment creates and drops it",
                         "drop it or run on another database")


@contextlib.contextmanager
def _server(exp: Experiment, dsn: str | None, notes: list[str]) -> Iterator[str]:
    """The given server, or a private cluster (with a throttled pg_wal if the spec asks)."""
    if dsn is not None:
        if exp.cluster_settings:
            notes.append("given server: cluster settings "
                         + ", ".join(f"{k}={v}" for k, v in exp.cluster_settings.items())
                         + " not applied")
        yield dsn
        return
    with start_cluster(settings=exp.cluster_settings) as cluster:
        notes.append(f"private throwaway cluster in {cluster.base_dir} (removed afterwards)"
                     + "".join(f", {k}={v}" for k, v in exp.cluster_settings.items()))
        if not exp.wal_device:
            yield cluster.dsn
            return
        with throttled_wal(cluster, exp.wal_device) as (dev, cgroup):
            notes.append(f"pg_wal on {dev}, blkio cgroup {cgroup}, throttle "
                         + ", ".join(f"{k}={v}" for k, v in exp.wal_device.items()))
            yield cluster.dsn


def _peak_fpi_per_s(timeline: list[dict[str, Any]]) -> float | None:
    pts = [(s["t"], s["wal_fpi"]) for s in timeline if s.get("wal_fpi") is not None]
    rates = [(b[1] - a[1]) / ((b[0] - a[0]) / 1e9) for a, b in pairwise(pts)
             if b[0] > a[0]]
    return max(rates) if rates else None


def tps_trend(t_recv: list[int]) -> float | None:
    """Requests finished in the last third of the run over those in the first third."""
    if len(t_recv) < 3:
        return None
    lo, hi = min(t_recv), max(t_recv)
    third = (hi - lo) / 3
    first = sum(1 for t in t_recv if t < lo + third)
    last = sum(1 for t in t_recv if t >= hi - third)
    return last / first if first else None


def _row(v: Variant, runners: int, out: RunOutcome) -> Row:
    s = out.summary  # the server buckets of the driver's requests, as in the capture
    buckets = {b: int(s["buckets_ns"][b]) for b in REPORT_BUCKETS}
    buckets.update({f"lwlock:{k}": int(n) for k, n in s["lwlock_ns"].items()})
    buckets.update({f"lock:{k}": int(n) for k, n in s["lock_ns"].items()})
    row: Row = {"variant": v.name, "runners": runners, "requests": int(s["requests"]),
                "tps": float(s["tps"])}
    row["rows_per_s"] = float(s["tps"]) * v.batch_rows
    row["latency_ms_mean"] = s["client_ns"]["mean"] / 1e6
    row["latency_ms_p99"] = s["client_ns"]["p99"] / 1e6
    row["buckets_ns"] = buckets
    row["e2e_ns"] = {k: int(n) for k, n in s.get("e2e_buckets_ns", {}).items()}
    return row


@dataclass(frozen=True)
class _Before:
    """Counters taken just before a run."""

    counters: measure.Counters
    reads: int | None
    catalogs: int | None


class _Engine:
    """One experiment run: its options, server, progress and the undo stack of each step."""

    def __init__(self, exp: Experiment, opts: LabOptions, dsn: str, tmp: str,
                 intr: Interrupt, on_progress: Callable[[LabProgress], None] | None) -> None:
        self.exp, self.opts, self.dsn, self.tmp, self.intr = exp, opts, dsn, tmp, intr
        self.scale = exp.scale(opts.scale)
        self.duration = opts.duration or self.scale.duration
        self.params = dict(self.scale.params)
        self.on_progress = on_progress
        self.total_s = self.duration * len(self.scale.runners) * len(exp.variants)
        self.done_s = 0.0
        self.captures: list[str] = []

    def progress(self, label: str, extra_s: float = 0.0) -> None:
        if self.on_progress is not None:
            done = self.done_s + min(extra_s, self.duration)
            self.on_progress(LabProgress(label, done, self.total_s))

    def run_all(self) -> list[Row]:
        rows: list[Row] = []
        _check_absent(self.dsn, _tables(self.exp))
        with ExitStack() as undo:
            undo.callback(run_sql, self.dsn, self.exp.teardown, self.params)
            run_sql(self.dsn, self.exp.setup, self.params, self.intr)
            for runners in self.scale.runners:
                for v in self.exp.variants:
                    self.intr.check()
                    rows.append(self.variant(v, runners))
                    self.done_s += self.duration
        self.progress("done")
        return rows

    def variant(self, v: Variant, runners: int) -> Row:
        """Set up, measure, run under the engine, measure, tear down, restore."""
        label = f"{self.exp.name}: {v.name} @ {runners} runners"
        self.progress(label)
        table = v.table or _workload_table(v)
        with ExitStack() as undo:
            previous = gucs.remember(self.dsn, list(v.gucs))
            undo.callback(gucs.restore, self.dsn, previous)
            gucs.apply(self.dsn, v.gucs)
            undo.callback(self.teardown, v)
            if v.workload:
                with _connect(self.dsn) as conn:
                    get_workload(v.workload).setup(conn)
            run_sql(self.dsn, v.setup, self.params, self.intr)
            with _connect(self.dsn) as conn:
                before = self.snapshot(conn, table)
            holder: HorizonHolder | None = None
            if v.hold_horizon:
                holder = HorizonHolder(self.dsn)
                undo.callback(holder.release)
            self.intr.check()
            started = time.monotonic()
            out = self.intr.run(lambda: self.profile(v, runners),
                                lambda: self.progress(label, time.monotonic() - started))
            row = _row(v, runners, out)
            with _connect(self.dsn) as conn:
                self.measure_after(conn, row, before, out, max(1, row["requests"] * v.batch_rows),
                                   table, holder)
            self.capture(v, runners, out)
        return row

    def snapshot(self, conn: psycopg.Connection[Any], table: str | None) -> _Before:
        """The counters a run's figures are differences of."""
        measures = self.exp.measures
        return _Before(
            counters=measure.counters(conn),
            reads=measure.block_reads(conn, table) if "buffers" in measures and table else None,
            catalogs=sum(measure.catalog_bytes(conn).values()) if "catalog" in measures
            else None)

    def measure_after(self, conn: psycopg.Connection[Any], row: Row, before: _Before,
                      out: RunOutcome, rows_done: int, table: str | None,
                      holder: HorizonHolder | None) -> None:
        """Add the run's server-side figures to `row` (REINDEX and VACUUM if measured)."""
        measures = self.exp.measures
        # the driver's backends report their WAL and I/O counters as they exit
        pids = sorted({int(p) for p in out.frame["pid"].unique()}) if len(out.frame) else []
        measure.wait_backends_gone(conn, pids)
        c0, c1 = before.counters, measure.counters(conn)
        row["wal_bytes_per_row"] = (c1.wal_bytes - c0.wal_bytes) / rows_done
        row["fpi_per_row"] = (c1.wal_fpi - c0.wal_fpi) / rows_done
        row["checkpoints"] = c1.checkpoints - c0.checkpoints
        peak = _peak_fpi_per_s(out.trace.header.get("timeline", []))
        if peak is not None:
            row["fpi_per_s_peak"] = peak
        if before.reads is not None and table:
            row["buffer_reads_per_row"] = (measure.block_reads(conn, table)
                                           - before.reads) / rows_done
        if before.catalogs is not None:
            row["catalog_bytes_before"] = before.catalogs
            row["catalog_bytes_after"] = sum(measure.catalog_bytes(conn).values())
        if "trend" in measures:
            row["tps_trend"] = tps_trend(out.frame["t_recv"].tolist())
        if "index" in measures and table:
            row["index_bytes_before"] = measure.index_bytes(conn, table)
            measure.reindex(conn, table)
            row["index_bytes_after"] = measure.index_bytes(conn, table)
        if "vacuum" in measures:
            row["catalog_dead_after_vacuum"] = measure.vacuum_catalogs(conn)
            if holder is not None:
                holder.release()
                row["catalog_dead_after_release_vacuum"] = measure.vacuum_catalogs(conn)

    def profile(self, v: Variant, runners: int) -> RunOutcome:
        """The load under the engine, as `pgtrace run` does it."""
        sql_file = None
        if v.sql is not None:
            sql_file = os.path.join(self.tmp, f"{v.name}.sql")
            with open(sql_file, "w", encoding="utf-8") as f:
                f.write(v.sql.format(**self.params) + "\n")
        return run_profile(RunOptions(load=LoadSpec(
            dsn=self.dsn, workload=v.workload or "insert-bigint", runners=runners,
            duration=self.duration, progress=False, batch_rows=v.batch_rows, sql_file=sql_file)))

    def teardown(self, v: Variant) -> None:
        run_sql(self.dsn, v.teardown, self.params)
        if v.workload:
            with _connect(self.dsn) as conn:
                get_workload(v.workload).teardown(conn)

    def capture(self, v: Variant, runners: int, out: RunOutcome) -> None:
        if self.opts.out_dir is None:
            return
        os.makedirs(self.opts.out_dir, exist_ok=True)
        path = os.path.join(self.opts.out_dir, f"{self.exp.name}-{v.name}-{runners}.pgtrace")
        header = out.header.copy()
        header["lab"] = {"experiment": self.exp.name, "variant": v.name, "runners": runners,
                         "label": v.label, "gucs": v.gucs}
        write_capture(path, out.frame, header)
        self.captures.append(path)


def check_lab(opts: LabOptions) -> Experiment:
    """The experiment to run; UsageError/NotRootError before anything starts."""
    exp = get_experiment(opts.name)
    if opts.scale not in exp.scales:
        raise UsageError(f"unknown scale {opts.scale!r}")
    if opts.dsn is not None and exp.wal_device:
        raise UsageError(f"{exp.name} moves pg_wal to a throttled device: it runs on a "
                         "private cluster only", "leave out --dsn")
    check_root()
    return exp


def run_lab(opts: LabOptions,
            on_progress: Callable[[LabProgress], None] | None = None) -> LabResult:
    """Run one experiment; restore the cluster on success, error and Ctrl-C alike."""
    exp = check_lab(opts)
    notes: list[str] = []
    with Interrupt() as intr, tempfile.TemporaryDirectory(prefix="pgtrace-lab-") as tmp:
        with _server(exp, opts.dsn, notes) as dsn:
            engine = _Engine(exp, opts, dsn, tmp, intr, on_progress)
            rows = engine.run_all()
        intr.check()
    server = list(REPORT_BUCKETS)
    e2e = list(E2E_BUCKETS)
    hyps = [evaluate(h, rows, server, e2e) for h in exp.hypotheses]
    return LabResult(exp, opts.scale, rows, hyps, notes, engine.captures)
