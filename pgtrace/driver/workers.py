"""Several driver processes sharing one load, for when one Python process cannot keep up."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pandas as pd

from pgtrace.driver.options import LoadSpec

__all__ = ["join_workers", "split", "start_workers", "worker_count", "worker_specs"]

#: A worker: `pgtrace load` reading its LoadSpec (JSON) from stdin, writing its frame to a
#: file: the spec travels as data (never back through argv; a DSN's password stays out of
#: /proc/PID/cmdline).
WORKER_COMMAND = [sys.executable, "-m", "pgtrace", "load", "--spec-stdin", "--frame-out"]


def split(total: int, parts: int) -> list[int]:
    """`total` in `parts` near-equal shares, largest first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def worker_count(spec: LoadSpec) -> int:
    """Workers actually used: never more than runners or connections."""
    n = max(1, min(spec.workers, spec.runners))
    return min(n, spec.connections) if spec.connections is not None else n


def worker_specs(spec: LoadSpec) -> list[LoadSpec]:
    """One single-process LoadSpec per worker, sharing runners, connections, count and rate."""
    k = worker_count(spec)
    runners = split(spec.runners, k)
    conns = split(spec.connections, k) if spec.connections is not None else runners
    counts: list[int | None] = (
        list(split(spec.count, k)) if spec.count is not None else [None] * k
    )
    sql_file = os.path.abspath(spec.sql_file) if spec.sql_file is not None else None
    return [replace(spec, runners=runners[i], connections=conns[i], count=counts[i],
                    rate=spec.rate / k if spec.rate else None, sql_file=sql_file,
                    progress=spec.progress and i == 0, workers=1)
            for i in range(k)]


Started = list[tuple["subprocess.Popen[bytes]", str]]


def start_workers(spec: LoadSpec, tmpdir: str) -> Started:
    """Start the worker processes; each writes its frame to a file in tmpdir."""
    started: Started = []
    for i, one in enumerate(worker_specs(spec)):
        out = os.path.join(tmpdir, f"client{i}.parquet")
        proc = subprocess.Popen([*WORKER_COMMAND, out], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL)
        assert proc.stdin is not None
        with proc.stdin:
            proc.stdin.write(one.to_json().encode())
        started.append((proc, out))
    return started


def join_workers(started: Started) -> tuple[pd.DataFrame, float, int]:
    """Wait for the workers: (frame with client_tid, longest duration, first non-zero exit)."""
    codes = [(p.wait(), p.pid, out) for p, out in started]
    frames = [pd.read_parquet(out).assign(client_tid=pid)
              for _code, pid, out in codes if os.path.exists(out)]
    code = next((c for c, _pid, _out in codes if c != 0), 0)
    if not frames:
        return pd.DataFrame(), 0.0, code or 1
    client = pd.concat(frames, ignore_index=True)
    duration = max(float(f["duration_s"].iloc[0]) for f in frames if len(f)) if len(client) else 0.0
    return client.drop(columns=["duration_s"]), duration, code
