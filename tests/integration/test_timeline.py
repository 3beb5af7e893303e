"""The 1 Hz timeline and the checkpoints kept beside a trace, checked against the server."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from pgtrace.attach import AttachOptions, trace_during
from pgtrace.collect.session import TraceSession

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def test_timeline_and_checkpoint(pg_cluster: Any) -> None:
    dsn = pg_cluster.dsn
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("create table if not exists timeline_t (id bigint generated always as "
                  "identity primary key, v int)")

    def workload(_s: TraceSession) -> dict[str, int]:
        with psycopg.connect(dsn, autocommit=True) as c:
            for _ in range(200):
                c.execute("insert into timeline_t(v) values (1)")
            before = time.monotonic_ns()
            c.execute("checkpoint")
            after = time.monotonic_ns()
            # the first change of each page after a checkpoint writes a full-page image
            c.execute("update timeline_t set v = v + 1")
            end = time.monotonic_ns() + 1_100_000_000
            while time.monotonic_ns() < end:  # let a sample or two pass, working
                c.execute("insert into timeline_t(v) values (2)")
        return {"before": before, "after": after}

    opts = AttachOptions(pids=[pg_cluster.postmaster_pid], dsn=dsn, sample_interval=0.25)
    result, marks = trace_during(opts, workload)
    header = result.header
    assert "timeline_error" not in header, header.get("timeline_error")
    cps = [cp for cp in header["checkpoints"]
           if cp["start"] >= marks["before"] and cp["end"] and cp["end"] <= marks["after"]]
    assert len(cps) == 1, (header["checkpoints"], marks)
    timeline = header["timeline"]
    assert len(timeline) >= 4, timeline
    ts = [s["t"] for s in timeline]
    assert ts == sorted(ts)
    for key in ("wal_records", "wal_fpi", "wal_bytes", "checkpoints_req", "psi_cpu_some_us"):
        values = [s[key] for s in timeline]
        assert values == sorted(values), (key, values)
    first, last = timeline[0], timeline[-1]
    assert last["checkpoints_req"] - first["checkpoints_req"] >= 1
    assert last["wal_fpi"] > first["wal_fpi"], (first, last)
    assert last["wal_records"] - first["wal_records"] >= 200
