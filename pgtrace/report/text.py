"""Terminal tables of a run: buckets, top waits, rates, lost events (under 100 columns)."""

from __future__ import annotations

import time
from typing import Any, TextIO

import pandas as pd
from rich.console import Console
from rich.table import Table

from pgtrace.aggregate import bucket_table, wait_table
from pgtrace.capture import Header
from pgtrace.e2e import e2e_table
from pgtrace.model import LOCK_PREFIX, LWLOCK_PREFIX, RUNQUEUE_PREFIX


def fmt_ns(ns: float) -> str:
    """Nanoseconds in a readable unit."""
    if ns >= 10e9:
        return f"{ns / 1e9:.1f} s"
    if ns >= 10e6:
        return f"{ns / 1e6:.0f} ms"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} us"
    return f"{ns:.0f} ns"


def runqueue_line(df: pd.DataFrame) -> str:
    """Where the run-queue waits happened: the context each one interrupted."""
    cols = [c for c in df.columns if str(c).startswith(RUNQUEUE_PREFIX)]
    total = int(df["runqueue"].sum()) if len(df) and "runqueue" in df else 0
    if not cols or total <= 0:
        return ""
    parts = sorted(((int(df[c].sum()), str(c)[len(RUNQUEUE_PREFIX):]) for c in cols), reverse=True)
    shown = [f"{name} {ns / total * 100:.0f}%" for ns, name in parts if ns * 100 >= total]
    return "runqueue by context it interrupted: " + ", ".join(shown)


def incomplete_lines(summary: dict[str, Any]) -> list[str]:
    """Aborted and partial requests: counts, time, and the aborted ones."""
    inc = summary.get("incomplete")
    if not isinstance(inc, dict):
        return []
    ab, pa = inc["aborted"], inc["partial"]
    lines = [f"aborted requests: {ab['requests']} ({fmt_ns(ab['server_ns'])} so far)"]
    for r in ab["rows"]:
        lines.append(f"  aborted: pid {r['pid']}, {fmt_ns(r['server_ns'])} so far, "
                     f"{r['fingerprint'] or '(no text)'}")
    lines.append(
        f"partial requests (begun before attach): {pa['requests']} "
        f"({fmt_ns(pa['server_ns'])} since attach)"
        + (f", {pa['unrecorded']} more not recorded" if pa["unrecorded"] else ""))
    return lines


def window_lines(header: Header) -> list[str]:
    """From when requests were counted, each postmaster restart followed, an early end."""
    start = header.get("tracing_started_wall")
    if start is None:
        return []
    clock = time.strftime("%H:%M:%S", time.localtime(start))
    out = [f"requests counted from {clock}, once every probe was attached "
           f"({header.get('attach_s', 0.0):.1f} s after the command started)"]
    restarts = len(header.get("postmasters", [])) - 1
    if restarts > 0:
        out.append(f"postmaster restarts followed: {restarts}")
    if header.get("ended"):
        out.append(f"ended early: {header['ended']}")
    return out


def render_text(df: pd.DataFrame, summary: dict[str, Any], stream: TextIO,
                header: Header | None = None) -> None:
    """The end-of-run report (with the capture header: also the traced window)."""
    con = Console(file=stream, width=99, force_terminal=False, color_system=None)
    dur = summary.get("duration_s") or 0.0
    rate = summary["requests"] / dur if dur else 0.0
    srv = summary["server_ns"]
    con.print(
        f"{summary['requests']} requests in {dur:.1f} s ({rate:.0f}/s)\n"
        f"server time: mean {fmt_ns(srv['mean'])}, p50 {fmt_ns(srv['p50'])}, "
        f"p99 {fmt_ns(srv['p99'])}, max {fmt_ns(srv['max'])}"
    )
    con.print(
        f"lost records: {summary['lost']}   unmatched waits: {summary['unmatched']}"
    )
    for line in window_lines(header or {}):
        con.print(line, soft_wrap=True)
    for line in incomplete_lines(summary):
        con.print(line)
    table = Table(title="Where the server time went", title_justify="left")
    for col in ("bucket", "total", "share", "mean/req", "p50", "p99"):
        table.add_column(col, justify="left" if col == "bucket" else "right")
    for row in bucket_table(df).to_dict("records"):
        table.add_row(
            str(row["bucket"]),
            fmt_ns(row["total_ns"]),
            f"{row['share'] * 100:.1f}%",
            fmt_ns(row["mean_ns"]),
            fmt_ns(row["p50_ns"]),
            fmt_ns(row["p99_ns"]),
        )
    con.print(table)
    rq = runqueue_line(df)
    if rq:
        con.print(rq)
    for prefix, title in ((LWLOCK_PREFIX, "LWLock tranches"), (LOCK_PREFIX, "Lock types")):
        waits = wait_table(df, prefix)
        if waits.empty:
            continue
        t = Table(title=title, title_justify="left")
        for col in ("name", "total", "share", "requests"):
            t.add_column(col, justify="left" if col == "name" else "right")
        for w in waits.to_dict("records"):
            t.add_row(str(w["name"]), fmt_ns(w["total_ns"]), f"{w['share'] * 100:.1f}%",
                      str(w["requests"]))
        con.print(t)


def render_e2e(df: pd.DataFrame, summary: dict[str, Any], stream: TextIO) -> None:
    """The end-to-end table of a driver run and what explains its p99."""
    con = Console(file=stream, width=99, force_terminal=False, color_system=None)
    lat = summary["client_latency_ns"]
    con.print(
        f"{summary['requests']} client requests, {summary['errors']} errors, "
        f"{summary['tps']:.0f}/s; matched to server records: {len(df)}, "
        f"unmatched: {summary['unmatched']}"
    )
    con.print(
        f"client latency: mean {fmt_ns(lat['mean'])}, p50 {fmt_ns(lat['p50'])}, "
        f"p99 {fmt_ns(lat['p99'])}, max {fmt_ns(lat['max'])}"
    )
    shares = summary["p99_shares"]
    table = Table(title="Where the client's time went (end to end)", title_justify="left")
    for col in ("bucket", "total", "share", "p50", "p99", "share>p99"):
        table.add_column(col, justify="left" if col == "bucket" else "right")
    for row in e2e_table(df).to_dict("records"):
        name = str(row["bucket"])
        table.add_row(name, fmt_ns(row["total_ns"]), f"{row['share'] * 100:.1f}%",
                      fmt_ns(row["p50_ns"]), fmt_ns(row["p99_ns"]),
                      f"{shares.get(name, 0.0) * 100:.1f}%")
    con.print(table)
    top = sorted(shares.items(), key=lambda kv: -kv[1])[:3]
    con.print("what explains the p99: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in top))
