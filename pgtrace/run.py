"""`pgtrace run`: the built-in driver and the engine together, joined request by request."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import pandas as pd
import psycopg

from pgtrace.attach import AttachOptions, AttachResult, trace_during
from pgtrace.capture import Header, RunFigures
from pgtrace.cluster import start_cluster
from pgtrace.collect.session import TraceSession
from pgtrace.driver.options import RUN_RUNNERS, LoadSpec
from pgtrace.driver.summary import load_summary
from pgtrace.driver.workers import join_workers, start_workers
from pgtrace.e2e import e2e_frame, join_requests, run_summary
from pgtrace.errors import ServerError
from pgtrace.target import find_target


@dataclass
class RunOptions:
    """A driver load to profile (its dsn None: on a private throwaway cluster)."""

    load: LoadSpec = field(default_factory=lambda: LoadSpec(runners=RUN_RUNNERS))
    query_text: bool = False


@dataclass
class RunOutcome:
    """The joined requests, the engine's result and the run summary."""

    frame: pd.DataFrame
    trace: AttachResult
    summary: dict[str, Any]
    cluster_note: str
    header: Header  # the capture's: the engine's header with the run's figures
    driver_exit: int = 0


def run_header(trace: Header, run: dict[str, Any], note: str | None = None) -> Header:
    """The engine's header with a run's figures (header["run"]) and where it ran."""
    header = trace.copy()
    header["run"] = cast(RunFigures, run)  # read_capture checks the figures it reads
    if note is not None:
        header["cluster_note"] = note
    return header


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[tuple[str, str]]:
    """(dsn, note): the given server, or a private throwaway cluster removed afterwards."""
    if dsn is not None:
        yield dsn, "given server"
        return
    with start_cluster() as cluster:
        yield cluster.dsn, f"private throwaway cluster at {cluster.data_dir} (removed)"


def _postmaster_of(dsn: str) -> int:
    """The postmaster behind a DSN (the server must run on this machine)."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            # while the connection is open: its backend must still exist to be looked at
            return find_target(conn.info.backend_pid).postmaster_pid
    except psycopg.Error as exc:
        raise ServerError(f"cannot connect to PostgreSQL: {exc}".splitlines()[0]) from None


def run_profile(opts: RunOptions) -> RunOutcome:
    """Trace the cluster while the driver runs in a child process; join and split."""
    with _server(opts.load.dsn) as (dsn, note), tempfile.TemporaryDirectory() as tmp:
        postmaster = _postmaster_of(dsn)
        spec = replace(opts.load, dsn=dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            spec.build().setup(conn)

        def drive(session: TraceSession) -> tuple[pd.DataFrame, float, int]:
            started = start_workers(spec, tmp)
            session.add_client_pids([p.pid for p, _out in started])
            return join_workers(started)

        trace, (client, duration, code) = trace_during(
            AttachOptions(pids=[postmaster], query_text=opts.query_text, dsn=dsn), drive
        )
    if client.empty and code:
        raise ServerError(f"the driver failed (exit {code}) before writing its results")
    if not client.empty and not client["ok"].any():
        raise ServerError(f"all {len(client)} requests failed (the driver's first error is "
                          "above): there is nothing to split")
    # failed requests have no place in the split (the summary counts them as errors)
    joined, unmatched = join_requests(client[client["ok"]], trace.frame)
    frame = e2e_frame(joined, trace.client_runq)
    # the driver's figures and the engine's counters; the rest is computed from the
    # joined rows, as `pgtrace report` computes it from the capture
    run: dict[str, Any] = load_summary(client, duration)
    run.update(server_requests=trace.summary["requests"],
               unmatched_waits=trace.summary["unmatched"], unmatched=unmatched,
               driver_exit=code)
    summary = run_summary(frame, run_header(trace.header, run))
    return RunOutcome(frame=frame, trace=trace, summary=summary, cluster_note=note,
                      header=run_header(trace.header, summary, note), driver_exit=code)
