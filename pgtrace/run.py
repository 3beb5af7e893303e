"""`pgtrace run`: the built-in driver and the engine together, joined request by request."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import psycopg

from pgtrace.attach import AttachOptions, RunResult, trace_during
from pgtrace.cluster import start_cluster
from pgtrace.collect.session import TraceSession
from pgtrace.driver.summary import load_summary
from pgtrace.driver.workloads import get_workload
from pgtrace.e2e import e2e_frame, e2e_summary, join_requests
from pgtrace.errors import ServerError
from pgtrace.target import find_target


@dataclass
class RunOptions:
    """A driver workload to profile, and where."""

    dsn: str | None = None
    workload: str = "insert-bigint"
    runners: int = 40
    connections: int | None = None
    duration: float | None = 10.0
    count: int | None = None
    rate: float | None = None
    payload_bytes: int = 0
    query_text: bool = False
    progress: bool = True
    workers: int = 1


@dataclass
class RunOutcome:
    """The joined requests, the engine's result and the run summary."""

    frame: pd.DataFrame
    trace: RunResult
    summary: dict[str, Any]
    cluster_note: str
    driver_exit: int = 0


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
            backend = conn.info.backend_pid
        return find_target(backend).postmaster_pid
    except psycopg.Error as exc:
        raise ServerError(f"cannot connect to PostgreSQL: {exc}".splitlines()[0]) from None


def split(total: int, parts: int) -> list[int]:
    """`total` in `parts` near-equal shares, largest first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def driver_commands(opts: RunOptions, dsn: str, frame_outs: list[str]) -> list[list[str]]:
    """One `pgtrace load` command line per worker process, sharing the load."""
    k = len(frame_outs)
    runners = split(opts.runners, k)
    conns = split(opts.connections, k) if opts.connections is not None else runners
    counts = split(opts.count, k) if opts.count is not None else [None] * k
    cmds = []
    for i, out in enumerate(frame_outs):
        cmd = [sys.executable, "-m", "pgtrace", "load", "--dsn", dsn,
               "--workload", opts.workload, "--runners", str(runners[i]),
               "--connections", str(conns[i]), "--payload-bytes", str(opts.payload_bytes),
               "--frame-out", out]
        for flag, value in (("--duration", opts.duration), ("--count", counts[i]),
                            ("--rate", opts.rate / k if opts.rate else None)):
            if value is not None:
                cmd += [flag, str(value)]
        if not opts.progress or i > 0:
            cmd.append("--quiet")
        cmds.append(cmd)
    return cmds


def run_profile(opts: RunOptions) -> RunOutcome:
    """Trace the cluster while the driver runs in a child process; join and split."""
    with _server(opts.dsn) as (dsn, note), tempfile.TemporaryDirectory() as tmp:
        postmaster = _postmaster_of(dsn)
        workload = get_workload(opts.workload, opts.payload_bytes)
        with psycopg.connect(dsn, autocommit=True) as conn:
            workload.setup(conn)
        workers = max(1, min(opts.workers, opts.runners))
        if opts.connections is not None:
            workers = min(workers, opts.connections)
        outs = [os.path.join(tmp, f"client{i}.parquet") for i in range(workers)]

        def drive(session: TraceSession) -> list[tuple[int, int]]:
            children = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
                        for cmd in driver_commands(opts, dsn, outs)]
            session.add_client_pids([c.pid for c in children])
            return [(c.wait(), c.pid) for c in children]

        trace, exits = trace_during(
            AttachOptions(pids=[postmaster], query_text=opts.query_text), drive
        )
        frames = [pd.read_parquet(out).assign(client_tid=pid)
                  for out, (_code, pid) in zip(outs, exits, strict=True) if os.path.exists(out)]
        code = next((c for c, _pid in exits if c != 0), 0)
        if not frames:
            raise ServerError(f"the driver failed (exit {code}) before writing its results")
    client = pd.concat(frames, ignore_index=True)
    duration = max(float(f["duration_s"].iloc[0]) for f in frames if len(f)) if len(client) else 0.0
    client = client.drop(columns=["duration_s"])
    joined, unmatched = join_requests(client, trace.frame)
    frame = e2e_frame(joined, trace.client_runq)
    summary: dict[str, Any] = load_summary(client, duration)
    engine = dict(trace.summary)
    engine["unmatched_waits"] = engine.pop("unmatched")
    engine["server_requests"] = engine.pop("requests")
    summary.update({k: v for k, v in engine.items() if k not in summary})
    summary["unmatched"] = unmatched
    summary.update(e2e_summary(frame))
    summary["driver_exit"] = code
    return RunOutcome(frame=frame, trace=trace, summary=summary, cluster_note=note,
                      driver_exit=code)
