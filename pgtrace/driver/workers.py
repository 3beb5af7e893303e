"""Several driver processes sharing one load, for when one Python process cannot keep up."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pandas as pd

from pgtrace.driver.workloads import Workload, get_workload


@dataclass(frozen=True)
class LoadSpec:
    """A `pgtrace load` run, as its command line says it."""

    dsn: str
    workload: str = "insert-bigint"
    runners: int = 8
    connections: int | None = None
    duration: float | None = 10.0
    count: int | None = None
    rate: float | None = None
    payload_bytes: int = 0
    progress: bool = True
    batch_rows: int = 1
    copy: bool = False
    sql_file: str | None = None

    def build(self) -> Workload:
        """The workload this spec names, with its payload and rows per request."""
        if self.sql_file is not None:
            from pgtrace.driver.custom import load_sql_file

            return load_sql_file(self.sql_file)
        return get_workload(self.workload, self.payload_bytes, self.batch_rows, self.copy)


def split(total: int, parts: int) -> list[int]:
    """`total` in `parts` near-equal shares, largest first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def worker_count(spec: LoadSpec, workers: int) -> int:
    """Workers actually used: never more than runners or connections."""
    n = max(1, min(workers, spec.runners))
    return min(n, spec.connections) if spec.connections is not None else n


def worker_commands(spec: LoadSpec, frame_outs: list[str]) -> list[list[str]]:
    """One `pgtrace load` command line per worker process, sharing the load."""
    k = len(frame_outs)
    runners = split(spec.runners, k)
    conns = split(spec.connections, k) if spec.connections is not None else runners
    counts: list[int | None] = (
        list(split(spec.count, k)) if spec.count is not None else [None] * k
    )
    cmds = []
    for i, out in enumerate(frame_outs):
        cmd = [sys.executable, "-m", "pgtrace", "load", "--dsn", spec.dsn,
               "--workload", spec.workload, "--runners", str(runners[i]),
               "--connections", str(conns[i]), "--payload-bytes", str(spec.payload_bytes),
               "--batch-rows", str(spec.batch_rows), "--frame-out", out]
        if spec.copy:
            cmd.append("--copy")
        if spec.sql_file is not None:
            cmd += ["--sql-file", os.path.abspath(spec.sql_file)]
        for flag, value in (("--duration", spec.duration), ("--count", counts[i]),
                            ("--rate", spec.rate / k if spec.rate else None)):
            if value is not None:
                cmd += [flag, str(value)]
        if not spec.progress or i > 0:
            cmd.append("--quiet")
        cmds.append(cmd)
    return cmds


Started = list[tuple["subprocess.Popen[bytes]", str]]


def start_workers(spec: LoadSpec, tmpdir: str, workers: int) -> Started:
    """Start the worker processes; each writes its frame to a file in tmpdir."""
    outs = [os.path.join(tmpdir, f"client{i}.parquet") for i in range(worker_count(spec, workers))]
    return [(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL), out)
            for cmd, out in zip(worker_commands(spec, outs), outs, strict=True)]


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
