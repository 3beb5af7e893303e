"""The HTML report: one self-contained page of plotly figures and tables.

Everything the page needs is in the file: plotly.js is inlined once (before the
first figure), there are no stylesheets, fonts or scripts from the network. The
engine summary of each capture is embedded as JSON in
``<script type="application/json" id="pgtrace-summary">`` (one capture: the
summary object; several: a list, in the order given), and every nanosecond
figure in the tables carries its exact value in ``data-ns``.

Figures, in page order: mean time per request by bucket (one horizontal bar per capture),
the same by end-to-end bucket (captures of `pgtrace run`), and per capture: server
latency percentiles per bucket, end-to-end percentiles (run captures), and the
timeline per second (tps, p50/p99 server latency, checkpoints shaded, WAL FPI/s
and CPU/IO pressure when the capture has a timeline).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
import plotly.graph_objects as go  # type: ignore[import-untyped]
import plotly.io as pio  # type: ignore[import-untyped]
from plotly.subplots import make_subplots  # type: ignore[import-untyped]

from pgtrace import __version__
from pgtrace.aggregate import (
    bucket_table,
    capture_summary,
    compare_table,
    per_fingerprint,
    per_second,
    stats,
    wait_table,
)
from pgtrace.e2e import e2e_table, tail_shares
from pgtrace.errors import PgtraceError, SetupError
from pgtrace.model import (
    E2E_BUCKETS,
    LOCK_PREFIX,
    LWLOCK_PREFIX,
    REPORT_BUCKETS,
    UNEXPLAINED,
)
from pgtrace.report.folded import flame_svg
from pgtrace.report.text import fmt_ns, incomplete_lines

Figure = Any  # plotly ships no type information

#: Settings that matter for writes, shown first in the metadata (then any others recorded).
KEY_SETTINGS: tuple[str, ...] = (
    "synchronous_commit",
    "wal_sync_method",
    "checkpoint_timeout",
    "max_wal_size",
    "full_page_writes",
    "wal_compression",
    "commit_delay",
    "shared_buffers",
)

#: One colour per bucket, the same in every figure.
COLORS: dict[str, str] = {
    "cpu": "#4c78a8",
    "runqueue": "#9ecae9",
    "fsync": "#e45756",
    "wal_write": "#ff9d98",
    "lwlock": "#f58518",
    "lock": "#ffbf79",
    "io_read": "#54a24b",
    "io_write": "#88d27a",
    "other_wait": "#b279a2",
    UNEXPLAINED: "#bab0ac",
    "client_queue": "#72b7b2",
    "request_transit": "#eeca3b",
    "server_wakeup": "#d67195",
    "response_transit": "#9d755d",
    "client_wakeup": "#ff9da6",
}
PERCENTILES: tuple[tuple[str, float, str], ...] = (
    ("p50", 0.5, "#9ecae9"),
    ("p90", 0.9, "#4c78a8"),
    ("p99", 0.99, "#1d3557"),
)
CHECKPOINT_COLOR = "#f4a261"
PNG_WIDTH = 1200
PLOT_CONFIG: dict[str, Any] = {"displaylogo": False, "responsive": True}
#: Columns every capture of `pgtrace run` has (the end-to-end split).
E2E_MARKERS = ("latency_ns", "client_queue", "e2e_unexplained")


@dataclass
class Capture:
    """One capture as the page shows it."""

    label: str
    path: str
    df: pd.DataFrame
    header: dict[str, Any]
    summary: dict[str, Any]

    @property
    def is_run(self) -> bool:
        return all(c in self.df.columns for c in E2E_MARKERS)



# --- small helpers ------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _int(x: Any) -> int:
    """As aggregate.stats rounds: NaN is 0."""
    return round(float(x)) if pd.notna(x) else 0


def _ns_cell(ns: float) -> str:
    exact = _int(ns)
    return f'<td class="num" data-ns="{exact}" title="{exact} ns">{_e(fmt_ns(ns))}</td>'


def _pct_cell(share: float) -> str:
    return f'<td class="num">{share * 100:.1f}%</td>'


def _num_cell(value: object) -> str:
    return f'<td class="num">{_e(value)}</td>'


def _table(head: Iterable[str], rows: Iterable[str], cls: str = "") -> str:
    ths = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(f"<tr>{r}</tr>" for r in rows)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>"


def _unit(max_ns: float) -> tuple[str, float]:
    """An axis unit for values up to max_ns: (name, nanoseconds per unit)."""
    if max_ns >= 10e9:
        return "s", 1e9
    if max_ns >= 1e6:
        return "ms", 1e6
    if max_ns >= 1e3:
        return "µs", 1e3
    return "ns", 1.0


def _json_script(element_id: str, value: Any) -> str:
    """JSON inside a script element: '<', '>' and '&' escaped so nothing can close it."""
    text = json.dumps(value, indent=1, sort_keys=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _labels(paths: list[str]) -> list[str]:
    if len(paths) == 1:
        return [os.path.basename(paths[0]) or paths[0]]
    return [f"#{i + 1} {os.path.basename(p) or p}" for i, p in enumerate(paths)]


def _e2e_column(bucket: str) -> str:
    return "e2e_unexplained" if bucket == UNEXPLAINED else bucket


def _base_layout(fig: Figure, title: str, height: int) -> None:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 70, "t": 60, "b": 50},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.01, "x": 1, "xanchor": "right"},
        hoverlabel={"namelength": -1},
        font={"family": "system-ui, -apple-system, 'Segoe UI', sans-serif", "size": 12},
    )


# --- figures ------------------------------------------------------------------------------


def _means(df: pd.DataFrame, columns: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Mean ns per request of each (bucket, column), as bucket_table rounds it."""
    return {b: float(_int(df[c].mean())) if len(df) else 0.0 for b, c in columns}


#: The mean-per-request figures: a bar's thickness, a level of labels beside it, and the
#: least plot height per capture (px); the plot width and the width of a label's
#: character assumed to place the labels (px).
BAR_PX = 56
LEVEL_PX = 18
ROW_PX = 150
PLOT_PX = 1050
CHAR_PX = 6.5
CALLOUT_MIN_SHARE = 0.01  # below this, a segment is named by the legend and hover only
MIN_HEIGHT = 400  # px, of every figure (as the PNG export draws them)


@dataclass
class _Segment:
    """One bucket's part of one capture's bar, in axis units."""

    bucket: str
    start: float
    width: float
    ns: float
    share: float

    @property
    def label(self) -> str:
        return f"{self.bucket} {fmt_ns(self.ns)} · {self.share * 100:.0f}%"

    @property
    def mid(self) -> float:
        return self.start + self.width / 2

    def fits(self, px: float) -> bool:
        """Whether its two-line label fits inside it, at `px` axis units per pixel."""
        text = max(len(self.bucket), len(self.label) - len(self.bucket) - 1)
        return self.width / px >= text * CHAR_PX + 10

    def half(self, px: float) -> float:
        """Half the width of its one-line label beside the bar, with a margin."""
        return (len(self.label) * CHAR_PX / 2 + 6) * px


@dataclass
class _Callout:
    """A label beside a bar: side (1 below, -1 above), level (0 nearest), its centre."""

    seg: _Segment
    side: int
    level: int
    center: float


def _spread(segs: list[_Segment], px: float, span: float) -> list[float] | None:
    """Label centres in [0, span], in the segments' order, as near their segments as
    they can be without overlapping; None when they cannot all fit."""
    halves = [s.half(px) for s in segs]
    centers: list[float] = []
    for s, h in zip(segs, halves, strict=True):
        x = max(s.mid, h)
        if centers:
            x = max(x, centers[-1] + halves[len(centers) - 1] + h)
        centers.append(x)
    for i in reversed(range(len(centers))):
        bound = span - halves[i] if i == len(centers) - 1 else (
            centers[i + 1] - halves[i + 1] - halves[i])
        centers[i] = min(centers[i], bound)
    return centers if not centers or centers[0] >= halves[0] - 1e-9 else None


def place_callouts(segments: list[_Segment], px: float, span: float) -> list[_Callout]:
    """Labels beside the bar for segments over 1% too narrow to hold their own.

    Left to right they go below and above in turn, each side on one level (two
    when its labels are wider than the plot), spread apart with leader lines to
    their segments. Where even so they cannot all fit, the smallest lose theirs
    (the legend and hover still name them).
    """
    narrow = [s for s in segments if s.share >= CALLOUT_MIN_SHARE and not s.fits(px)]
    out: list[_Callout] = []
    for k, side in enumerate((1, -1)):
        mine = narrow[k::2]
        levels = 1 if sum(2 * s.half(px) for s in mine) <= span else 2
        for level in range(levels):
            row = mine[level::levels]
            centers = _spread(row, px, span)
            while centers is None:
                row.remove(min(row, key=lambda s: s.share))
                centers = _spread(row, px, span)
            out += [_Callout(s, side, level, c) for s, c in zip(row, centers, strict=True)]
    return out


def _legend_rows(names: Iterable[str]) -> int:
    """Rows of a horizontal legend of these names across the plot: one when all fit,
    else plotly lines the entries up in columns as wide as the widest."""
    widths = [40 + CHAR_PX * len(n) for n in names]
    if sum(widths) <= PLOT_PX:
        return 1
    return -(-len(widths) // max(1, int(PLOT_PX // max(widths))))


def stacked_means_figure(caps: list[Capture], e2e: bool) -> Figure:
    """Mean time per request, one horizontal bar per capture stacked by bucket.

    Left to right in bucket order (end to end: from the request's enqueue in the
    driver to its reply), on one axis for every capture. A segment is labelled
    inside when its label fits, else beside the bar (from 1% of the total); the
    total stands at the bar's end.
    """
    buckets = E2E_BUCKETS if e2e else REPORT_BUCKETS
    cols = [(b, _e2e_column(b) if e2e else b) for b in buckets]
    means = {c.label: _means(c.df, cols) for c in caps}
    totals = {c.label: (_int(c.df["latency_ns" if e2e else "server_ns"].mean())
                        if len(c.df) else 0) for c in caps}
    top = max([*totals.values(), 1])
    unit, scale = _unit(top)
    span = top / scale * 1.08
    px = span / PLOT_PX
    fig = go.Figure()
    bars: dict[str, list[_Segment]] = {}
    for c in caps:
        start, bars[c.label] = 0.0, []
        for b in buckets:
            v, total = means[c.label][b], totals[c.label]
            bars[c.label].append(_Segment(b, start, v / scale, v, v / total if total else 0.0))
            start += v / scale
    callouts = {c.label: place_callouts(bars[c.label], px, span) for c in caps}
    levels = max([0, *(o.level + 1 for cs in callouts.values() for o in cs)])
    row = max(ROW_PX, BAR_PX + 2 * (levels * LEVEL_PX + 16))
    for c in caps:
        for o in callouts[c.label]:
            # from the bar's edge at the segment's middle to the label, a leader line
            fig.add_annotation(x=o.seg.mid, y=c.label, yshift=-o.side * BAR_PX / 2,
                               ax=(o.center - o.seg.mid) / px,
                               ay=o.side * (16 + o.level * LEVEL_PX), showarrow=True,
                               arrowhead=0, arrowwidth=1, arrowcolor="#8a94a0",
                               text=o.seg.label, font={"size": 11})
    y = [c.label for c in caps]
    for i, b in enumerate(buckets):
        segs = [bars[c.label][i] for c in caps]
        fig.add_trace(go.Bar(
            name=b, orientation="h", y=y, x=[s.width for s in segs], marker_color=COLORS.get(b),
            text=[f"{b}<br>{s.label[len(b) + 1:]}" if s.fits(px) else "" for s in segs],
            textposition="inside", insidetextanchor="middle", textangle=0,
            customdata=[[_int(s.ns), fmt_ns(s.ns), s.share * 100] for s in segs],
            hovertemplate=(f"<b>{b}</b><br>%{{y}}<br>mean %{{customdata[1]}} "
                           "(%{customdata[0]} ns), %{customdata[2]:.1f}%<extra></extra>"),
        ))
    for c in caps:
        fig.add_annotation(x=totals[c.label] / scale, y=c.label, xanchor="left", xshift=6,
                           showarrow=False, text=f"<b>{fmt_ns(totals[c.label])}</b>")
    what = "client latency, end to end" if e2e else "server time"
    top_px = 58 + LEVEL_PX * _legend_rows(buckets)  # the title, then the legend's rows
    height = max(MIN_HEIGHT, top_px + 60 + row * len(caps))  # the room left goes to the rows
    _base_layout(fig, f"Mean {what} per request, by bucket", height)
    fig.update_layout(
        title={"yref": "container", "y": 1, "yanchor": "top", "pad": {"t": 14}},
        barmode="stack", bargap=1 - BAR_PX * len(caps) / (height - top_px - 60),
        uniformtext={"minsize": 11, "mode": "hide"},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 0, "xanchor": "left",
                "traceorder": "normal"},
        margin={"t": top_px, "l": 20, "r": 30, "b": 60},
    )
    along = "from the driver's enqueue (left) to the reply" if e2e else "in bucket order"
    fig.update_xaxes(title_text=f"mean per request ({unit}), {along}", range=[0, span])
    fig.update_yaxes(autorange="reversed", automargin=True, showgrid=False)
    return fig


def percentiles(df: pd.DataFrame, columns: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """label -> {p50, p90, p99} in ns, rounded as aggregate.stats rounds."""
    out: dict[str, dict[str, int]] = {}
    if df.empty:
        return {label: {p: 0 for p, _q, _c in PERCENTILES} for label, _col in columns}
    qs = [q for _p, q, _c in PERCENTILES]
    table = df[[col for _label, col in columns]].quantile(qs)
    for label, col in columns:
        values = table[col].tolist()
        out[label] = {p: _int(v) for (p, _q, _c), v in zip(PERCENTILES, values, strict=True)}
    return out


def _log_toggle() -> list[dict[str, Any]]:
    return [{
        "type": "buttons", "direction": "left", "x": 0, "xanchor": "left", "y": 1.0,
        "yanchor": "bottom", "pad": {"b": 4}, "showactive": True,
        "buttons": [
            {"label": "linear", "method": "relayout", "args": [{"yaxis.type": "linear"}]},
            {"label": "log", "method": "relayout", "args": [{"yaxis.type": "log"}]},
        ],
    }]


def percentiles_figure(cap: Capture, e2e: bool) -> Figure:
    """p50/p90/p99 of the whole request and of each bucket, grouped bars."""
    if e2e:
        cols = [("client latency", "latency_ns"), *((b, _e2e_column(b)) for b in E2E_BUCKETS)]
    else:
        cols = [("server time", "server_ns"), *((b, b) for b in REPORT_BUCKETS)]
    pct = percentiles(cap.df, cols)
    unit, scale = _unit(max([1, *(v["p99"] for v in pct.values())]))
    fig = go.Figure()
    x = [label for label, _col in cols]
    for p, _q, color in PERCENTILES:
        ys = [pct[label][p] for label in x]
        fig.add_trace(go.Bar(
            name=p, x=x, y=[v / scale for v in ys], marker_color=color,
            customdata=[[v, fmt_ns(v)] for v in ys],
            hovertemplate=f"<b>%{{x}}</b> {p}: %{{customdata[1]}} (%{{customdata[0]}} ns)"
                          "<extra></extra>",
        ))
    what = "End-to-end latency percentiles" if e2e else "Server latency percentiles"
    _base_layout(fig, f"{what} per bucket — {cap.label}", 440)
    fig.update_layout(barmode="group", updatemenus=_log_toggle(), margin={"t": 90})
    fig.update_yaxes(title_text=unit, rangemode="tozero")
    return fig


def _t0(cap: Capture) -> int:
    """Time zero of the timeline: the first request's start (else the first sample)."""
    if len(cap.df):
        return int(cap.df["t_start"].min())
    for sample in cap.header.get("timeline") or []:
        if isinstance(sample, dict) and isinstance(sample.get("t"), int | float):
            return int(sample["t"])
    return 0


def _samples(header: dict[str, Any]) -> pd.DataFrame:
    """The header's timeline as a frame sorted by t (empty when absent or malformed)."""
    raw = header.get("timeline")
    if not isinstance(raw, list):
        return pd.DataFrame()
    rows = [s for s in raw if isinstance(s, dict) and isinstance(s.get("t"), int | float)]
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
    raw = cap.header.get("checkpoints")
    if isinstance(raw, list):
        for cp in raw:
            if not isinstance(cp, dict) or not isinstance(cp.get("start"), int | float):
                continue
            start = int(cp["start"])
            if start <= 0:
                continue
            end = cp.get("end")
            stop = int(end) if isinstance(end, int | float) and end >= start else max(last, start)
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
    unit, scale = _unit(p99_max)
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
    _base_layout(fig, f"Timeline per second — {cap.label}", 620 if rows == 2 else 420)
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


# --- tables -------------------------------------------------------------------------------


def _headline(cap: Capture) -> str:
    s = cap.summary
    dur = s.get("duration_s") or 0.0
    rate = s["requests"] / dur if dur else 0.0
    srv = s["server_ns"]

    def span(key: str) -> str:
        v = int(srv[key])
        return f'{key} <b data-ns="{v}" title="{v} ns">{_e(fmt_ns(v))}</b>'

    parts = [
        f"<b>{s['requests']}</b> requests in <b>{dur:.1f} s</b> ({rate:.0f}/s)",
        "server time: " + ", ".join(span(k) for k in ("mean", "p50", "p99", "max")),
        f"lost records: <b>{s['lost']}</b>, unmatched waits: <b>{s['unmatched']}</b>",
        *(_e(line) for line in incomplete_lines(s)),
    ]
    return '<p class="headline">' + "<br>".join(parts) + "</p>"


def bucket_rows(df: pd.DataFrame) -> list[str]:
    """Where the server time went: the text report's table plus p90 and a total row."""
    p90 = percentiles(df, [(b, b) for b in (*REPORT_BUCKETS, "server_ns")])
    rows = []
    for r in bucket_table(df).to_dict("records"):
        b = str(r["bucket"])
        rows.append(
            f'<td><span class="sw" style="background:{COLORS.get(b, "#999")}"></span>{_e(b)}'
            f"</td>{_ns_cell(r['total_ns'])}{_pct_cell(r['share'])}{_ns_cell(r['mean_ns'])}"
            f"{_ns_cell(r['p50_ns'])}{_ns_cell(p90[b]['p90'])}{_ns_cell(r['p99_ns'])}"
        )
    srv = stats(df["server_ns"]) if len(df) else stats(pd.Series(dtype="int64"))
    rows.append(
        f"<td><b>server time</b></td>{_ns_cell(srv['sum'])}"
        f"{_pct_cell(1.0 if srv['sum'] else 0.0)}{_ns_cell(srv['mean'])}{_ns_cell(srv['p50'])}"
        f"{_ns_cell(p90['server_ns']['p90'])}{_ns_cell(srv['p99'])}"
    )
    return rows


def _e2e_rows(df: pd.DataFrame) -> list[str]:
    shares = tail_shares(df)
    rows = []
    for r in e2e_table(df).to_dict("records"):
        b = str(r["bucket"])
        rows.append(
            f'<td><span class="sw" style="background:{COLORS.get(b, "#999")}"></span>{_e(b)}'
            f"</td>{_ns_cell(r['total_ns'])}{_pct_cell(r['share'])}{_ns_cell(r['p50_ns'])}"
            f"{_ns_cell(r['p99_ns'])}{_pct_cell(shares.get(b, 0.0))}"
        )
    return rows


def _fingerprint_section(cap: Capture) -> str:
    rows = per_fingerprint(cap.df)
    if not rows:
        return '<p class="none">No query fingerprints in this capture.</p>'
    texts = cap.header.get("query_texts") or {}
    total = int(cap.summary["server_ns"]["sum"])
    out = []
    for r in rows:
        fp = r["fingerprint"]
        text = texts.get(fp) if isinstance(texts, dict) else None
        if text:
            short = text if len(text) <= 160 else text[:157] + "…"
            query = f'<td class="q" title="{_e(text)}"><code>{_e(short)}</code></td>'
        else:
            query = '<td class="q none">(no query text recorded)</td>'
        bsum = sum(int(v) for v in r["buckets_ns"].values())
        top = sorted(r["buckets_ns"].items(), key=lambda kv: -int(kv[1]))[:3]
        mix = ", ".join(f"{b} {int(v) / bsum * 100:.0f}%" for b, v in top if bsum and int(v))
        srv = r["server_ns"]
        out.append(
            f"<td><code>{_e(fp)}</code></td>{query}{_num_cell(r['requests'])}"
            f"{_ns_cell(srv['sum'])}{_pct_cell(srv['sum'] / total if total else 0.0)}"
            f"{_ns_cell(srv['mean'])}{_ns_cell(srv['p50'])}{_ns_cell(srv['p99'])}"
            f"{_ns_cell(srv['max'])}<td>{_e(mix)}</td>"
        )
    return _table(["fingerprint", "query", "requests", "total", "share", "mean", "p50", "p99",
                   "max", "top buckets"], out, "wide")


def _wait_section(cap: Capture, prefix: str, what: str) -> str:
    waits = wait_table(cap.df, prefix, top=30) if len(cap.df) else pd.DataFrame()
    if waits.empty:
        return f'<p class="none">No {what} waits in this capture.</p>'
    rows = [
        f"<td>{_e(w['name'])}</td>{_ns_cell(w['total_ns'])}{_pct_cell(w['share'])}"
        f"{_num_cell(w['requests'])}"
        for w in waits.to_dict("records")
    ]
    return _table([what, "total", "share of server time", "requests that waited"], rows)


def _metadata_rows(cap: Capture) -> list[tuple[str, str]]:
    h = cap.header
    out: list[tuple[str, str]] = [("capture", cap.path)]
    for key, name in (("tool", "recorded by"), ("server_version", "server version"),
                      ("kernel", "kernel"), ("host", "host")):
        out.append((name, str(h.get(key, "—"))))
    cluster = h.get("cluster")
    if isinstance(cluster, dict):
        for key in ("data_dir", "port", "postmaster_pid", "binary"):
            if key in cluster:
                out.append((f"cluster {key}", str(cluster[key])))
    if h.get("cluster_note"):
        out.append(("cluster", str(h["cluster_note"])))
    started = h.get("started_wall")
    if isinstance(started, int | float):
        when = dt.datetime.fromtimestamp(float(started), tz=dt.UTC)
        out.append(("started", when.strftime("%Y-%m-%d %H:%M:%S UTC")))
    out.append(("duration", f"{float(h.get('duration_s', 0.0) or 0.0):.3f} s"))
    out.append(("lost records", str(h.get("lost", 0))))
    out.append(("unmatched waits", str(h.get("unmatched", 0))))
    settings = h.get("settings")
    if not isinstance(settings, dict):
        settings = {}
    for name in KEY_SETTINGS:
        out.append((f"setting {name}", str(settings.get(name, "— (not recorded)"))))
    for name in sorted(k for k in settings if k not in KEY_SETTINGS):
        out.append((f"setting {name}", str(settings[name])))
    counters = h.get("counters")
    if isinstance(counters, dict):
        for name, value in counters.items():
            out.append((f"counter {name}", str(value)))
    run = h.get("run")
    if isinstance(run, dict):
        for key in ("requests", "errors", "tps", "driver_exit"):
            if key in run:
                value = run[key]
                out.append((f"run {key}", f"{value:.1f}" if isinstance(value, float)
                            else str(value)))
    samples = h.get("timeline")
    out.append(("timeline samples", str(len(samples)) if isinstance(samples, list)
                else "— (not recorded)"))
    cps = h.get("checkpoints")
    out.append(("checkpoints seen", str(len(cps)) if isinstance(cps, list)
                else "— (not recorded)"))
    if h.get("timeline_error"):
        out.append(("timeline error", str(h["timeline_error"])))
    return out


def _metadata_section(caps: list[Capture]) -> str:
    """One column per capture, rows in a fixed order (rows only some captures have go last)."""
    per = [dict(_metadata_rows(c)) for c in caps]
    names: list[str] = []
    for c in caps:
        for k, _v in _metadata_rows(c):
            if k not in names:
                names.append(k)
    rows = [f"<th>{_e(k)}</th>" + "".join(f"<td>{_e(p.get(k, '—'))}</td>" for p in per)
            for k in names]
    head = ["", *(c.label for c in caps)] if len(caps) > 1 else ["", "value"]
    return _table(head, rows, "meta")


def _compare_section(caps: list[Capture]) -> str:
    cmp = compare_table({c.label: c.df for c in caps})
    head = ["bucket", *(f"{c.label} mean/req" for c in caps), *(f"{c.label} share"
                                                                  for c in caps)]
    rows = []
    for key, name in (("requests", "requests"),):
        rows.append(f"<td><b>{name}</b></td>"
                    + "".join(_num_cell(c.summary[key]) for c in caps)
                    + "<td></td>" * len(caps))
    for stat in ("mean", "p50", "p99"):
        rows.append(f"<td><b>server time {stat}</b></td>"
                    + "".join(_ns_cell(c.summary["server_ns"][stat]) for c in caps)
                    + "<td></td>" * len(caps))
    for r in cmp.to_dict("records"):
        b = str(r["bucket"])
        rows.append(
            f'<td><span class="sw" style="background:{COLORS.get(b, "#999")}"></span>{_e(b)}'
            "</td>" + "".join(_ns_cell(r[f"{c.label} mean_ns"]) for c in caps)
            + "".join(_pct_cell(r[f"{c.label} share"]) for c in caps)
        )
    return _table(head, rows, "wide")


# --- the page -----------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0;
       color: #1d2733; background: #f6f7f9; }
main { max-width: 1320px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 24px; margin: 8px 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-top: 8px; border-top: 2px solid #d8dde3; }
h3 { font-size: 15px; margin: 20px 0 6px; }
.sub { color: #5b6673; margin: 0 0 8px; }
nav a { margin-right: 14px; color: #2b5797; }
.card { background: #fff; border: 1px solid #e1e5ea; border-radius: 6px; padding: 8px 12px;
        margin: 10px 0; overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eceff2; text-align: left;
         vertical-align: top; }
thead th { background: #eef1f5; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.meta th { font-weight: 500; color: #4a5563; white-space: nowrap; }
td.q code { white-space: pre-wrap; word-break: break-word; }
td.q { max-width: 520px; }
.none { color: #8a94a0; font-style: italic; }
.headline { font-size: 14px; line-height: 1.6; margin: 6px 0; }
.sw { display: inline-block; width: 10px; height: 10px; margin-right: 6px;
      border-radius: 2px; }
footer { color: #8a94a0; font-size: 12px; margin-top: 40px; }
"""


class _Page:
    """Parts of the page in order; the first figure placed carries plotly.js."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.figures: list[tuple[str, Figure]] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, slug: str, fig: Figure) -> None:
        n = len(self.figures) + 1
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=n == 1,
            div_id=f"pgtrace-fig-{n}-{slug}",
            config=dict(PLOT_CONFIG, toImageButtonOptions={"filename": f"{n:02d}-{slug}"}),
        )
        self.figures.append((slug, fig))
        self.parts.append(f'<div class="card fig">{div}</div>')


def _slug(i: int, several: bool) -> str:
    return f"-{i + 1}" if several else ""


def _flame_section(cap: Capture) -> str:
    """On-CPU and off-CPU flame graphs when the capture has stacks (attach --stacks)."""
    stacks = cap.header.get("stacks") or {}
    if not stacks.get("oncpu") and not stacks.get("offcpu"):
        return ""
    parts = ['<h3>Flame graphs</h3><div class="card flame">']
    if stacks.get("oncpu"):
        parts.append(flame_svg(stacks["oncpu"], title=f"on-CPU ({stacks.get('hz', 99)} Hz "
                               "samples inside requests)", unit="samples"))
    if stacks.get("offcpu"):
        parts.append(flame_svg(stacks["offcpu"], title="off-CPU (time blocked, by bucket)",
                               unit="ns"))
    parts.append("</div>")
    return "".join(parts)


def build_page(caps: list[Capture]) -> _Page:
    """The whole page; figures are kept for PNG export."""
    several = len(caps) > 1
    page = _Page()
    page.add('<main><h1>pgtrace report</h1><p class="sub">'
             + " · ".join(f"{_e(c.label)}: {c.summary['requests']} requests" for c in caps)
             + "</p>")
    nav = [("overview", "Overview")]
    for i, c in enumerate(caps):
        nav.append((f"capture{_slug(i, True)}", c.label if several else "Details"))
    nav.append(("metadata", "Run metadata"))
    page.add("<nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav) + "</nav>")
    summaries: Any = [c.summary for c in caps] if several else caps[0].summary
    page.add(_json_script("pgtrace-summary", summaries))

    page.add('<h2 id="overview">Overview</h2>')
    if not several:
        page.add(f'<div class="card">{_headline(caps[0])}</div>')
    page.figure("buckets", stacked_means_figure(caps, e2e=False))
    runs = [c for c in caps if c.is_run]
    if runs:
        page.figure("e2e-buckets", stacked_means_figure(runs, e2e=True))
    if several:
        page.add('<h3>Side by side, bucket by bucket</h3><div class="card">'
                 + _compare_section(caps) + "</div>")

    for i, c in enumerate(caps):
        sfx = _slug(i, several)
        title = f"Capture {_e(c.label)}" if several else "Details"
        page.add(f'<h2 id="capture{_slug(i, True)}">{title}</h2>')
        if several:
            page.add(f'<div class="card">{_headline(c)}</div>')
        page.add('<h3>Where the server time went</h3><div class="card">' + _table(
            ["bucket", "total", "share", "mean/req", "p50", "p90", "p99"], bucket_rows(c.df))
            + "</div>")
        page.figure(f"percentiles{sfx}", percentiles_figure(c, e2e=False))
        if c.is_run:
            page.add("<h3>Where the client's time went (end to end)</h3><div class=\"card\">"
                     + _table(["bucket", "total", "share", "p50", "p99", "share of p99 tail"],
                              _e2e_rows(c.df)) + "</div>")
            page.figure(f"e2e-percentiles{sfx}", percentiles_figure(c, e2e=True))
        page.figure(f"timeline{sfx}", timeline_figure(c))
        page.add('<h3>Per query fingerprint</h3><div class="card">'
                 + _fingerprint_section(c) + "</div>")
        page.add('<h3>LWLock tranches</h3><div class="card">'
                 + _wait_section(c, LWLOCK_PREFIX, "LWLock tranche") + "</div>")
        page.add('<h3>Lock types</h3><div class="card">'
                 + _wait_section(c, LOCK_PREFIX, "lock type") + "</div>")
        page.add(_flame_section(c))

    page.add('<h2 id="metadata">Run metadata</h2><div class="card">'
             + _metadata_section(caps) + "</div>")
    page.add(f"<footer>pgtrace {__version__} · figures by plotly, inlined: "
             "this page needs no network.</footer></main>")
    return page


def _document(page: _Page, caps: list[Capture]) -> str:
    title = "pgtrace report: " + ", ".join(c.label for c in caps)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(page.parts)
        + "\n</body>\n</html>\n"
    )


# --- PNG export ---------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def _check_png_export() -> None:
    """kaleido >= 1 importable; it draws with a Chrome/Chromium found on this machine."""
    hint = "pip install 'kaleido>=1' and apt-get install chromium"
    try:
        version = metadata.version("kaleido")
    except metadata.PackageNotFoundError:
        raise SetupError("PNG export needs the kaleido package", hint) from None
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) < 1:
        raise SetupError(f"PNG export needs kaleido >= 1, found {version}", hint)
    try:
        import kaleido  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        raise SetupError(f"PNG export: kaleido cannot be imported ({_one_line(exc)})",
                                hint) from None


def png_names(page: _Page) -> list[str]:
    """File names of the figures' PNGs, in page order."""
    return [f"{n:02d}-{slug}.png" for n, (slug, _f) in enumerate(page.figures, 1)]


def export_png(page: _Page, png_dir: str) -> list[Path]:
    """Each figure as PNG in png_dir (created); one PgtraceError line when that fails."""
    _check_png_export()
    out = Path(png_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PgtraceError(f"cannot create the PNG directory {out}: {exc.strerror}") from None
    paths = [out / name for name in png_names(page)]
    figs = [f for _slug, f in page.figures]
    heights = [int(f.layout.height or 500) for f in figs]
    try:
        pio.write_images(figs, paths, format="png", width=PNG_WIDTH, height=heights)
    except Exception as exc:  # kaleido/Chromium fail in many ways; each is one line here
        reason = _one_line(exc)
        if "chrome" in reason.lower() and ("not found" in reason.lower()
                                           or "requires google chrome" in reason.lower()):
            raise SetupError(
                "PNG export needs Chrome or Chromium and kaleido found none",
                "apt-get install chromium",
            ) from None
        raise SetupError(f"PNG export failed: {reason}",
                                "kaleido draws with Chromium: apt-get install chromium") from None
    return paths


def render_html(
    paths_and_data: list[tuple[str, pd.DataFrame, dict[str, Any]]],
    stream: TextIO,
    png_dir: str | None = None,
) -> None:
    """Write the self-contained HTML report of one or several captures to `stream`.

    With `png_dir`, also each figure as a PNG there (needs kaleido >= 1 and Chromium);
    that is checked before anything is written.
    """
    if not paths_and_data:
        raise PgtraceError("no capture to report")
    if png_dir is not None:
        _check_png_export()
    labels = _labels([p for p, _df, _h in paths_and_data])
    caps = [Capture(label, path, df, header, capture_summary(df, header))
            for label, (path, df, header) in zip(labels, paths_and_data, strict=True)]
    page = build_page(caps)
    stream.write(_document(page, caps))
    if png_dir is not None:
        export_png(page, png_dir)
