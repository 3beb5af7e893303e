"""The HTML report's figures: mean per request stacked by bucket, percentiles per bucket."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go  # type: ignore[import-untyped]

from pgtrace.model import E2E_BUCKETS, REPORT_BUCKETS
from pgtrace.report.common import COLORS, PERCENTILES, Capture, axis_unit, e2e_column, exact
from pgtrace.report.text import fmt_ns

Figure = Any  # plotly ships no type information


def base_layout(fig: Figure, title: str, height: int) -> None:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 70, "t": 60, "b": 50},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.01, "x": 1, "xanchor": "right"},
        hoverlabel={"namelength": -1},
        font={"family": "system-ui, -apple-system, 'Segoe UI', sans-serif", "size": 12},
    )




def _means(df: pd.DataFrame, columns: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Mean ns per request of each (bucket, column), as bucket_table rounds it."""
    return {b: float(exact(df[c].mean())) if len(df) else 0.0 for b, c in columns}


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
    cols = [(b, e2e_column(b) if e2e else b) for b in buckets]
    means = {c.label: _means(c.df, cols) for c in caps}
    totals = {c.label: (exact(c.df["latency_ns" if e2e else "server_ns"].mean())
                        if len(c.df) else 0) for c in caps}
    top = max([*totals.values(), 1])
    unit, scale = axis_unit(top)
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
            customdata=[[exact(s.ns), fmt_ns(s.ns), s.share * 100] for s in segs],
            hovertemplate=(f"<b>{b}</b><br>%{{y}}<br>mean %{{customdata[1]}} "
                           "(%{customdata[0]} ns), %{customdata[2]:.1f}%<extra></extra>"),
        ))
    for c in caps:
        fig.add_annotation(x=totals[c.label] / scale, y=c.label, xanchor="left", xshift=6,
                           showarrow=False, text=f"<b>{fmt_ns(totals[c.label])}</b>")
    what = "client latency, end to end" if e2e else "server time"
    top_px = 58 + LEVEL_PX * _legend_rows(buckets)  # the title, then the legend's rows
    height = max(MIN_HEIGHT, top_px + 60 + row * len(caps))  # the room left goes to the rows
    base_layout(fig, f"Mean {what} per request, by bucket", height)
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
        out[label] = {p: exact(v) for (p, _q, _c), v in zip(PERCENTILES, values, strict=True)}
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
        cols = [("client latency", "latency_ns"), *((b, e2e_column(b)) for b in E2E_BUCKETS)]
    else:
        cols = [("server time", "server_ns"), *((b, b) for b in REPORT_BUCKETS)]
    pct = percentiles(cap.df, cols)
    unit, scale = axis_unit(max([1, *(v["p99"] for v in pct.values())]))
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
    base_layout(fig, f"{what} per bucket — {cap.label}", 440)
    fig.update_layout(barmode="group", updatemenus=_log_toggle(), margin={"t": 90})
    fig.update_yaxes(title_text=unit, rangemode="tozero")
    return fig

