"""The HTML report's timeline: tps and latency per second, checkpoints, WAL FPI/s, pressure."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go  # type: ignore[import-untyped]
from plotly.subplots import make_subplots  # type: ignore[import-untyped]

from pgtrace.aggregate import per_second
from pgtrace.capture import Header
from pgtrace.report.common import CHECKPOINT_COLOR, Capture, axis_unit
from pgtrace.report.figures import Figure, base_layout
from pgtrace.report.text import fmt_ns


def _t0(cap: Capture) -> int:
    """Time zero of the timeline: the first request's start (else the first sample)."""
    if len(cap.df):
        return int(cap.df["t_start"].min())
    timeline = cap.header.get("timeline", [])
    return int(timeline[0]["t"]) if timeline else 0


def _samples(header: Header) -> pd.DataFrame:
    """The header's timeline as a frame sorted by t (empty when absent)."""
    rows = header.get("timeline", [])
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    return frame.sort_values("t", kind="stable").reset_index(drop=True)


def _psi_percent(frame: pd.DataFrame, resource: str) -> pd.Series | None:
    """Share of time some task stalled on `resource`, in %, per sample interval.

    ``psi_<r>_some_us`` is the kernel's cumulative total (µs); ``psi_<r>_some`` is
    either the same total (integers, never decreasing) or the avg10 percentage.
    """
    dt_us = frame["t"].astype("float64").diff() / 1e3
    for key in (f"psi_{resource}_some_us", f"psi_{resource}_some"):
        if key not in frame:
            continue
        values = pd.to_numeric(frame[key], errors="coerce").astype("float64")
        if values.isna().all():
            continue
        cumulative = (
            key.endswith("_us")
            or float(values.max()) > 100.0
            or (pd.api.types.is_integer_dtype(frame[key])
                and bool((values.diff().iloc[1:] >= 0).all()))
        )
        if not cumulative:
            return values
        pct = values.diff() / dt_us * 100.0
        return pct.where((pct >= 0) & (dt_us > 0))
    return None


def _rate(frame: pd.DataFrame, key: str) -> pd.Series | None:
    """Per-second rate of a cumulative counter (NaN where it went back, e.g. a stats reset)."""
    if key not in frame:
        return None
    values = pd.to_numeric(frame[key], errors="coerce").astype("float64")
    if values.isna().all():
        return None
    dt_s = frame["t"].astype("float64").diff() / 1e9
    rate = values.diff() / dt_s
    return rate.where((rate >= 0) & (dt_s > 0))


def _checkpoint_spans(cap: Capture, t0: int, samples: pd.DataFrame) -> list[tuple[float, float]]:
    """Checkpoint intervals in seconds from t0; a running one lasts to the end of the run."""
    ends = [t0]
    if len(cap.df):
        ends.append(int(cap.df["t_end"].max()))
    if len(samples):
        ends.append(int(samples["t"].max()))
    last = max(ends)
    spans: list[tuple[float, float]] = []
    if "checkpoints" in cap.header:
        for cp in cap.header["checkpoints"]:
            start = int(cp["start"])
            if start <= 0:
                continue
            end = cp.get("end")
            stop = int(end) if end is not None and end >= start else max(last, start)
            spans.append(((start - t0) / 1e9, (stop - t0) / 1e9))
        return spans
    if len(samples) and "checkpoint_running" in samples:
        running = samples["checkpoint_running"].fillna(False).astype(bool).tolist()
        ts = samples["t"].astype("int64").tolist()
        begin: int | None = None
        for t, on in zip(ts, running, strict=True):
            if on and begin is None:
                begin = t
            elif not on and begin is not None:
                spans.append(((begin - t0) / 1e9, (t - t0) / 1e9))
                begin = None
        if begin is not None:
            spans.append(((begin - t0) / 1e9, (last - t0) / 1e9))
    return spans


def timeline_figure(cap: Capture) -> Figure:
    """tps and p50/p99 server latency per second; checkpoints; WAL FPI/s and pressure."""
    t0 = _t0(cap)
    seconds = per_second(cap.df)
    samples = _samples(cap.header)
    series: dict[str, pd.Series] = {}
    mid: list[float] = []
    if len(samples) > 1:
        t = samples["t"].astype("float64")
        mid = (((t + t.shift(1)) / 2 - t0) / 1e9).tolist()
        for name, s in (("WAL FPI/s", _rate(samples, "wal_fpi")),
                        ("CPU pressure", _psi_percent(samples, "cpu")),
                        ("IO pressure", _psi_percent(samples, "io"))):
            if s is not None and s.notna().any():
                series[name] = s
    rows = 2 if series else 1
    fig = make_subplots(
        rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.1,
        specs=[[{"secondary_y": True}] for _ in range(rows)],
        row_heights=[0.6, 0.4] if rows == 2 else None,
    )
    xs = [r["second"] + 0.5 for r in seconds]
    fig.add_trace(go.Bar(
        name="tps", x=xs, y=[r["requests"] for r in seconds], width=0.9,
        marker_color="#c6dbef", customdata=[r["second"] for r in seconds],
        hovertemplate="second %{customdata}: %{y} requests<extra></extra>",
    ), row=1, col=1, secondary_y=False)
    p99_max = max([1, *(r["server_ns"]["p99"] for r in seconds)])
    unit, scale = axis_unit(p99_max)
    for p, color, dash in (("p50", "#4c78a8", "solid"), ("p99", "#e45756", "solid")):
        ys = [r["server_ns"][p] for r in seconds]
        fig.add_trace(go.Scatter(
            name=f"{p} server latency", x=xs, y=[v / scale for v in ys], mode="lines+markers",
            line={"color": color, "dash": dash, "width": 2}, marker={"size": 4},
            customdata=[[v, fmt_ns(v)] for v in ys],
            hovertemplate=f"{p} %{{customdata[1]}} (%{{customdata[0]}} ns)<extra></extra>",
        ), row=1, col=1, secondary_y=True)
    styles = {"WAL FPI/s": ("#54a24b", False, "solid"),
              "CPU pressure": ("#b279a2", True, "solid"),
              "IO pressure": ("#9d755d", True, "dot")}
    for name, s in series.items():
        color, secondary, dash = styles[name]
        unit_text = "%" if secondary else "/s"
        fig.add_trace(go.Scatter(
            name=name + (" (%)" if secondary else ""), x=mid, y=s.tolist(),
            mode="lines+markers", line={"color": color, "dash": dash, "width": 2},
            marker={"size": 4}, connectgaps=False,
            hovertemplate=f"{name}: %{{y:.1f}}{unit_text}<extra></extra>",
        ), row=2, col=1, secondary_y=secondary)
    for i, (x0, x1) in enumerate(_checkpoint_spans(cap, t0, samples)):
        # one band over both rows (and the gap between them), in the x of the shared axis
        fig.add_shape(type="rect", xref="x", yref="paper", x0=x0, x1=max(x1, x0 + 0.05), y0=0,
                      y1=1, fillcolor=CHECKPOINT_COLOR, opacity=0.25, line_width=0,
                      layer="below", name="checkpoint", legendgroup="checkpoint",
                      showlegend=i == 0)
    base_layout(fig, f"Timeline per second — {cap.label}", 620 if rows == 2 else 420)
    fig.update_layout(bargap=0.1, margin={"t": 90})
    fig.update_yaxes(title_text="requests/s (tps)", rangemode="tozero", row=1, col=1,
                     secondary_y=False)
    fig.update_yaxes(title_text=f"server latency ({unit})", rangemode="tozero", row=1, col=1,
                     secondary_y=True, showgrid=False, tickmode="auto")
    if rows == 2:
        fig.update_yaxes(title_text="WAL FPI/s", rangemode="tozero", row=2, col=1,
                         secondary_y=False)
        fig.update_yaxes(title_text="pressure (% of time)", rangemode="tozero", row=2, col=1,
                         secondary_y=True, showgrid=False, tickmode="auto")
    fig.update_xaxes(title_text="seconds since the first request", row=rows, col=1)
    return fig

