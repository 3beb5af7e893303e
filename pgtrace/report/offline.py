"""`pgtrace report`: captures back into summaries, tables, JSON and CSV."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import pandas as pd
from rich.console import Console
from rich.table import Table

from pgtrace.aggregate import capture_summary, compare_table, per_fingerprint, per_second
from pgtrace.capture import Header, read_capture
from pgtrace.e2e import run_summary
from pgtrace.errors import OutputError, UsageError
from pgtrace.outputs import MODE
from pgtrace.report.text import fmt_ns, render_e2e, render_text


def _is_run(df: pd.DataFrame, header: Header) -> bool:
    """A capture of `pgtrace run`: driver requests joined to their server records."""
    return "latency_ns" in df.columns and "run" in header


def json_report(df: pd.DataFrame, header: Header) -> dict[str, Any]:
    """Summary shape (a run's, for a run capture) plus per-fingerprint and per-second
    sections."""
    out = run_summary(df, header) if _is_run(df, header) else capture_summary(df, header)
    texts = header.get("query_texts") or {}
    fps = per_fingerprint(df)
    for row in fps:
        if row["fingerprint"] in texts:
            row["query"] = texts[row["fingerprint"]]
    out["per_fingerprint"] = fps
    out["per_second"] = per_second(df)
    return out


@contextmanager
def private_dir(final: str) -> Iterator[str]:
    """A private (0700) directory inside `final` (created 0700) whose files are moved into
    `final`, mode 0600, once the block succeeds; removed in any case (and `final` too
    when it was made here and the block failed)."""
    made = not os.path.exists(final)
    try:
        os.makedirs(final, exist_ok=True)
        if made:
            os.chmod(final, 0o700)
        tmp = tempfile.mkdtemp(prefix=".pgtrace-", dir=final)
    except OSError as exc:
        raise OutputError(f"cannot write into {final}: {exc.strerror or exc}") from None
    try:
        yield tmp
        for name in sorted(os.listdir(tmp)):
            src = os.path.join(tmp, name)
            os.chmod(src, MODE)
            os.replace(src, os.path.join(final, name))
    except OSError as exc:
        raise OutputError(f"cannot write into {final}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made:
            shutil.rmtree(final, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: One capture as read: its path, requests and header.
Loaded = tuple[str, pd.DataFrame, Header]


def _html(loaded: list[Loaded], stream: TextIO, png_dir: str | None) -> None:
    from pgtrace.report.html import render_html

    if png_dir is None:
        render_html(loaded, stream)
        return
    with private_dir(png_dir) as tmp:
        render_html(loaded, stream, png_dir=tmp)


def _csv(loaded: list[Loaded], stream: TextIO, _png_dir: str | None) -> None:
    if len(loaded) != 1:
        raise UsageError("--format csv takes one capture")
    loaded[0][1].to_csv(stream, index=False)


def _json(loaded: list[Loaded], stream: TextIO, _png_dir: str | None) -> None:
    reports = [dict(json_report(df, h), capture=p) for p, df, h in loaded]
    json.dump(reports[0] if len(reports) == 1 else reports, stream, indent=2)
    stream.write("\n")


def _text(loaded: list[Loaded], stream: TextIO, _png_dir: str | None) -> None:
    if len(loaded) == 1:
        _p, df, header = loaded[0]
        text_report(df, header, stream)
        return
    render_compare({p: df for p, df, _h in loaded}, stream)


@dataclass(frozen=True)
class Reporter:
    """How one --format renders captures; `png`: whether it takes --png."""

    render: Callable[[list[Loaded], TextIO, str | None], None]
    png: bool = False


#: The report formats: one capture, or several side by side (text, html) or a list (json).
REPORTERS: dict[str, Reporter] = {
    "text": Reporter(_text),
    "json": Reporter(_json),
    "csv": Reporter(_csv),
    "html": Reporter(_html, png=True),
}


def render_report(paths: list[str], fmt: str, stream: TextIO, png_dir: str | None = None) -> None:
    """The captures' report in `fmt` (one of REPORTERS)."""
    reporter = REPORTERS.get(fmt)
    if reporter is None:
        raise UsageError(f"no report format {fmt!r} (one of {', '.join(REPORTERS)})")
    loaded = [(p, *read_capture(p)) for p in paths]
    if png_dir is not None and not reporter.png:
        raise UsageError("--png goes with --format html")
    reporter.render(loaded, stream, png_dir)


def text_report(df: pd.DataFrame, header: Header, stream: TextIO) -> None:
    """One capture as text, as `pgtrace run` prints it live: end to end (a run), server."""
    if _is_run(df, header):
        render_e2e(df, run_summary(df, header), stream)
    render_text(df, capture_summary(df, header), stream, header)


def render_compare(frames: dict[str, pd.DataFrame], stream: TextIO) -> None:
    """Several runs, bucket by bucket: mean per request and share of server time."""
    con = Console(file=stream, width=99, force_terminal=False, color_system=None)
    names = {p: f"#{i + 1}" for i, p in enumerate(frames)}
    for p, short in names.items():
        df = frames[p]
        con.print(f"{short} {p}: {len(df)} requests, mean server time "
                  f"{fmt_ns(float(df['server_ns'].mean()) if len(df) else 0)}")
    table = Table(title="Side by side: mean per request (share)", title_justify="left")
    table.add_column("bucket")
    for short in names.values():
        table.add_column(short, justify="right")
    cmp = compare_table({names[p]: df for p, df in frames.items()})
    for row in cmp.to_dict("records"):
        cells = [f"{fmt_ns(row[f'{s} mean_ns'])} ({row[f'{s} share'] * 100:.0f}%)"
                 for s in names.values()]
        table.add_row(str(row["bucket"]), *cells)
    con.print(table)
