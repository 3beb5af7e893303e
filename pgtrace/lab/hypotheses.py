"""Hypotheses checked on result rows: pure code, no I/O.

A metric is a row field (`tps`, `fpi_per_row`, ...), `index_ratio` (rebuilt over
live index size), `catalog_growth`, `share:<bucket>` (of server time),
`e2e_share:<bucket>` (of client latency; `cpu_waits` is runqueue plus both
wake-ups), `per_request:<bucket>` (mean ns) or `vacuum_release_ratio` (dead
catalog rows VACUUM left after the horizon was released over before).
A hypothesis bounds it, or its ratio to another variant at the same runner level
(`over`) or to the same variant at another level (`over_runners`), on every row
it selects; it holds when every selected value is within the bounds.
"""

from __future__ import annotations

from typing import Any

from pgtrace.lab.spec import Hypothesis

Row = dict[str, Any]

#: e2e buckets that are waits for a CPU, summed by `e2e_share:cpu_waits`.
CPU_WAITS = ("runqueue", "server_wakeup", "client_wakeup")


def _share(parts: dict[str, Any], name: str, totals: list[str]) -> float | None:
    total = sum(float(parts.get(b, 0)) for b in totals)
    names = CPU_WAITS if name == "cpu_waits" else (name,)
    return sum(float(parts.get(n, 0)) for n in names) / total if total else None


def _ratio(num: Any, den: Any) -> float | None:
    """num / den; infinity for a positive num over 0; None when either is unknown or 0/0."""
    if not isinstance(num, int | float) or not isinstance(den, int | float):
        return None
    if den == 0:
        return float("inf") if num > 0 else None
    return float(num) / float(den)


def metric(row: Row, name: str, server_buckets: list[str], e2e_buckets: list[str]) -> float | None:
    """The value of metric `name` in `row`, or None when the row lacks what it needs."""
    if name == "index_ratio":
        return _ratio(row.get("index_bytes_after"), row.get("index_bytes_before"))
    if name == "catalog_growth":
        return _ratio(row.get("catalog_bytes_after"), row.get("catalog_bytes_before"))
    if name == "vacuum_release_ratio":
        return _ratio(row.get("catalog_dead_after_release_vacuum"),
                      row.get("catalog_dead_after_vacuum"))
    kind, _, bucket = name.partition(":")
    if kind == "share" and bucket:
        return _share(row.get("buckets_ns", {}), bucket, server_buckets)
    if kind == "e2e_share" and bucket:
        return _share(row.get("e2e_ns", {}), bucket, e2e_buckets)
    if kind == "per_request" and bucket:
        n = row.get("requests") or 0
        return float(row.get("buckets_ns", {}).get(bucket, 0)) / n if n else None
    value = row.get(name)
    return float(value) if isinstance(value, int | float) else None


def _levels(spec: tuple[int, ...] | str | int | None, run: list[int]) -> list[int]:
    if spec in ("min", "max"):
        return [min(run) if spec == "min" else max(run)] if run else []
    if isinstance(spec, int):
        return [spec]
    if not spec:
        return list(run)
    return [r for r in run if isinstance(spec, tuple) and r in spec]


def _find(rows: list[Row], variant: str, runners: int) -> Row | None:
    return next((r for r in rows if r["variant"] == variant and r["runners"] == runners), None)


def evaluate(h: Hypothesis, rows: list[Row], server_buckets: list[str],
             e2e_buckets: list[str]) -> dict[str, Any]:
    """{"text", "holds", "detail"[, "seed"]}: the values compared and whether all are in bounds."""
    run = sorted({int(r["runners"]) for r in rows})
    variants = list(h.variants) or list(dict.fromkeys(r["variant"] for r in rows))
    values: list[tuple[str, float | None]] = []
    for runners in _levels(h.runners, run):
        for v in variants:
            row = _find(rows, v, runners)
            if row is None:
                continue
            value = metric(row, h.metric, server_buckets, e2e_buckets)
            label = f"{v}@{runners}"
            base: Row | None = None
            if h.over is not None:
                base = _find(rows, h.over, runners)
                label += f"/{h.over}"
            elif h.over_runners is not None:
                levels = _levels(h.over_runners if isinstance(h.over_runners, str)
                                 else int(h.over_runners), run)
                base = _find(rows, v, levels[0]) if levels else None
                label += f"/{v}@{levels[0] if levels else '?'}"
            if h.over is not None or h.over_runners is not None:
                denom = metric(base, h.metric, server_buckets, e2e_buckets) if base else None
                value = _ratio(value, denom)
            values.append((label, value))
    holds = bool(values) and all(
        val is not None and (h.above is None or val > h.above)
        and (h.below is None or val < h.below) for _label, val in values)
    detail = ", ".join(f"{label} {'n/a' if val is None else f'{val:.3f}'}"
                       for label, val in values) or "no rows to compare"
    out: dict[str, Any] = {"text": h.text, "holds": holds, "detail": f"{h.metric}: {detail}"}
    if h.seed:
        out["seed"] = h.seed
    return out
