"""load_summary on synthetic frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pgtrace.driver.summary import load_summary


def _frame(lat: list[int], ok: list[bool]) -> pd.DataFrame:
    n = len(lat)
    t0 = np.arange(n, dtype=np.int64) * 1000 + 10**12
    return pd.DataFrame({
        "t_enqueue": t0, "t_send": t0 + 5, "t_recv": t0 + np.asarray(lat, dtype=np.int64),
        "pid": np.full(n, 42, dtype=np.int32), "ok": np.asarray(ok, dtype=bool),
        "runner": np.zeros(n, dtype=np.int32),
    })


def test_summary_math() -> None:
    lat = list(range(1, 1001))  # 1..1000 ns
    s = load_summary(_frame(lat, [True] * 1000), 2.0)
    assert set(s) == {"requests", "errors", "duration_s", "tps", "client_ns"}
    assert set(s["client_ns"]) == {"mean", "p50", "p99", "p999", "max"}
    assert s["requests"] == 1000 and s["errors"] == 0
    assert s["duration_s"] == 2.0 and s["tps"] == 500.0
    c = s["client_ns"]
    assert c["mean"] == pytest.approx(500.5)
    assert c["p50"] == pytest.approx(500.5)
    assert c["p99"] == pytest.approx(990.01)
    assert c["p999"] == pytest.approx(999.001)
    assert c["max"] == 1000.0


def test_errors_counted_and_excluded_from_latency() -> None:
    lat = [100, 200, 10**9, 300]
    s = load_summary(_frame(lat, [True, True, False, True]), 1.0)
    assert s["requests"] == 3 and s["errors"] == 1 and s["tps"] == 3.0
    assert s["client_ns"]["max"] == 300.0
    assert s["client_ns"]["mean"] == pytest.approx(200.0)


def test_all_failed_or_empty() -> None:
    s = load_summary(_frame([5, 6], [False, False]), 1.0)
    assert s["requests"] == 0 and s["errors"] == 2 and s["client_ns"]["p99"] == 0.0
    e = load_summary(_frame([], []), 0.0)
    assert e["requests"] == 0 and e["tps"] == 0.0


def test_latency_counts_from_enqueue_not_send() -> None:
    df = _frame([1000], [True])
    df["t_send"] = df["t_enqueue"] + 900  # queued 900 ns
    assert load_summary(df, 1.0)["client_ns"]["p50"] == 1000.0
