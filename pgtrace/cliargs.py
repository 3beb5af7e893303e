"""Numeric command-line values: finite, in a sane range, refused by the parser before any work."""

from __future__ import annotations

import math
from typing import Any

import click

WEEK_S = 7 * 24 * 3600
DAY_S = 24 * 3600


class Number(click.ParamType[int | float, Any]):
    """An int or float in [low, high] (low excluded when ``low_open``); nan and inf refused."""

    def __init__(self, kind: type[int] | type[float], low: float, high: float, *,
                 low_open: bool = False) -> None:
        self.kind = kind
        self.low, self.high, self.low_open = low, high, low_open
        self.name = "integer" if kind is int else "number"

    def range_text(self) -> str:
        """The accepted range, as the help and the errors say it."""
        lo = f"{self.low:g} < x" if self.low_open else f"{self.low:g} <= x"
        return f"{lo} <= {self.high:g}"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "SECONDS" if self.kind is float and self.high in (WEEK_S, DAY_S) else (
            "N" if self.kind is int else "X")

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int | float:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number", param, ctx)
        try:
            x = self.kind(value) if not isinstance(value, str) else self.kind(value.strip())
        except (TypeError, ValueError):
            what = "an integer" if self.kind is int else "a number"
            self.fail(f"{value!r} is not {what}", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if x < self.low or (self.low_open and x == self.low) or x > self.high:
            self.fail(f"{x:g} is out of range ({self.range_text()})", param, ctx)
        return x


#: attach/run/load/lab --duration: up to a week.
SECONDS = Number(float, 0, WEEK_S, low_open=True)
#: attach INTERVAL: a live line at most every 0.1 s, at least once a day.
INTERVAL = Number(float, 0.1, DAY_S)
#: attach --sample-interval.
SAMPLE_INTERVAL = Number(float, 0.05, 3600)
#: attach COUNT (live lines).
LINES = Number(int, 1, 1_000_000)
#: run/load --count (requests).
REQUESTS = Number(int, 1, 10**10)
#: run/load --rate (requests per second, in total).
RATE = Number(float, 0, 10_000_000, low_open=True)
#: run/load --runners and --connections.
RUNNERS = Number(int, 1, 10_000)
#: run/load --workers (driver processes).
WORKERS = Number(int, 1, 256)
#: run/load --payload-bytes (text per row: 64 MiB, far below PostgreSQL's 1 GB).
PAYLOAD = Number(int, 0, 64 << 20)
#: run/load --batch-rows.
BATCH_ROWS = Number(int, 1, 1_000_000)
