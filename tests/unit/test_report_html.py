"""The HTML report on synthetic captures: one file, no network, the summary to the nanosecond."""

from __future__ import annotations

import html as htmllib
import io
import json
import re
from importlib import metadata
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pgtrace.aggregate import bucket_table, capture_summary, per_second, summary, wait_table
from pgtrace.errors import PgtraceError
from pgtrace.model import E2E_BUCKETS, REPORT_BUCKETS, SERVER_BUCKETS, UNEXPLAINED
from pgtrace.report import html as report_html
from pgtrace.report.html import (
    Capture,
    build_page,
    percentiles,
    render_html,
    stacked_means_figure,
    timeline_figure,
)
from pgtrace.report.text import fmt_ns

T0 = 5_000_000_000_000  # CLOCK_MONOTONIC ns of the first request
SEC = 1_000_000_000
DURATION = 20
#: Checkpoints of the synthetic run: one finished, one still running at the end.
CHECKPOINTS: list[dict[str, Any]] = [
    {"start": T0 + 5 * SEC, "end": T0 + 9 * SEC},
    {"start": T0 + 15 * SEC, "end": None},
]
FINGERPRINTS = {
    "a1b2c3d4e5f60718": "INSERT INTO t (id, payload) VALUES ($1, $2)",
    "0f1e2d3c4b5a6978": "UPDATE t SET payload = $1 WHERE id = $2",
    "1122334455667788": "SELECT payload FROM t WHERE id = $1 </script><script>alert(1)</script>",
}
TRANCHES = ["WALWrite", "BufferContent", "WALInsert", "LockManager"]


def in_checkpoint(t: np.ndarray) -> np.ndarray:
    return ((t >= T0 + 5 * SEC) & (t < T0 + 9 * SEC)) | (t >= T0 + 15 * SEC)


def synthetic_frame(n: int = 4000, seed: int = 3, run: bool = False) -> pd.DataFrame:
    """Requests over DURATION seconds; fsync and WAL writes are slower during checkpoints."""
    rng = np.random.default_rng(seed)
    t_start = T0 + np.sort(rng.integers(0, DURATION * SEC, n))
    t_start[0] = T0
    slow = in_checkpoint(t_start)
    weights = np.array([30, 4, 60, 8, 10, 3, 5, 2, 1])
    parts = rng.integers(0, 2_000, (n, len(SERVER_BUCKETS))) * weights
    parts[:, SERVER_BUCKETS.index("fsync")] *= np.where(slow, 6, 1)
    parts[:, SERVER_BUCKETS.index("io_write")] *= np.where(slow, 5, 1)
    cols: dict[str, Any] = {"pid": rng.integers(2000, 2008, n), "t_start": t_start}
    for i, b in enumerate(SERVER_BUCKETS):
        cols[b] = parts[:, i]
    cols[UNEXPLAINED] = rng.integers(0, 50, n)
    server = parts.sum(axis=1) + cols[UNEXPLAINED]
    cols["server_ns"] = server
    cols["t_end"] = t_start + server
    rest = parts[:, SERVER_BUCKETS.index("lwlock")].copy()
    for k, name in enumerate(TRANCHES):
        share = rest // 2 if k < len(TRANCHES) - 1 else rest
        cols[f"lwlock:{name}"] = share
        rest = rest - share
    lock = parts[:, SERVER_BUCKETS.index("lock")]
    cols["lock:transactionid"] = lock - lock // 4
    cols["lock:relation"] = lock // 4
    if run:
        cols["t_enqueue"] = t_start - rng.integers(0, 80_000, n)
        queue = rng.integers(0, 20_000, n)
        cols["t_send"] = cols["t_enqueue"] + queue
        transit = t_start - cols["t_send"]
        cols["client_queue"] = queue
        cols["server_wakeup"] = np.minimum(rng.integers(0, 5_000, n), np.maximum(transit, 0))
        cols["request_transit"] = transit - cols["server_wakeup"]
        response = rng.integers(10_000, 40_000, n)
        cols["t_recv"] = cols["t_end"] + response
        cols["client_wakeup"] = response // 3
        cols["response_transit"] = response - cols["client_wakeup"]
        cols["latency_ns"] = cols["t_recv"] - cols["t_enqueue"]
        known = [b for b in E2E_BUCKETS if b != UNEXPLAINED]
        cols["e2e_unexplained"] = cols["latency_ns"] - sum(cols[b] for b in known)
    df = pd.DataFrame(cols).astype("int64")
    df["fingerprint"] = [list(FINGERPRINTS)[i % 3] for i in range(n)]
    return df


def synthetic_timeline(psi_avg10: bool = False) -> list[dict[str, Any]]:
    """1 Hz samples, cumulative counters; FPI bursts right after each checkpoint starts."""
    samples: list[dict[str, Any]] = []
    fpi = records = wal_bytes = cpu_us = io_us = 0
    for k in range(DURATION + 2):
        t = T0 - SEC // 2 + k * SEC
        after_cp = any(0 <= t - cp["start"] < 3 * SEC for cp in CHECKPOINTS)
        fpi += 900 if after_cp else 40
        records += 5000
        wal_bytes += 5000 * 120 + fpi * 8192
        cpu_us += 250_000 if after_cp else 50_000
        io_us += 100_000
        sample: dict[str, Any] = {
            "t": t, "wal_records": float(records), "wal_fpi": float(fpi),
            "wal_bytes": float(wal_bytes), "wal_write": float(k * 300),
            "wal_sync": float(k * 290), "wal_write_time": 0.0, "wal_sync_time": 0.0,
            "checkpoints_timed": float(sum(t >= cp["start"] for cp in CHECKPOINTS)),
            "checkpoints_req": 0.0, "buffers_checkpoint": float(k * 100),
            "buffers_backend": 0.0, "active_backends": 8.0,
            "checkpoint_running": bool(in_checkpoint(np.array([t]))[0]),
        }
        if psi_avg10:
            sample["psi_cpu_some"] = 25.0 if after_cp else 5.0
            sample["psi_io_some"] = 10.0
        else:
            sample["psi_cpu_some_us"] = cpu_us
            sample["psi_io_some_us"] = io_us
        samples.append(sample)
    return samples


def synthetic_header(timeline: bool = True, run: bool = False) -> dict[str, Any]:
    header: dict[str, Any] = {
        "format": 1,
        "tool": "pgtrace 0.1.0",
        "cluster": {"data_dir": "/var/lib/postgresql/16/main", "port": 5432,
                    "postmaster_pid": 4242, "binary": "/usr/lib/postgresql/16/bin/postgres"},
        "server_version": "16.4",
        "kernel": "6.1.0-test-amd64",
        "host": "testhost",
        "started_wall": 1_700_000_000.0,
        "counters": {"requests": 4000, "lost": 2, "unmatched": 7, "overflow": 0},
        "settings": {"synchronous_commit": "on", "wal_sync_method": "fdatasync",
                     "checkpoint_timeout": "30s", "max_wal_size": "1GB",
                     "full_page_writes": "on", "wal_compression": "off",
                     "commit_delay": "0", "shared_buffers": "128MB", "fsync": "on"},
        "duration_s": float(DURATION),
        "lost": 2,
        "unmatched": 7,
        "query_texts": dict(FINGERPRINTS),
    }
    if timeline:
        header["timeline"] = synthetic_timeline()
        header["checkpoints"] = [dict(cp) for cp in CHECKPOINTS]
    if run:
        header["run"] = {"requests": 4000, "errors": 0, "tps": 200.0, "driver_exit": 0}
    return header


def render(items: list[tuple[str, pd.DataFrame, dict[str, Any]]]) -> str:
    out = io.StringIO()
    render_html(items, out)
    return out.getvalue()


def embedded_summary(page: str) -> Any:
    m = re.search(r'<script type="application/json" id="pgtrace-summary">(.*?)</script>',
                  page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def figure_divs(page: str) -> list[str]:
    return re.findall(r'<div id="([^"]+)" class="plotly-graph-div"', page)


@pytest.fixture(scope="module")
def attach_capture() -> tuple[str, pd.DataFrame, dict[str, Any]]:
    return ("/tmp/attach.pgtrace", synthetic_frame(), synthetic_header())


@pytest.fixture(scope="module")
def page(attach_capture: tuple[str, pd.DataFrame, dict[str, Any]]) -> str:
    return render([attach_capture])


def cap(item: tuple[str, pd.DataFrame, dict[str, Any]]) -> Capture:
    path, df, header = item
    return Capture(path, path, df, header, capture_summary(df, header))


# --- one file, no network -----------------------------------------------------------------


def test_one_self_contained_file(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    assert page.count("<html") == 1
    # no script, stylesheet, image or frame is loaded from anywhere: all inline
    assert re.findall(r"<script\b[^>]*\bsrc\s*=", page, re.I) == []
    assert re.findall(r"<(?:link|img|iframe)\b[^>]*(?:src|href)\s*=\s*[\"']?(?:https?:)?//",
                      page, re.I) == []
    assert re.findall(r"@import|url\(\s*[\"']?(?:https?:)?//", page, re.I) == []
    # plotly.js inlined exactly once, before the first figure
    bundle = page.count("window.PlotlyConfig")
    assert bundle == 1
    assert page.index("window.PlotlyConfig") < page.index('class="plotly-graph-div"')
    assert len(page) > 1_000_000  # the bundle is in the file


def test_embedded_summary_equals_summary(
    page: str, attach_capture: tuple[str, pd.DataFrame, dict[str, Any]]
) -> None:
    _p, df, _header = attach_capture
    expected = summary(df, lost=2, unmatched=7, duration_s=DURATION)
    assert embedded_summary(page) == expected
    assert expected["buckets_ns"]["fsync"] > 0
    assert sum(expected["buckets_ns"].values()) == expected["server_ns"]["sum"]


def test_figure_divs_of_an_attach_capture(page: str) -> None:
    ids = figure_divs(page)
    assert ids == ["pgtrace-fig-1-buckets", "pgtrace-fig-2-percentiles", "pgtrace-fig-3-timeline"]
    for i in ids:  # each div has its newPlot call
        assert f'Plotly.newPlot(                        "{i}"' in page or f'"{i}"' in page


def test_tables_carry_the_exact_nanoseconds(
    page: str, attach_capture: tuple[str, pd.DataFrame, dict[str, Any]]
) -> None:
    _p, df, _h = attach_capture
    ns = {int(v) for v in re.findall(r'data-ns="(\d+)"', page)}
    for row in bucket_table(df).to_dict("records"):
        for key in ("total_ns", "mean_ns", "p50_ns", "p99_ns"):
            assert int(row[key]) in ns, (row["bucket"], key)
        assert fmt_ns(row["total_ns"]) in page
    srv = summary(df)["server_ns"]
    for key in ("mean", "p50", "p99", "max", "sum"):
        assert srv[key] in ns
    for w in wait_table(df, "lwlock:", top=30).to_dict("records"):
        assert int(w["total_ns"]) in ns
        assert f"<td>{w['name']}</td>" in page


def test_percentiles_agree_with_bucket_table(
    attach_capture: tuple[str, pd.DataFrame, dict[str, Any]]
) -> None:
    _p, df, _h = attach_capture
    pct = percentiles(df, [(b, b) for b in REPORT_BUCKETS])
    for row in bucket_table(df).to_dict("records"):
        assert pct[row["bucket"]]["p50"] == row["p50_ns"]
        assert pct[row["bucket"]]["p99"] == row["p99_ns"]
        assert row["p50_ns"] <= pct[row["bucket"]]["p90"] <= row["p99_ns"]


def test_metadata_lists_the_write_settings_and_counters(page: str) -> None:
    for name, value in synthetic_header()["settings"].items():
        assert f"<th>setting {name}</th><td>{value}</td>" in page
    assert "<th>server version</th><td>16.4</td>" in page
    assert "<th>kernel</th><td>6.1.0-test-amd64</td>" in page
    assert "<th>lost records</th><td>2</td>" in page
    assert "<th>unmatched waits</th><td>7</td>" in page
    assert "<th>counter overflow</th><td>0</td>" in page
    assert "2023-11-14 22:13:20 UTC" in page


def test_fingerprints_with_escaped_query_text(page: str) -> None:
    for fp, text in FINGERPRINTS.items():
        assert f"<code>{fp}</code>" in page
        assert htmllib.escape(text) in page
    assert "<script>alert(1)</script>" not in page


# --- timeline -----------------------------------------------------------------------------


def _by_name(fig: Any) -> dict[str, Any]:
    return {t.name: t for t in fig.data}


def test_timeline_with_samples_and_checkpoints(
    attach_capture: tuple[str, pd.DataFrame, dict[str, Any]]
) -> None:
    c = cap(attach_capture)
    fig = timeline_figure(c)
    traces = _by_name(fig)
    assert set(traces) == {"tps", "p50 server latency", "p99 server latency", "WAL FPI/s",
                           "CPU pressure (%)", "IO pressure (%)"}
    # tps per second is per_second's request count, at the middle of each second
    rows = per_second(c.df)
    assert list(traces["tps"].y) == [r["requests"] for r in rows]
    assert list(traces["tps"].x) == [r["second"] + 0.5 for r in rows]
    # checkpoints shaded from t0: 5..9 s and 15 s..end of run (still running)
    shapes = [(s.x0, s.x1) for s in fig.layout.shapes]
    end = (max(int(c.df["t_end"].max()), max(s["t"] for s in c.header["timeline"])) - T0) / 1e9
    assert shapes == [(5.0, 9.0), (15.0, end)]
    assert [s.showlegend for s in fig.layout.shapes] == [True, False]
    # WAL FPI/s: the burst after each checkpoint start, on the lower row
    fpi = list(traces["WAL FPI/s"].y)
    assert np.isnan(fpi[0])
    assert max(fpi[1:]) == pytest.approx(900.0)
    assert min(fpi[1:]) == pytest.approx(40.0)
    burst_x = [x for x, y in zip(traces["WAL FPI/s"].x, fpi, strict=True) if y == 900.0]
    assert all(5 <= x < 8 or 15 <= x < 18 for x in burst_x)
    cpu = [v for v in traces["CPU pressure (%)"].y if not np.isnan(v)]
    assert max(cpu) == pytest.approx(25.0) and min(cpu) == pytest.approx(5.0)
    assert traces["CPU pressure (%)"].yaxis == "y4"  # the lower row's second axis
    assert traces["WAL FPI/s"].yaxis == "y3"
    assert traces["p99 server latency"].yaxis == "y2"


def test_timeline_psi_avg10_is_plotted_as_is() -> None:
    header = synthetic_header()
    header["timeline"] = synthetic_timeline(psi_avg10=True)
    fig = timeline_figure(cap(("x", synthetic_frame(500), header)))
    cpu = list(_by_name(fig)["CPU pressure (%)"].y)
    assert sorted(set(cpu)) == [5.0, 25.0]


def test_timeline_psi_total_under_the_short_name_is_a_rate() -> None:
    header = synthetic_header()
    header["timeline"] = [
        {"t": s["t"], "psi_cpu_some": s["psi_cpu_some_us"], "psi_io_some": s["psi_io_some_us"]}
        for s in synthetic_timeline()
    ]
    fig = timeline_figure(cap(("x", synthetic_frame(500), header)))
    cpu = [v for v in _by_name(fig)["CPU pressure (%)"].y if not np.isnan(v)]
    assert max(cpu) == pytest.approx(25.0) and min(cpu) == pytest.approx(5.0)


def test_checkpoints_from_the_timeline_when_the_header_has_none() -> None:
    header = synthetic_header()
    del header["checkpoints"]
    fig = timeline_figure(cap(("x", synthetic_frame(500), header)))
    spans = [(s.x0, s.x1) for s in fig.layout.shapes]
    assert len(spans) == 2
    assert spans[0] == (5.5, 9.5)  # first sample seen running, first seen stopped


def test_without_timeline_or_checkpoints() -> None:
    header = synthetic_header(timeline=False)
    assert "timeline" not in header and "checkpoints" not in header
    item = ("old.pgtrace", synthetic_frame(800), header)
    page = render([item])
    assert len(figure_divs(page)) == 3
    fig = timeline_figure(cap(item))
    assert set(_by_name(fig)) == {"tps", "p50 server latency", "p99 server latency"}
    assert fig.layout.shapes == ()
    assert "<th>timeline samples</th><td>— (not recorded)</td>" in page
    assert embedded_summary(page) == capture_summary(item[1], header)


def test_timeline_without_server_counters() -> None:
    """No DSN: the sampler has PSI only, and samples may carry None."""
    header = synthetic_header()
    header["timeline"] = [{"t": s["t"], "psi_cpu_some_us": s["psi_cpu_some_us"],
                           "psi_io_some_us": None} for s in synthetic_timeline()]
    fig = timeline_figure(cap(("x", synthetic_frame(500), header)))
    assert set(_by_name(fig)) == {"tps", "p50 server latency", "p99 server latency",
                                  "CPU pressure (%)"}


# --- run captures, several captures, edge cases -------------------------------------------


def test_run_capture_has_end_to_end_figures() -> None:
    df = synthetic_frame(run=True)
    page = render([("/tmp/run.pgtrace", df, synthetic_header(run=True))])
    assert figure_divs(page) == [
        "pgtrace-fig-1-buckets", "pgtrace-fig-2-e2e-buckets", "pgtrace-fig-3-percentiles",
        "pgtrace-fig-4-e2e-percentiles", "pgtrace-fig-5-timeline"]
    assert "Where the client&#x27;s time went (end to end)" in page or \
        "Where the client's time went (end to end)" in page
    ns = {int(v) for v in re.findall(r'data-ns="(\d+)"', page)}
    for b in E2E_BUCKETS:
        col = "e2e_unexplained" if b == UNEXPLAINED else b
        assert int(df[col].sum()) in ns
    assert "<th>run tps</th><td>200.0</td>" in page


def test_several_captures_side_by_side() -> None:
    a = ("/data/bigint.pgtrace", synthetic_frame(seed=1), synthetic_header())
    b = ("/data/uuidv4.pgtrace", synthetic_frame(n=3000, seed=2, run=True),
         synthetic_header(timeline=False, run=True))
    page = render([a, b])
    assert embedded_summary(page) == [capture_summary(a[1], a[2]), capture_summary(b[1], b[2])]
    assert figure_divs(page) == [
        "pgtrace-fig-1-buckets", "pgtrace-fig-2-e2e-buckets",
        "pgtrace-fig-3-percentiles-1", "pgtrace-fig-4-timeline-1",
        "pgtrace-fig-5-percentiles-2", "pgtrace-fig-6-e2e-percentiles-2",
        "pgtrace-fig-7-timeline-2"]
    assert "Side by side, bucket by bucket" in page
    assert "#1 bigint.pgtrace mean/req" in page and "#2 uuidv4.pgtrace share" in page
    assert page.count("window.PlotlyConfig") == 1
    # the bucket bars: one horizontal bar per capture in every bucket trace, on one axis
    pg = build_page([cap(a), cap(b)])
    _slug, bars = pg.figures[0]
    assert [t.name for t in bars.data] == list(REPORT_BUCKETS)
    assert all(t.orientation == "h" and len(t.x) == len(t.y) == 2 for t in bars.data)
    assert list(bars.data[0].y) == ["/data/bigint.pgtrace", "/data/uuidv4.pgtrace"]
    ns = [[int(t.customdata[i][0]) for t in bars.data] for i in (0, 1)]
    lengths = [sum(t.x[i] for t in bars.data) for i in (0, 1)]
    assert lengths[0] / lengths[1] == pytest.approx(sum(ns[0]) / sum(ns[1]), rel=1e-6)


def test_stacked_bars_sum_to_the_mean_server_time(
    attach_capture: tuple[str, pd.DataFrame, dict[str, Any]]
) -> None:
    pg = build_page([cap(attach_capture)])
    _slug, bars = pg.figures[0]
    df = attach_capture[1]
    exact = [int(t.customdata[0][0]) for t in bars.data]
    assert exact == [int(r["mean_ns"]) for r in bucket_table(df).to_dict("records")]
    assert abs(sum(exact) - df["server_ns"].mean()) <= len(REPORT_BUCKETS)


@pytest.mark.parametrize("e2e", [False, True])
def test_every_bucket_over_1_percent_is_labelled_once(e2e: bool) -> None:
    """Inside its segment when the label fits, else beside the bar with a leader line."""
    item = ("/tmp/run.pgtrace", synthetic_frame(run=True), synthetic_header(run=True))
    bars = stacked_means_figure([cap(item)], e2e=e2e)
    inside = {t.name for t in bars.data if t.text[0]}
    beside = [str(a.text).split(" ")[0] for a in bars.layout.annotations if a.showarrow]
    assert len(beside) == len(set(beside)) and not inside & set(beside)
    shares = {t.name: float(t.customdata[0][2]) for t in bars.data}
    assert {b for b, pct in shares.items() if pct >= 1.0} <= inside | set(beside), shares
    assert {b for b, pct in shares.items() if pct < 1.0}.isdisjoint(inside | set(beside))
    assert inside and beside  # the synthetic capture has both kinds


def test_empty_capture() -> None:
    df = synthetic_frame(10).iloc[0:0]
    header = synthetic_header(timeline=False)
    page = render([("empty.pgtrace", df, header)])
    assert embedded_summary(page)["requests"] == 0
    assert len(figure_divs(page)) == 3
    assert "No LWLock tranche waits in this capture." in page


def test_no_capture_is_an_error() -> None:
    with pytest.raises(PgtraceError):
        render([])


# --- PNG export ---------------------------------------------------------------------------


def test_png_without_kaleido_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
    attach_capture: tuple[str, pd.DataFrame, dict[str, Any]],
) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    out = io.StringIO()
    with pytest.raises(PgtraceError) as err:
        render_html([attach_capture], out, png_dir=str(tmp_path / "png"))
    line = err.value.line()
    assert "\n" not in line
    assert line.startswith("pgtrace: PNG export needs the kaleido package")
    assert out.getvalue() == ""  # checked before anything is written
    assert not (tmp_path / "png").exists()


def test_png_with_old_kaleido_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
    attach_capture: tuple[str, pd.DataFrame, dict[str, Any]],
) -> None:
    monkeypatch.setattr(metadata, "version", lambda name: "0.2.1")
    with pytest.raises(PgtraceError) as err:
        render_html([attach_capture], io.StringIO(), png_dir=str(tmp_path))
    assert "kaleido >= 1, found 0.2.1" in err.value.line()


def test_png_failure_in_the_browser_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
    attach_capture: tuple[str, pd.DataFrame, dict[str, Any]],
) -> None:
    monkeypatch.setattr(report_html, "_check_png_export", lambda: None)

    def chrome_missing(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("\nKaleido requires Google Chrome to be installed.\n\nEither ...\n")

    monkeypatch.setattr("plotly.io.write_images", chrome_missing)
    with pytest.raises(PgtraceError) as err:
        render_html([attach_capture], io.StringIO(), png_dir=str(tmp_path))
    assert err.value.line() == ("pgtrace: PNG export needs Chrome or Chromium and kaleido "
                                "found none (apt-get install chromium)")


# --- the same capture in JSON, text and HTML ----------------------------------------------


def test_capture_round_trip_agrees_with_json_and_text(tmp_path: Any) -> None:
    from pgtrace.capture import read_capture, write_capture
    from pgtrace.report.offline import json_report
    from pgtrace.report.text import render_text

    header = synthetic_header()
    header["timeline"][3]["wal_fpi"] = None  # a sample the server did not answer
    path = tmp_path / "a.pgtrace"
    write_capture(path, synthetic_frame(), {k: v for k, v in header.items() if k != "format"})
    df, hdr = read_capture(path)
    page = render([(str(path), df, hdr)])
    js = json_report(df, hdr)
    del js["per_fingerprint"], js["per_second"]
    assert embedded_summary(page) == js
    text = io.StringIO()
    render_text(df, capture_summary(df, hdr), text)
    srv = js["server_ns"]
    line = (f"server time: mean {fmt_ns(srv['mean'])}, p50 {fmt_ns(srv['p50'])}, "
            f"p99 {fmt_ns(srv['p99'])}, max {fmt_ns(srv['max'])}")
    assert line in text.getvalue()
    plain = re.sub(r"<[^>]+>", "", page)
    assert line in plain
