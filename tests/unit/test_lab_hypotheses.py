"""Hypotheses evaluated on synthetic rows: selection, ratios, bounds, missing data."""

from __future__ import annotations

from typing import Any

import pytest

from pgtrace.lab.hypotheses import evaluate, metric
from pgtrace.lab.results import markdown, top_buckets
from pgtrace.lab.spec import Hypothesis
from pgtrace.model import E2E_BUCKETS, REPORT_BUCKETS

SERVER = list(REPORT_BUCKETS)
E2E = list(E2E_BUCKETS)


def row(variant: str, runners: int, **kw: Any) -> dict[str, Any]:
    return {"variant": variant, "runners": runners, "requests": 100, "tps": 10.0, **kw}


ROWS = [
    row("a", 16, index_bytes_before=1000, index_bytes_after=740, fpi_per_row=0.5,
        buckets_ns={"cpu": 10, "fsync": 30, "lwlock": 60, "lwlock:WALWrite": 60}),
    row("b", 16, index_bytes_before=1000, index_bytes_after=1000, fpi_per_row=0.1,
        buckets_ns={"cpu": 50, "fsync": 50, "lwlock": 0}),
    row("a", 32, index_bytes_before=2000, index_bytes_after=1600, fpi_per_row=0.6,
        buckets_ns={"cpu": 10, "fsync": 10, "lwlock": 80, "lwlock:WALWrite": 80}),
    row("b", 32, index_bytes_before=2000, index_bytes_after=2010, fpi_per_row=0.0,
        buckets_ns={"cpu": 50, "fsync": 50}),
]


def ev(**kw: Any) -> dict[str, Any]:
    return evaluate(Hypothesis(text="h", **kw), ROWS, SERVER, E2E)


def test_bound_on_every_selected_row() -> None:
    assert ev(metric="index_ratio", variants=("a",), below=0.95)["holds"]
    got = ev(metric="index_ratio", variants=("a", "b"), below=0.95)
    assert not got["holds"]
    assert "b@16 1.000" in got["detail"]


def test_ratio_over_another_variant() -> None:
    got = ev(metric="fpi_per_row", variants=("a",), runners=(16,), over="b", above=2.0)
    assert got["holds"] and "a@16/b 5.000" in got["detail"]
    # over zero: a positive value is infinitely larger
    assert ev(metric="fpi_per_row", variants=("a",), runners=(32,), over="b", above=2.0)["holds"]


def test_ratio_over_runner_level_and_shares() -> None:
    assert metric(ROWS[0], "share:lwlock:WALWrite", SERVER, E2E) == pytest.approx(0.6)
    got = ev(metric="share:fsync", variants=("a",), runners="max", over_runners="min",
             below=1.0)
    assert got["holds"] and "a@32/a@16 0.333" in got["detail"]


def test_no_rows_or_no_data_does_not_hold() -> None:
    assert not ev(metric="index_ratio", runners=(64,), below=2.0)["holds"]
    assert not ev(metric="catalog_growth", above=0.0)["holds"]


def test_markdown_shows_present_columns_and_verdicts() -> None:
    hyps = [ev(metric="index_ratio", variants=("a",), below=0.95, seed="0.74")]
    text = markdown(ROWS, hyps)
    assert "| rebuilt/live |" in text and "0.740" in text
    assert "catalogs" not in text
    assert "**holds**" in text and "seed: 0.74" in text
    assert top_buckets(ROWS[0]["buckets_ns"], SERVER) == "lwlock:WALWrite 60%, fsync 30%, cpu 10%"


def test_markdown_extra_metric_columns() -> None:
    text = markdown(ROWS[:1], [], columns=("share:fsync", "per_request:lwlock", "index_ratio"))
    assert "| share:fsync | per_request:lwlock | index_ratio |" in text
    assert "| 30.0% | 0.00 ms | 0.74 |" in text
