"""Lab results: the JSON document and the markdown table (pure code, no I/O)."""

from __future__ import annotations

from typing import Any

from pgtrace.lab.hypotheses import metric
from pgtrace.model import E2E_BUCKETS, REPORT_BUCKETS

Row = dict[str, Any]

#: (row field, column title, format) in table order; a column shows when a row has it.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("tps", "tps", "{:,.0f}"),
    ("rows_per_s", "rows/s", "{:,.0f}"),
    ("index_bytes_before", "index live", "bytes"),
    ("index_bytes_after", "index rebuilt", "bytes"),
    ("index_ratio", "rebuilt/live", "{:.3f}"),
    ("wal_bytes_per_row", "WAL B/row", "{:,.0f}"),
    ("fpi_per_row", "FPI/row", "{:.3g}"),
    ("fpi_per_s_peak", "peak FPI/s", "{:,.0f}"),
    ("checkpoints", "checkpoints", "{:d}"),
    ("buffer_reads_per_row", "reads/row", "{:.3g}"),
    ("catalog_bytes_before", "catalogs before", "bytes"),
    ("catalog_bytes_after", "catalogs after", "bytes"),
    ("catalog_dead_after_vacuum", "dead after vacuum", "{:,d}"),
    ("catalog_dead_after_release_vacuum", "dead after release + vacuum", "{:,d}"),
    ("tps_trend", "tps last/first third", "{:.2f}"),
    ("latency_ms_mean", "mean ms", "{:.2f}"),
    ("latency_ms_p99", "p99 ms", "{:.2f}"),
)


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return ""
    if fmt == "bytes":
        return _bytes(float(value))
    return fmt.format(value)


def top_buckets(parts: dict[str, int], names: list[str], n: int = 3) -> str:
    """The n largest of `names` in `parts` as 'name 41%', for a table cell."""
    total = sum(parts.get(b, 0) for b in names)
    if not total:
        return ""
    fine = {k: v for k, v in parts.items() if ":" in k}  # lwlock:X, lock:X before lwlock
    pool = {b: parts.get(b, 0) for b in names if not any(k.startswith(b + ":") for k in fine)}
    pool.update(fine)
    best = sorted(pool.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v / total:.0%}" for k, v in best if v > 0)


def with_ratio(row: Row) -> Row:
    """The row plus index_ratio when both index sizes are known."""
    before, after = row.get("index_bytes_before"), row.get("index_bytes_after")
    if before and after is not None:
        return {**row, "index_ratio": after / before}
    return row


def _metric_cell(row: Row, name: str) -> str:
    value = metric(row, name, list(REPORT_BUCKETS), list(E2E_BUCKETS))
    if value is None:
        return ""
    if "share:" in name:
        return f"{value:.1%}"
    return f"{value / 1e6:.2f} ms" if name.startswith("per_request:") else f"{value:.3g}"


def markdown(rows: list[Row], hypotheses: list[dict[str, Any]],
             e2e_names: list[str] | None = None, columns: tuple[str, ...] = ()) -> str:
    """The results table, then the hypotheses with holds / does not hold.

    `columns` are extra metric columns (see hypotheses.metric), e.g. share:fsync.
    """
    rows = [with_ratio(r) for r in rows]
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    if all(r.get("rows_per_s") == r.get("tps") for r in rows):  # one row per request
        cols = [c for c in cols if c[0] != "rows_per_s"]
    head = ["variant", "runners", *(t for _f, t, _fmt in cols), *columns, "server time"]
    if e2e_names:
        head.append("client latency")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["variant"]), str(r["runners"])]
        cells += [_cell(r.get(f), fmt) for f, _t, fmt in cols]
        cells += [_metric_cell(r, name) for name in columns]
        cells.append(top_buckets(r.get("buckets_ns", {}), list(REPORT_BUCKETS)))
        if e2e_names:
            cells.append(top_buckets(r.get("e2e_ns", {}), e2e_names))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for h in hypotheses:
        mark = "holds" if h["holds"] else "does NOT hold"
        lines.append(f"- **{mark}**: {h['text']} ({h['detail']})")
        if h.get("seed"):
            lines.append(f"  - seed: {h['seed']}")
    return "\n".join(lines) + "\n"


def document(name: str, rows: list[Row], hypotheses: list[dict[str, Any]],
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"experiment", "rows", "hypotheses"}, the shape `--json` writes."""
    doc: dict[str, Any] = {"experiment": name, "rows": rows, "hypotheses": hypotheses}
    doc.update(extra or {})
    return doc
