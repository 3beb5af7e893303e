"""aggregate.py on synthetic request frames with known numbers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pgtrace.aggregate import (
    bucket_table,
    concat,
    empty_frame,
    interval_line,
    stats,
    summary,
    wait_table,
)
from pgtrace.model import REPORT_BUCKETS, SERVER_BUCKETS

SUMMARY_KEYS = [
    "requests",
    "lost",
    "unmatched",
    "duration_s",
    "server_ns",
    "buckets_ns",
    "lwlock_ns",
    "lock_ns",
    "per_backend",
    "incomplete",
]
STAT_KEYS = ["sum", "mean", "p50", "p99", "max"]
SPEC_BUCKETS = [
    "cpu",
    "runqueue",
    "fsync",
    "wal_write",
    "lwlock",
    "lock",
    "io_read",
    "io_write",
    "other_wait",
    "unexplained",
]


def frame(rows: list[dict[str, int]]) -> pd.DataFrame:
    """A requests frame: missing buckets are 0, server_ns is t_end - t_start."""
    out = []
    for i, r in enumerate(rows):
        row = {"pid": r.get("pid", 100), "seq": i, "t_start": 1_000 * i}
        for b in SERVER_BUCKETS:
            row[b] = r.get(b, 0)
        row["t_end"] = row["t_start"] + r["server_ns"]
        row["server_ns"] = r["server_ns"]
        row["unexplained"] = r["server_ns"] - sum(row[b] for b in SERVER_BUCKETS)
        row.update({k: v for k, v in r.items() if ":" in k})
        out.append(row)
    return pd.DataFrame(out).fillna(0).astype("int64")


@pytest.fixture
def df() -> pd.DataFrame:
    """Three requests on two backends, with lwlock and lock waits."""
    return frame(
        [
            {"pid": 10, "server_ns": 100, "cpu": 60, "runqueue": 10, "lwlock": 30,
             "lwlock:WALWrite": 20, "lwlock:BufferContent": 10},
            {"pid": 10, "server_ns": 300, "cpu": 100, "fsync": 150, "lock": 40,
             "lock:transactionid": 40, "lwlock:WALWrite": 0, "lwlock:BufferContent": 0},
            {"pid": 20, "server_ns": 200, "cpu": 150, "runqueue": 25, "other_wait": 20,
             "lwlock:WALWrite": 0, "lwlock:BufferContent": 0, "lock:transactionid": 0},
        ]
    )


def test_summary_shape_is_the_spec(df: pd.DataFrame) -> None:
    s = summary(df, lost=3, unmatched=2, duration_s=1.23456)
    assert list(s) == SUMMARY_KEYS
    assert list(s["server_ns"]) == STAT_KEYS
    assert list(s["buckets_ns"]) == SPEC_BUCKETS == list(REPORT_BUCKETS)
    assert (s["requests"], s["lost"], s["unmatched"], s["duration_s"]) == (3, 3, 2, 1.235)
    assert json.loads(json.dumps(s)) == s  # plain JSON types only
    for v in [*s["server_ns"].values(), *s["buckets_ns"].values()]:
        assert type(v) is int


def test_summary_numbers(df: pd.DataFrame) -> None:
    s = summary(df)
    assert s["server_ns"] == {"sum": 600, "mean": 200, "p50": 200, "p99": 298, "max": 300}
    assert s["buckets_ns"] == {
        "cpu": 310,
        "runqueue": 35,
        "fsync": 150,
        "wal_write": 0,
        "lwlock": 30,
        "lock": 40,
        "io_read": 0,
        "io_write": 0,
        "other_wait": 20,
        "unexplained": 15,
    }
    assert sum(s["buckets_ns"].values()) == s["server_ns"]["sum"]
    assert s["lwlock_ns"] == {"WALWrite": 20, "BufferContent": 10}
    assert list(s["lwlock_ns"]) == ["WALWrite", "BufferContent"]  # largest first
    assert s["lock_ns"] == {"transactionid": 40}
    assert s["per_backend"] == {
        "10": {"cpu_ns": 160, "runqueue_ns": 10, "requests": 2},
        "20": {"cpu_ns": 150, "runqueue_ns": 25, "requests": 1},
    }


def test_percentiles_on_a_known_distribution() -> None:
    # server times 1..1000 ns: linear-interpolated quantiles
    df = frame([{"server_ns": v, "cpu": v} for v in range(1, 1001)])
    s = summary(df)["server_ns"]
    assert s["sum"] == 500_500
    assert s["mean"] == 500  # 500.5 rounds half to even
    assert s["p50"] == 500  # 500.5
    assert s["p99"] == 990  # 990.01
    assert s["max"] == 1000
    st = stats(pd.Series(np.arange(1, 101, dtype="int64")))
    assert st == {"sum": 5050, "mean": 50, "p50": 50, "p99": 99, "max": 100}


def test_summary_of_an_empty_frame() -> None:
    s = summary(empty_frame(), lost=1, duration_s=2.0)
    assert list(s) == SUMMARY_KEYS
    assert s["requests"] == 0
    assert s["lost"] == 1
    assert s["server_ns"] == dict.fromkeys(STAT_KEYS, 0)
    assert s["buckets_ns"] == dict.fromkeys(SPEC_BUCKETS, 0)
    assert s["lwlock_ns"] == {}
    assert s["lock_ns"] == {}
    assert s["per_backend"] == {}
    json.dumps(s)


def test_bucket_table(df: pd.DataFrame) -> None:
    t = bucket_table(df)
    assert list(t.columns) == ["bucket", "total_ns", "share", "mean_ns", "p50_ns", "p99_ns"]
    assert list(t["bucket"]) == SPEC_BUCKETS
    by = t.set_index("bucket")
    assert by.loc["cpu", "total_ns"] == 310
    assert by.loc["cpu", "share"] == pytest.approx(310 / 600)
    assert by.loc["cpu", "mean_ns"] == 103  # 310/3
    assert by.loc["cpu", "p50_ns"] == 100
    assert by.loc["fsync", "p50_ns"] == 0
    assert by.loc["fsync", "p99_ns"] == 147  # 0, 0, 150 -> 147.0
    assert t["share"].sum() == pytest.approx(1.0)
    assert t["total_ns"].sum() == 600


def test_bucket_table_empty() -> None:
    t = bucket_table(empty_frame())
    assert list(t["bucket"]) == SPEC_BUCKETS
    assert (t["total_ns"] == 0).all()
    assert (t["share"] == 0).all()


def test_wait_table(df: pd.DataFrame) -> None:
    lw = wait_table(df, "lwlock:")
    assert list(lw.columns) == ["name", "total_ns", "share", "requests"]
    assert lw.to_dict("records") == [
        {"name": "WALWrite", "total_ns": 20, "share": pytest.approx(20 / 600), "requests": 1},
        {"name": "BufferContent", "total_ns": 10, "share": pytest.approx(10 / 600),
         "requests": 1},
    ]
    assert list(wait_table(df, "lwlock:", top=1)["name"]) == ["WALWrite"]
    lk = wait_table(df, "lock:")
    assert lk.to_dict("records") == [
        {"name": "transactionid", "total_ns": 40, "share": pytest.approx(40 / 600),
         "requests": 1}
    ]


def test_wait_table_without_waits() -> None:
    t = wait_table(empty_frame(), "lwlock:")
    assert t.empty
    assert list(t.columns) == ["name", "total_ns", "share", "requests"]


def test_concat_fills_missing_wait_columns_with_zero() -> None:
    a = frame([{"server_ns": 10, "cpu": 5, "lwlock": 5, "lwlock:WALWrite": 5}])
    b = frame([{"server_ns": 20, "cpu": 10, "lock": 10, "lock:relation": 10}])
    c = frame([{"server_ns": 30, "cpu": 30}])
    df = concat([a, empty_frame(), b, c])
    assert len(df) == 3
    assert list(df["lwlock:WALWrite"]) == [5, 0, 0]
    assert list(df["lock:relation"]) == [0, 10, 0]
    assert df["lwlock:WALWrite"].dtype == np.int64
    assert df["lock:relation"].dtype == np.int64
    assert df.index.tolist() == [0, 1, 2]
    s = summary(df)
    assert s["lwlock_ns"] == {"WALWrite": 5}
    assert s["lock_ns"] == {"relation": 10}
    assert sum(s["buckets_ns"].values()) == s["server_ns"]["sum"] == 60


def test_concat_of_nothing_is_the_empty_frame() -> None:
    for frames in ([], [empty_frame(), empty_frame()]):
        df = concat(frames)
        assert len(df) == 0
        assert list(df.columns) == list(empty_frame().columns)
        assert summary(df)["requests"] == 0


def test_interval_line(df: pd.DataFrame) -> None:
    line = interval_line(df, 2.0)
    assert line["requests"] == 3
    assert line["rate"] == 1.5
    assert line["mean_ns"] == 200
    assert line["shares"]["cpu"] == pytest.approx(310 / 600)
    assert set(line["shares"]) == set(SERVER_BUCKETS)
    empty = interval_line(empty_frame(), 1.0)
    assert empty["requests"] == 0
    assert empty["mean_ns"] == 0
    assert all(v == 0.0 for v in empty["shares"].values())


def test_per_fingerprint_and_per_second_add_up() -> None:
    from pgtrace.aggregate import per_fingerprint, per_second

    rng = np.random.default_rng(7)
    n = 300
    t_start = np.sort(rng.integers(0, 3_000_000_000, n)).astype(np.int64)
    cpu = rng.integers(1_000, 50_000, n).astype(np.int64)
    fsync = rng.integers(0, 200_000, n).astype(np.int64)
    df = pd.DataFrame({"pid": 1, "t_start": t_start, "t_end": t_start + cpu + fsync,
                       "server_ns": cpu + fsync, "fingerprint": rng.choice(["a", "b"], n)})
    for b in REPORT_BUCKETS:
        df[b] = 0
    df["cpu"], df["fsync"] = cpu, fsync
    fps = per_fingerprint(df)
    assert {r["fingerprint"] for r in fps} == {"a", "b"}
    assert sum(r["requests"] for r in fps) == n
    assert sum(r["buckets_ns"]["fsync"] for r in fps) == int(fsync.sum())
    assert fps[0]["server_ns"]["sum"] >= fps[1]["server_ns"]["sum"]
    secs = per_second(df)
    assert sum(r["requests"] for r in secs) == n
    assert [r["second"] for r in secs] == sorted(r["second"] for r in secs)
    assert sum(r["buckets_ns"]["cpu"] for r in secs) == int(cpu.sum())


def test_aborted_and_partial_rows_are_reported_apart_and_kept_in_totals(
        df: pd.DataFrame) -> None:
    flagged = df.assign(aborted=[0, 1, 0], partial=[1, 1, 0], fingerprint=["a", "b", "c"])
    s = summary(flagged, counters={"partial": 3, "unanswered": 7})
    inc = s["incomplete"]
    assert inc["aborted"]["requests"] == 1 and inc["aborted"]["server_ns"] == 300
    assert inc["aborted"]["rows"] == [{"pid": 10, "t_start": 1000, "server_ns": 300,
                                       "fingerprint": "b"}]
    # two recorded, one counted by the kernel without a record
    assert (inc["partial"]["requests"], inc["partial"]["server_ns"],
            inc["partial"]["unrecorded"]) == (2, 400, 1)
    assert inc["unanswered_receives"] == 7
    # the window's server time is all there: flagged rows stay in the totals
    assert s["requests"] == 3 and s["server_ns"]["sum"] == 600
    assert json.loads(json.dumps(s)) == s


def test_a_frame_without_flags_has_no_incomplete_requests(df: pd.DataFrame) -> None:
    inc = summary(df)["incomplete"]
    assert inc["aborted"]["requests"] == inc["partial"]["requests"] == 0
    assert inc["aborted"]["rows"] == []
