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

The page is templates/report.html.j2 (autoescaped) with templates/report.css; the
figures are in figures.py and timeline.py, the tables in tables.py, PNG export in
export.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TextIO

import pandas as pd
from markupsafe import Markup

from pgtrace import __version__
from pgtrace.aggregate import capture_summary
from pgtrace.capture import Header
from pgtrace.errors import PgtraceError
from pgtrace.model import LOCK_PREFIX, LWLOCK_PREFIX
from pgtrace.report import export, tables
from pgtrace.report.common import Capture, template
from pgtrace.report.figures import Figure, percentiles_figure, stacked_means_figure
from pgtrace.report.folded import flame_svg
from pgtrace.report.timeline import timeline_figure

PLOT_CONFIG: dict[str, Any] = {"displaylogo": False, "responsive": True}


def _stylesheet() -> Markup:
    """templates/report.css, inlined as it is (our own file: not escaped)."""
    css = (resources.files("pgtrace.report") / "templates" / "report.css").read_text()
    return Markup("\n" + css)


@dataclass
class Page:
    """The figures in page order (the first one placed carries plotly.js)."""

    figures: list[tuple[str, Figure]] = field(default_factory=list)

    def figure(self, slug: str, fig: Figure) -> Markup:
        """The figure's div; it is numbered in the order figures are placed."""
        n = len(self.figures) + 1
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=n == 1,
            div_id=f"pgtrace-fig-{n}-{slug}",
            config=dict(PLOT_CONFIG, toImageButtonOptions={"filename": f"{n:02d}-{slug}"}),
        )
        self.figures.append((slug, fig))
        return Markup(div)  # plotly's own markup


def _json_script(element_id: str, value: Any) -> Markup:
    """JSON inside a script element: '<', '>' and '&' escaped so nothing can close it."""
    text = json.dumps(value, indent=1, sort_keys=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup('<script type="application/json" id="{}">{}</script>').format(
        element_id, Markup(text))


def _labels(paths: list[str]) -> list[str]:
    if len(paths) == 1:
        return [os.path.basename(paths[0]) or paths[0]]
    return [f"#{i + 1} {os.path.basename(p) or p}" for i, p in enumerate(paths)]


def _flames(cap: Capture) -> list[Markup]:
    """On-CPU and off-CPU flame graphs when the capture has stacks (attach --stacks)."""
    stacks = cap.header.get("stacks", {})
    out: list[Markup] = []
    if stacks.get("oncpu"):
        out.append(flame_svg(stacks["oncpu"], title=f"on-CPU ({stacks.get('hz', 99)} Hz "
                             "samples inside requests)", unit="samples"))
    if stacks.get("offcpu"):
        out.append(flame_svg(stacks["offcpu"], title="off-CPU (time blocked, by bucket)",
                             unit="ns"))
    return out


def _capture_part(page: Page, i: int, c: Capture, several: bool) -> dict[str, Any]:
    """One capture's details, its figures placed in page order."""
    sfx = f"-{i + 1}" if several else ""
    figs = {"percentiles": page.figure(f"percentiles{sfx}", percentiles_figure(c, e2e=False))}
    if c.is_run:
        figs["e2e_percentiles"] = page.figure(f"e2e-percentiles{sfx}",
                                              percentiles_figure(c, e2e=True))
    figs["timeline"] = page.figure(f"timeline{sfx}", timeline_figure(c))
    return {
        "label": c.label, "anchor": f"capture-{i + 1}", "requests": c.summary["requests"],
        "headline": tables.headline(c), "buckets": tables.bucket_rows(c.df),
        "e2e": tables.e2e_rows(c.df) if c.is_run else None, "figures": figs,
        "fingerprints": tables.fingerprints(c),
        "lwlocks": tables.waits(c, LWLOCK_PREFIX, "LWLock tranche"),
        "locks": tables.waits(c, LOCK_PREFIX, "lock type"), "flames": _flames(c),
    }


def build_page(caps: list[Capture]) -> tuple[Page, str]:
    """The figures (kept for PNG export) and the whole page."""
    several = len(caps) > 1
    page = Page()
    overview = [page.figure("buckets", stacked_means_figure(caps, e2e=False))]
    runs = [c for c in caps if c.is_run]
    if runs:
        overview.append(page.figure("e2e-buckets", stacked_means_figure(runs, e2e=True)))
    parts = [_capture_part(page, i, c, several) for i, c in enumerate(caps)]
    nav = [("overview", "Overview"), *((p["anchor"], p["label"] if several else "Details")
                                       for p in parts), ("metadata", "Run metadata")]
    summaries: Any = [c.summary for c in caps] if several else caps[0].summary
    text = template("report.html.j2").render(
        title="pgtrace report: " + ", ".join(c.label for c in caps), css=_stylesheet(),
        caps=parts, several=several, nav=nav, overview=overview,
        summary_json=_json_script("pgtrace-summary", summaries),
        compare=tables.compare(caps) if several else None,
        metadata=tables.metadata(caps), version=__version__,
    )
    return page, text


def render_html(
    paths_and_data: list[tuple[str, pd.DataFrame, Header]],
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
        export.check_png_export()
    labels = _labels([p for p, _df, _h in paths_and_data])
    caps = [Capture(label, path, df, header, capture_summary(df, header))
            for label, (path, df, header) in zip(labels, paths_and_data, strict=True)]
    page, text = build_page(caps)
    stream.write(text)
    if png_dir is not None:
        export.export_png(page.figures, png_dir)
