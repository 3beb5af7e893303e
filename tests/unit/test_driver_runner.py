"""Open-loop schedule, workloads' statements and parameters, argument errors."""

from __future__ import annotations

import uuid
from itertools import pairwise

import pytest

from pgtrace.driver.runner import intended_start_ns, run_load
from pgtrace.driver.wire import server_error_line
from pgtrace.driver.workloads import WORKLOADS, get_workload
from pgtrace.errors import UsageError


def test_rate_schedule() -> None:
    t0 = 10**12
    starts = [intended_start_ns(t0, 200.0, k) for k in range(401)]
    assert starts[0] == t0
    assert starts[1] - starts[0] == 5_000_000
    assert starts[400] - t0 == 2 * 10**9
    assert all(b > a for a, b in pairwise(starts))
    # no drift with a rate that is not a divisor of 1e9
    assert intended_start_ns(t0, 3.0, 3_000_000) == t0 + 10**15


def test_workload_names() -> None:
    assert set(WORKLOADS) == {"insert-bigint", "insert-bigint-cache50", "insert-uuidv4",
                              "insert-uuidv7", "insert-ulid"}
    assert len({w.table for w in WORKLOADS.values()}) == len(WORKLOADS)


def test_bigint_statement_and_params() -> None:
    w = get_workload("insert-bigint")
    assert w.table == "pgtrace_insert"
    assert "generated always as identity (cache 1) primary key" in w.create_sql
    assert w.prepared_sql == b"insert into pgtrace_insert (payload) values ($1)"
    assert w.wire_params() == [None] and w.params() == (None,)
    assert "cache 50" in get_workload("insert-bigint-cache50").create_sql


def test_uuid_workloads_params() -> None:
    v4 = get_workload("insert-uuidv4")
    assert "default gen_random_uuid()" in v4.create_sql and v4.wire_params() == [None]
    v7 = get_workload("insert-uuidv7", payload_bytes=16)
    raw = v7.wire_params()
    assert v7.param_formats == [1, 0]
    assert isinstance(raw[0], bytes) and uuid.UUID(bytes=raw[0]).version == 7
    assert raw[1] is not None and len(raw[1]) == 16
    assert v7.prepared_sql.endswith(b"(id, payload) values ($1, $2)")


def test_bad_workload_and_payload() -> None:
    with pytest.raises(UsageError, match="unknown workload"):
        get_workload("nope")
    with pytest.raises(UsageError):
        get_workload("insert-bigint", payload_bytes=-1)


def test_bad_runner_arguments() -> None:
    w = get_workload("insert-bigint")
    with pytest.raises(UsageError):
        run_load("", w, runners=0)
    with pytest.raises(UsageError):
        run_load("", w, runners=1, rate=0)
    with pytest.raises(UsageError):
        run_load("", w, runners=1, duration_s=None, count=None)


def test_error_line_is_one_line() -> None:
    assert server_error_line("a\n\tb\n") == "a b"


def test_batched_insert_numbers_parameters_per_row() -> None:
    from pgtrace.driver.workloads import get_workload

    w = get_workload("insert-uuidv7", batch_rows=3)
    assert w.prepared_sql == (b"insert into pgtrace_insert_uuidv7 (id, payload) values "
                              b"($1, $2), ($3, $4), ($5, $6)")
    assert w.param_formats == [1, 0, 1, 0, 1, 0]
    params = w.wire_params()
    assert len(params) == 6 and len({params[0], params[2], params[4]}) == 3


def test_copy_rows_in_text_format() -> None:
    from pgtrace.driver.workloads import get_workload

    w = get_workload("insert-bigint", payload_bytes=0, batch_rows=4, copy=True)
    assert w.copy_sql == b"copy pgtrace_insert (payload) from stdin"
    assert w.copy_data() == b"\\N\n" * 4
    v = get_workload("insert-uuidv7", payload_bytes=3, batch_rows=2, copy=True)
    lines = v.copy_data().decode().splitlines()
    assert len(lines) == 2 and all(len(ln.split("\t")) == 2 for ln in lines)


def test_record_frame_and_progress() -> None:
    from pgtrace.driver.record import Record
    from pgtrace.driver.runner import COLUMNS

    rec = Record()
    rec.add((10, 20, 1_000_030, 7, True, 0))
    rec.add((40, 50, 3_000_060, 8, False, 1))
    p = rec.progress(1.0)
    assert (p.requests, p.errors, p.tps) == (2, 1, 2)
    rec.add((70, 80, 2_000_090, 7, True, 0))
    p = rec.progress(2.0)
    assert (p.requests, p.errors, p.tps) == (3, 1, 1) and p.p50_ms == 2.00002
    df = rec.frame()
    assert tuple(df.columns) == COLUMNS and len(rec) == 3
    assert df["t_recv"].tolist() == [1_000_030, 3_000_060, 2_000_090]
    assert df["ok"].tolist() == [True, False, True] and df["ok"].dtype == bool
    assert df["pid"].dtype == "int32" and df["runner"].tolist() == [0, 1, 0]
