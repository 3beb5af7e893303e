"""Load runner: N logical runners over M autocommit connections, on the calling thread.

Closed loop by default (each runner issues its next request when the previous one
returns); open loop at a fixed total ``rate`` where request k is due at
``t0 + k / rate`` and latency counts from that intended start (no coordinated
omission). Every request gets CLOCK_MONOTONIC ns stamps: ``t_enqueue`` (intended or
actual start), ``t_send`` (connection acquired, just before the send), ``t_recv``
(reply or error received), plus the connection's backend pid. Requests are sent and
read on the calling thread only: `pgtrace run` follows the driver process's run-queue
waits by its pid. The loop itself is in loop.py, one connection in wire.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import psycopg

from pgtrace.driver.loop import LIVENESS_S, drive
from pgtrace.driver.record import Progress
from pgtrace.driver.wire import Wire, server_error_line
from pgtrace.driver.workloads import Workload
from pgtrace.errors import ServerError, UsageError

__all__ = ["COLUMNS", "LIVENESS_S", "LoadResult", "Progress", "intended_start_ns", "run_load"]

COLUMNS = ("t_enqueue", "t_send", "t_recv", "pid", "ok", "runner")


@dataclass
class LoadResult:
    """Per-request frame, wall duration, and the error that stopped the run (if any)."""

    frame: pd.DataFrame
    duration_s: float
    fatal: str | None = None
    first_errors: list[str] = field(default_factory=list)


def intended_start_ns(t0_ns: int, rate: float, k: int) -> int:
    """Open-loop schedule: request k is due at t0 + k / rate seconds."""
    return t0_ns + round(k * 1e9 / rate)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        raise ServerError(f"cannot connect to PostgreSQL: {server_error_line(exc)}") from None


def run_load(
    dsn: str,
    workload: Workload,
    *,
    runners: int = 8,
    connections: int | None = None,
    duration_s: float | None = 10.0,
    count: int | None = None,
    rate: float | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> LoadResult:
    """Run the workload; the table must already exist (see Workload.setup)."""
    m = runners if connections is None else connections
    if runners < 1 or m < 1:
        raise UsageError("--runners and --connections must be >= 1")
    if rate is not None and rate <= 0:
        raise UsageError("--rate must be > 0")
    if count is None and duration_s is None:
        raise UsageError("give --duration or --count")
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(min(m, runners)):
            conns.append(_connect(dsn))
        wires = [Wire(c, workload) for c in conns]
        out = drive(wires, runners, duration_s, count, rate, on_progress)
    finally:
        for c in conns:
            c.close()
    return LoadResult(out.rec.frame(), out.elapsed_s, out.fatal, out.first_errors)
