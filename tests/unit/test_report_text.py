"""The end-of-run text report on synthetic frames."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pgtrace.aggregate import bucket_table, empty_frame, summary
from pgtrace.model import REPORT_BUCKETS, SERVER_BUCKETS
from pgtrace.report.text import fmt_ns, render_text

TRANCHES = [
    "WALWrite", "BufferContent", "LockManager", "WALInsert", "XactSLRU",
    "BufferMapping", "ProcArray", "CLogControl", "SubtransSLRU", "tranche@0x55d0c0ffee00",
]


def frame(n: int = 1000, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {"pid": rng.integers(1000, 1008, n), "t_start": np.arange(n)}
    weights = np.array([40, 5, 30, 3, 10, 4, 4, 1, 3])
    parts = rng.integers(0, 10_000, (n, len(SERVER_BUCKETS))) * weights
    for i, b in enumerate(SERVER_BUCKETS):
        cols[b] = parts[:, i]
    cols["unexplained"] = np.zeros(n, dtype=np.int64)
    server = parts.sum(axis=1)
    cols["server_ns"] = server
    cols["t_end"] = np.arange(n) + server
    lw = parts[:, SERVER_BUCKETS.index("lwlock")]
    rest = lw.copy()
    for k, name in enumerate(TRANCHES):
        share = rest // 2 if k < len(TRANCHES) - 1 else rest
        cols[f"lwlock:{name}"] = share
        rest = rest - share
    cols["lock:transactionid"] = parts[:, SERVER_BUCKETS.index("lock")]
    return pd.DataFrame(cols).astype("int64")


def render(df: pd.DataFrame, duration_s: float = 10.0, **kw: Any) -> str:
    out = io.StringIO()
    render_text(df, summary(df, duration_s=duration_s, **kw), out)
    return out.getvalue()


@pytest.fixture(scope="module")
def text() -> str:
    return render(frame(), lost=2, unmatched=5)


def test_lines_fit_in_100_columns(text: str) -> None:
    lines = text.splitlines()
    assert len(lines) > 20
    too_long = [line for line in lines if len(line) > 100]
    assert too_long == []


def test_header_lines(text: str) -> None:
    first, second, third = text.splitlines()[:3]
    assert first == "1000 requests in 10.0 s (100/s)"
    # each value keeps its unit on the same line
    srv = summary(frame())["server_ns"]
    assert second == (
        f"server time: mean {fmt_ns(srv['mean'])}, p50 {fmt_ns(srv['p50'])}, "
        f"p99 {fmt_ns(srv['p99'])}, max {fmt_ns(srv['max'])}"
    )
    assert "lost records: 2" in third
    assert "unmatched waits: 5" in third


def _rows(text: str, title: str) -> dict[str, list[str]]:
    """First cell -> the other cells of the rows of the table under `title`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        cells = [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]]
        if not cells:
            if rows:
                break
            continue
        if cells[0] and cells[0] not in ("bucket", "name"):
            rows[cells[0]] = cells[1:]
    return rows


def test_bucket_table_rows_and_shares(text: str) -> None:
    df = frame()
    rows = _rows(text, "Where the server time went")
    assert list(rows) == list(REPORT_BUCKETS)
    expect = bucket_table(df).set_index("bucket")
    for b in REPORT_BUCKETS:
        total, share = rows[b][0], rows[b][1]
        assert total == fmt_ns(int(expect["total_ns"].loc[b]))
        assert share == f"{float(expect['share'].loc[b]) * 100:.1f}%"
    shares = [float(rows[b][1].rstrip("%")) for b in REPORT_BUCKETS]
    assert sum(shares) == pytest.approx(100.0, abs=0.5)


def test_top_lwlock_tranches(text: str) -> None:
    rows = _rows(text, "LWLock tranches")
    # the top 8, largest first
    assert list(rows) == TRANCHES[:8]
    df = frame()
    total = df["server_ns"].sum()
    walwrite = df["lwlock:WALWrite"].sum()
    assert rows["WALWrite"][1] == f"{walwrite / total * 100:.1f}%"
    assert rows["WALWrite"][2] == str(int((df["lwlock:WALWrite"] > 0).sum()))


def test_lock_types(text: str) -> None:
    rows = _rows(text, "Lock types")
    assert list(rows) == ["transactionid"]


def test_no_wait_tables_without_waits() -> None:
    df = frame()
    df = df[[c for c in df.columns if ":" not in c]]
    out = render(df)
    assert "Where the server time went" in out
    assert "LWLock tranches" not in out
    assert "Lock types" not in out


def test_empty_frame() -> None:
    out = render(empty_frame(), duration_s=0.0)
    assert out.splitlines()[0].startswith("0 requests in 0.0 s (0/s)")
    assert list(_rows(out, "Where the server time went")) == list(REPORT_BUCKETS)
    assert all(len(line) <= 100 for line in out.splitlines())


def test_huge_numbers_still_fit() -> None:
    df = frame(50) * 1_000_000  # hours of server time per bucket
    df["pid"] = 1
    out = render(df, duration_s=3600.0)
    assert all(len(line) <= 100 for line in out.splitlines())
    for b in REPORT_BUCKETS:
        assert b in out


@pytest.mark.parametrize(
    ("ns", "shown"),
    [
        (0, "0 ns"),
        (999, "999 ns"),
        (1_500, "1.5 us"),
        (2_500_000, "2.50 ms"),
        (25_000_000, "25 ms"),
        (12_300_000_000, "12.3 s"),
    ],
)
def test_fmt_ns(ns: float, shown: str) -> None:
    assert fmt_ns(ns) == shown


def test_aborted_and_partial_requests_have_their_lines() -> None:
    df = frame(20)
    df["aborted"] = 0
    df["partial"] = 0
    df.loc[3, "aborted"] = 1
    df.loc[[5, 6], "partial"] = 1
    df["fingerprint"] = "select pg_sleep($1)"
    out = io.StringIO()
    render_text(df, summary(df, duration_s=1.0, counters={"partial": 2}), out)
    lines = out.getvalue().splitlines()
    ab = fmt_ns(int(df["server_ns"].loc[3]))
    pa = fmt_ns(int(df.loc[[5, 6], "server_ns"].sum()))
    assert lines[3] == f"aborted requests: 1 ({ab} so far)"
    assert lines[4] == f"  aborted: pid {int(df['pid'].loc[3])}, {ab} so far, select pg_sleep($1)"
    assert lines[5] == f"partial requests (begun before attach): 2 ({pa} since attach)"
    # counted by the kernel, not recorded: said on the same line
    more = io.StringIO()
    render_text(df, summary(df, duration_s=1.0, counters={"partial": 5}), more)
    assert more.getvalue().splitlines()[5].endswith(f"({pa} since attach), 3 more not recorded")


def test_no_aborted_requests_says_zero(text: str) -> None:
    assert text.splitlines()[3:5] == ["aborted requests: 0 (0 ns so far)",
                                      "partial requests (begun before attach): 0 (0 ns since "
                                      "attach)"]
