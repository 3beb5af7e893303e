"""The HTML report's tables as data: header cells and rows of typed cells.

The template (templates/report.html.j2) turns them into HTML, escaping every text;
nothing here writes markup.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pandas as pd

from pgtrace.aggregate import bucket_table, compare_table, per_fingerprint, stats, wait_table
from pgtrace.e2e import e2e_table, tail_shares
from pgtrace.model import REPORT_BUCKETS
from pgtrace.report.common import COLORS, Capture, exact
from pgtrace.report.figures import percentiles
from pgtrace.report.text import fmt_ns, incomplete_lines

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


@dataclass(frozen=True)
class Cell:
    """One table cell: kind (text, num, ns, bucket, bold, code, query, none, th) and text.

    `ns`: the exact nanoseconds of an "ns" cell; `title`: a query's full text;
    `color`: a bucket's swatch.
    """

    kind: str
    text: str = ""
    ns: int = 0
    title: str = ""
    color: str = ""


@dataclass
class Table:
    """Column heads and rows of cells; `empty`: the sentence shown instead when no rows."""

    head: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    cls: str = ""
    empty: str = ""


@dataclass
class Headline:
    """The figures above a capture's details."""

    requests: int
    duration_s: float
    rate: float
    server: list[tuple[str, int, str]]  # (stat, exact ns, as text)
    lost: int
    unmatched: int
    incomplete: list[str]


def ns_cell(ns: float) -> Cell:
    return Cell("ns", fmt_ns(ns), ns=exact(ns))


def pct_cell(share: float) -> Cell:
    return Cell("num", f"{share * 100:.1f}%")


def num_cell(value: object) -> Cell:
    return Cell("num", str(value))


def bucket_cell(bucket: str) -> Cell:
    return Cell("bucket", bucket, color=COLORS.get(bucket, "#999"))


def headline(cap: Capture) -> Headline:
    s = cap.summary
    dur = float(s.get("duration_s") or 0.0)
    srv = s["server_ns"]
    return Headline(
        requests=s["requests"], duration_s=dur, rate=s["requests"] / dur if dur else 0.0,
        server=[(k, int(srv[k]), fmt_ns(int(srv[k]))) for k in ("mean", "p50", "p99", "max")],
        lost=s["lost"], unmatched=s["unmatched"], incomplete=incomplete_lines(s),
    )


def bucket_rows(df: pd.DataFrame) -> Table:
    """Where the server time went: the text report's table plus p90 and a total row."""
    p90 = percentiles(df, [(b, b) for b in (*REPORT_BUCKETS, "server_ns")])
    out = Table(["bucket", "total", "share", "mean/req", "p50", "p90", "p99"])
    for r in bucket_table(df).to_dict("records"):
        b = str(r["bucket"])
        out.rows.append([bucket_cell(b), ns_cell(r["total_ns"]), pct_cell(r["share"]),
                         ns_cell(r["mean_ns"]), ns_cell(r["p50_ns"]), ns_cell(p90[b]["p90"]),
                         ns_cell(r["p99_ns"])])
    srv = stats(df["server_ns"]) if len(df) else stats(pd.Series(dtype="int64"))
    out.rows.append([Cell("bold", "server time"), ns_cell(srv["sum"]),
                     pct_cell(1.0 if srv["sum"] else 0.0), ns_cell(srv["mean"]),
                     ns_cell(srv["p50"]), ns_cell(p90["server_ns"]["p90"]), ns_cell(srv["p99"])])
    return out


def e2e_rows(df: pd.DataFrame) -> Table:
    """Where the client's time went, end to end, with each bucket's share of the p99 tail."""
    shares = tail_shares(df)
    out = Table(["bucket", "total", "share", "p50", "p99", "share of p99 tail"])
    for r in e2e_table(df).to_dict("records"):
        b = str(r["bucket"])
        out.rows.append([bucket_cell(b), ns_cell(r["total_ns"]), pct_cell(r["share"]),
                         ns_cell(r["p50_ns"]), ns_cell(r["p99_ns"]),
                         pct_cell(shares.get(b, 0.0))])
    return out


def fingerprints(cap: Capture) -> Table:
    """Per query fingerprint: server time and its three largest buckets."""
    out = Table(["fingerprint", "query", "requests", "total", "share", "mean", "p50", "p99",
                 "max", "top buckets"], cls="wide",
                empty="No query fingerprints in this capture.")
    texts = cap.header.get("query_texts", {})
    total = int(cap.summary["server_ns"]["sum"])
    for r in per_fingerprint(cap.df):
        fp = r["fingerprint"]
        text = texts.get(fp)
        if text:
            short = text if len(text) <= 160 else text[:157] + "…"
            query = Cell("query", short, title=text)
        else:
            query = Cell("none", "(no query text recorded)")
        bsum = sum(int(v) for v in r["buckets_ns"].values())
        top = sorted(r["buckets_ns"].items(), key=lambda kv: -int(kv[1]))[:3]
        mix = ", ".join(f"{b} {int(v) / bsum * 100:.0f}%" for b, v in top if bsum and int(v))
        srv = r["server_ns"]
        out.rows.append([Cell("code", fp), query, num_cell(r["requests"]), ns_cell(srv["sum"]),
                         pct_cell(srv["sum"] / total if total else 0.0), ns_cell(srv["mean"]),
                         ns_cell(srv["p50"]), ns_cell(srv["p99"]), ns_cell(srv["max"]),
                         Cell("text", mix)])
    return out


def waits(cap: Capture, prefix: str, what: str) -> Table:
    """The 30 largest waits of one kind (LWLock tranches, lock types)."""
    out = Table([what, "total", "share of server time", "requests that waited"],
                empty=f"No {what} waits in this capture.")
    table = wait_table(cap.df, prefix, top=30) if len(cap.df) else pd.DataFrame()
    for w in table.to_dict("records"):
        out.rows.append([Cell("text", str(w["name"])), ns_cell(w["total_ns"]),
                         pct_cell(w["share"]), num_cell(w["requests"])])
    return out


def _metadata_rows(cap: Capture) -> list[tuple[str, str]]:
    h = cap.header
    out: list[tuple[str, str]] = [("capture", cap.path)]
    for key, name in (("tool", "recorded by"), ("server_version", "server version"),
                      ("kernel", "kernel"), ("host", "host")):
        out.append((name, str(h.get(key, "—"))))
    cluster = h.get("cluster", {})
    for ckey in ("data_dir", "port", "postmaster_pid", "binary"):
        if ckey in cluster:
            out.append((f"cluster {ckey}", str(cluster[ckey])))
    if h.get("cluster_note"):
        out.append(("cluster", h["cluster_note"]))
    if "started_wall" in h:
        when = dt.datetime.fromtimestamp(float(h["started_wall"]), tz=dt.UTC)
        out.append(("started", when.strftime("%Y-%m-%d %H:%M:%S UTC")))
    out.append(("duration", f"{float(h.get('duration_s', 0.0)):.3f} s"))
    out.append(("lost records", str(h.get("lost", 0))))
    out.append(("unmatched waits", str(h.get("unmatched", 0))))
    settings = h.get("settings", {})
    for name in KEY_SETTINGS:
        out.append((f"setting {name}", settings.get(name, "— (not recorded)")))
    for name in sorted(k for k in settings if k not in KEY_SETTINGS):
        out.append((f"setting {name}", settings[name]))
    for name, count in h.get("counters", {}).items():
        out.append((f"counter {name}", str(count)))
    run = h.get("run", {})
    for rkey in ("requests", "errors", "tps", "driver_exit"):
        if rkey in run:
            value: object = run[rkey]
            out.append((f"run {rkey}", f"{value:.1f}" if isinstance(value, float)
                        else str(value)))
    out.append(("timeline samples", str(len(h["timeline"])) if "timeline" in h
                else "— (not recorded)"))
    out.append(("checkpoints seen", str(len(h["checkpoints"])) if "checkpoints" in h
                else "— (not recorded)"))
    if h.get("timeline_error"):
        out.append(("timeline error", h["timeline_error"]))
    return out


def metadata(caps: list[Capture]) -> Table:
    """One column per capture, rows in a fixed order (rows only some captures have go last)."""
    per = [dict(_metadata_rows(c)) for c in caps]
    names: list[str] = []
    for c in caps:
        for k, _v in _metadata_rows(c):
            if k not in names:
                names.append(k)
    head = ["", *(c.label for c in caps)] if len(caps) > 1 else ["", "value"]
    return Table(head, [[Cell("th", k), *(Cell("text", p.get(k, "—")) for p in per)]
                        for k in names], cls="meta")


def compare(caps: list[Capture]) -> Table:
    """Several captures side by side: requests, server time, then bucket by bucket."""
    out = Table(["bucket", *(f"{c.label} mean/req" for c in caps),
                 *(f"{c.label} share" for c in caps)], cls="wide")
    blank = [Cell("text")] * len(caps)
    out.rows.append([Cell("bold", "requests"), *(num_cell(c.summary["requests"]) for c in caps),
                     *blank])
    for stat in ("mean", "p50", "p99"):
        out.rows.append([Cell("bold", f"server time {stat}"),
                         *(ns_cell(c.summary["server_ns"][stat]) for c in caps), *blank])
    for r in compare_table({c.label: c.df for c in caps}).to_dict("records"):
        b = str(r["bucket"])
        out.rows.append([bucket_cell(b), *(ns_cell(r[f"{c.label} mean_ns"]) for c in caps),
                         *(pct_cell(r[f"{c.label} share"]) for c in caps)])
    return out
