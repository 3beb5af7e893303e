"""Interval lines, printed while attach runs (as bcc tools print them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

import pandas as pd

from pgtrace.aggregate import interval_line
from pgtrace.model import SERVER_BUCKETS
from pgtrace.report.text import fmt_ns


def interval_printer(stream: TextIO) -> Callable[[pd.DataFrame, float], None]:
    """A callback that prints one line per interval, with a header first."""
    state = {"lines": 0}

    def show(df: pd.DataFrame, seconds: float) -> None:
        if state["lines"] % 20 == 0:
            stream.write(f"{'TIME':8} {'REQ/s':>8} {'MEAN':>9} {'P99':>9}  TOP BUCKETS\n")
        state["lines"] += 1
        line = interval_line(df, seconds)
        top = sorted(SERVER_BUCKETS, key=lambda b: -line["shares"][b])[:3]
        tops = "  ".join(f"{b} {line['shares'][b] * 100:.0f}%" for b in top if line["shares"][b])
        stream.write(
            f"{time.strftime('%H:%M:%S'):8} {line['rate']:8.0f} {fmt_ns(line['mean_ns']):>9} "
            f"{fmt_ns(line['p99_ns']):>9}  {tops}\n"
        )
        stream.flush()

    return show
