"""Command-line plumbing shared by every command: numeric values (finite, in a sane range,
refused by the parser before any work) and the one path from an error to its exit code."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from pgtrace.errors import PgtraceError

F = TypeVar("F", bound=Callable[..., Any])


def errors_to_exit(func: F) -> F:
    """Turn PgtraceError into one line on stderr and its exit code (every command)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PgtraceError as exc:
            click.echo(exc.line(), err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]

WEEK_S = 7 * 24 * 3600
DAY_S = 24 * 3600


def _fmt(x: float) -> str:
    """100000 as 100000, 0.05 as 0.05, 1e300 as 1e+300."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


class Number(click.ParamType[int | float, Any]):
    """An int or float in [low, high] (low excluded when ``low_open``); nan and inf refused."""

    def __init__(self, kind: type[int] | type[float], low: float, high: float, *,
                 low_open: bool = False, metavar: str | None = None) -> None:
        self.kind = kind
        self.metavar = metavar or ("N" if kind is int else "X")
        self.low, self.high, self.low_open = low, high, low_open
        self.name = "integer" if kind is int else "number"

    def range_text(self) -> str:
        """The accepted range, as the help and the errors say it."""
        lo = f"{_fmt(self.low)} < x" if self.low_open else f"{_fmt(self.low)} <= x"
        return f"{lo} <= {_fmt(self.high)}"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.metavar

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
            self.fail(f"{_fmt(x)} is out of range ({self.range_text()})", param, ctx)
        return x


#: attach/run/load/lab --duration: up to a week.
SECONDS = Number(float, 0, WEEK_S, low_open=True, metavar="SECONDS")
#: attach INTERVAL: a live line at most every 0.1 s, at least once a day.
INTERVAL = Number(float, 0.1, DAY_S, metavar="SECONDS")
#: attach --sample-interval.
SAMPLE_INTERVAL = Number(float, 0.05, 3600, metavar="SECONDS")
#: attach COUNT (live lines).
LINES = Number(int, 1, 1_000_000)
#: run/load --count (requests).
REQUESTS = Number(int, 1, 10**10)
#: run/load --rate (requests per second, in total).
RATE = Number(float, 0, 10_000_000, low_open=True, metavar="PER_SECOND")
#: run/load --runners and --connections.
RUNNERS = Number(int, 1, 10_000)
#: run/load --workers (driver processes).
WORKERS = Number(int, 1, 256)
#: run/load --payload-bytes (text per row: 64 MiB, far below PostgreSQL's 1 GB).
PAYLOAD = Number(int, 0, 64 << 20, metavar="BYTES")
#: run/load --batch-rows.
BATCH_ROWS = Number(int, 1, 1_000_000)
