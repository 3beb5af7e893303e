"""Aborted and partial requests in the HTML page's headline (the summary's `incomplete`)."""

from __future__ import annotations

import io

import pandas as pd

from pgtrace.model import REPORT_BUCKETS
from pgtrace.report.html import render_html
from pgtrace.report.text import fmt_ns


def test_headline_counts_aborted_and_partial_requests() -> None:
    n = 10
    df = pd.DataFrame({c: [0] * n for c in REPORT_BUCKETS})
    df["pid"] = 7
    df["t_start"] = [i * 1_000_000 for i in range(n)]
    df["server_ns"] = 500_000
    df["cpu"] = 500_000
    df["t_end"] = df["t_start"] + df["server_ns"]
    df.loc[9, ["server_ns", "other_wait", "cpu"]] = [2_000_000_000, 2_000_000_000, 0]
    df["t_end"] = df["t_start"] + df["server_ns"]
    df["aborted"] = [0] * 9 + [1]
    df["partial"] = [1] + [0] * 9
    df["fingerprint"] = "f"
    header = {"duration_s": 3.0, "lost": 0, "unmatched": 0,
              "counters": {"aborted": 1, "partial": 1}}
    out = io.StringIO()
    render_html([("/tmp/x.pgtrace", df, header)], out)
    page = out.getvalue()
    assert f"aborted requests: 1 ({fmt_ns(2e9)} so far)<br>" in page
    assert f"partial requests (begun before attach): 1 ({fmt_ns(500_000)} since attach)" in page
    assert f"aborted: pid 7, {fmt_ns(2e9)} so far, f" in page
