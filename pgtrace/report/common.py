"""What every part of the HTML report shares: one capture as the page shows it, the colours,
the templates."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2
import pandas as pd

from pgtrace.capture import Header
from pgtrace.model import UNEXPLAINED

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
#: Columns every capture of `pgtrace run` has (the end-to-end split).
E2E_MARKERS = ("latency_ns", "client_queue", "e2e_unexplained")


@dataclass
class Capture:
    """One capture as the page shows it."""

    label: str
    path: str
    df: pd.DataFrame
    header: Header
    summary: dict[str, Any]

    @property
    def is_run(self) -> bool:
        return all(c in self.df.columns for c in E2E_MARKERS)


def exact(x: Any) -> int:
    """As aggregate.stats rounds: NaN is 0."""
    return round(float(x)) if pd.notna(x) else 0


def axis_unit(max_ns: float) -> tuple[str, float]:
    """An axis unit for values up to max_ns: (name, nanoseconds per unit)."""
    if max_ns >= 10e9:
        return "s", 1e9
    if max_ns >= 1e6:
        return "ms", 1e6
    if max_ns >= 1e3:
        return "µs", 1e3
    return "ns", 1.0



def e2e_column(bucket: str) -> str:
    return "e2e_unexplained" if bucket == UNEXPLAINED else bucket



@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("pgtrace.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
    )


def template(name: str) -> jinja2.Template:
    """One of templates/, every text it is given escaped (HTML and SVG alike)."""
    return _environment().get_template(name)
