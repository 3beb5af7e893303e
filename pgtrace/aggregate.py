"""Pure pandas: summaries, percentiles and shares of a requests DataFrame. No I/O."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from pgtrace.model import LOCK_PREFIX, LWLOCK_PREFIX, REPORT_BUCKETS, SERVER_BUCKETS

if TYPE_CHECKING:
    from pgtrace.capture import Header

EMPTY_COLUMNS = ("pid", "t_start", "t_end", "server_ns", *REPORT_BUCKETS)


def empty_frame() -> pd.DataFrame:
    """A requests frame with no rows."""
    return pd.DataFrame({c: pd.Series(dtype="int64") for c in EMPTY_COLUMNS})


def concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate request frames; wait columns absent in some are zero there."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty_frame()
    df = pd.concat(frames, ignore_index=True, sort=False)
    waits = [c for c in df.columns if c.startswith((LWLOCK_PREFIX, LOCK_PREFIX))]
    if waits:
        df[waits] = df[waits].fillna(0).astype("int64")
    return df


def _int(x: Any) -> int:
    return round(float(x)) if pd.notna(x) else 0


def stats(series: pd.Series) -> dict[str, int]:
    """sum, mean, p50, p99, max of a nanosecond column."""
    if series.empty:
        return {"sum": 0, "mean": 0, "p50": 0, "p99": 0, "max": 0}
    return {
        "sum": int(series.sum()),
        "mean": _int(series.mean()),
        "p50": _int(series.quantile(0.5)),
        "p99": _int(series.quantile(0.99)),
        "max": int(series.max()),
    }


def wait_columns(df: pd.DataFrame, prefix: str) -> list[str]:
    """Columns of one wait family (lwlock:*, lock:*), largest total first."""
    cols = [str(c) for c in df.columns if str(c).startswith(prefix)]
    totals = {c: int(df[c].to_numpy().sum()) for c in cols}
    return sorted(cols, key=lambda c: -totals[c])


def flagged(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows flagged `column` (partial, aborted); none in a frame without the column."""
    if column not in df.columns or df.empty:
        return df.iloc[0:0]
    return df[df[column].astype(bool)]


def incomplete(df: pd.DataFrame, counters: dict[str, int] | None = None) -> dict[str, Any]:
    """Requests the window cut: aborted ones (their time so far) and partial ones.

    A partial request began before attach (its time counts from attach on);
    `unrecorded` are those counted by the kernel but without a record (the
    backend's state at attach was unreadable). Rows are in the frame, flagged.
    """
    counters = counters or {}
    ab, pa = flagged(df, "aborted"), flagged(df, "partial")
    return {
        "aborted": {
            "requests": len(ab),
            "server_ns": int(ab["server_ns"].sum()) if len(ab) else 0,
            "rows": [{"pid": int(r["pid"]), "t_start": int(r["t_start"]),
                      "server_ns": int(r["server_ns"]),
                      "fingerprint": str(r.get("fingerprint", ""))}
                     for r in ab.head(20).to_dict("records")],
        },
        "partial": {
            "requests": len(pa),
            "server_ns": int(pa["server_ns"].sum()) if len(pa) else 0,
            "unrecorded": max(0, int(counters.get("partial", 0)) - len(pa)),
        },
        "unanswered_receives": int(counters.get("unanswered", 0)),
    }


def summary(
    df: pd.DataFrame, *, lost: int = 0, unmatched: int = 0, duration_s: float = 0.0,
    counters: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The summary JSON shape: totals per bucket sum to server_ns.sum.

    Aborted and partial requests are in every total (their time is server
    time of the window) and reported apart under `incomplete`.
    """
    per_backend: dict[str, dict[str, int]] = {}
    if len(df):
        grouped = df.groupby("pid")
        agg = grouped[["cpu", "runqueue"]].sum()
        agg["requests"] = grouped.size()
        for pid, row in agg.to_dict("index").items():
            per_backend[str(pid)] = {
                "cpu_ns": int(row["cpu"]),
                "runqueue_ns": int(row["runqueue"]),
                "requests": int(row["requests"]),
            }
    return {
        "requests": len(df),
        "lost": int(lost),
        "unmatched": int(unmatched),
        "duration_s": round(float(duration_s), 3),
        "server_ns": stats(df["server_ns"]),
        "buckets_ns": {b: int(df[b].sum()) for b in REPORT_BUCKETS},
        "lwlock_ns": {
            c[len(LWLOCK_PREFIX):]: int(df[c].sum()) for c in wait_columns(df, LWLOCK_PREFIX)
        },
        "lock_ns": {c[len(LOCK_PREFIX):]: int(df[c].sum()) for c in wait_columns(df, LOCK_PREFIX)},
        "per_backend": per_backend,
        "incomplete": incomplete(df, counters),
    }


def bucket_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per bucket: total, share of server time, mean, p50, p99 (ns)."""
    total = int(df["server_ns"].sum()) if len(df) else 0
    rows = []
    for b in REPORT_BUCKETS:
        col = df[b] if len(df) else pd.Series(dtype="int64")
        s = stats(col)
        rows.append(
            {
                "bucket": b,
                "total_ns": s["sum"],
                "share": (s["sum"] / total) if total else 0.0,
                "mean_ns": s["mean"],
                "p50_ns": s["p50"],
                "p99_ns": s["p99"],
            }
        )
    return pd.DataFrame(rows)


def wait_table(df: pd.DataFrame, prefix: str, top: int = 8) -> pd.DataFrame:
    """The top waits of one family: name, total, share of server time, requests that waited."""
    total = int(df["server_ns"].sum()) if len(df) else 0
    rows = [
        {
            "name": c[len(prefix):],
            "total_ns": int(df[c].sum()),
            "share": int(df[c].sum()) / total if total else 0.0,
            "requests": int((df[c] > 0).sum()),
        }
        for c in wait_columns(df, prefix)[:top]
    ]
    return pd.DataFrame(rows, columns=["name", "total_ns", "share", "requests"])


def interval_line(df: pd.DataFrame, seconds: float) -> dict[str, Any]:
    """What one live line shows: rate, mean latency, the top buckets' shares."""
    total = int(df["server_ns"].sum()) if len(df) else 0
    shares = {b: (int(df[b].sum()) / total if total else 0.0) for b in SERVER_BUCKETS}
    return {
        "requests": len(df),
        "rate": len(df) / seconds if seconds > 0 else 0.0,
        "mean_ns": _int(df["server_ns"].mean()) if len(df) else 0,
        "p99_ns": _int(df["server_ns"].quantile(0.99)) if len(df) else 0,
        "shares": shares,
    }


def per_fingerprint(df: pd.DataFrame, top: int = 50) -> list[dict[str, Any]]:
    """Per query fingerprint: requests, server time stats and bucket sums, largest first."""
    if df.empty or "fingerprint" not in df:
        return []
    out: list[dict[str, Any]] = []
    for fp, g in df.groupby("fingerprint", sort=False):
        out.append({
            "fingerprint": str(fp),
            "requests": len(g),
            "server_ns": stats(g["server_ns"]),
            "buckets_ns": {b: int(g[b].sum()) for b in REPORT_BUCKETS},
        })
    out.sort(key=lambda r: -int(r["server_ns"]["sum"]))
    return out[:top]


def per_second(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per second of the run (by request end): requests, server time p50/p99, bucket sums."""
    if df.empty:
        return []
    t0 = int(df["t_start"].min())
    sec = (df["t_end"] - t0) // 1_000_000_000
    out = []
    for s, g in df.groupby(sec, sort=True):
        st = stats(g["server_ns"])
        out.append({
            "second": int(s),
            "requests": len(g),
            "server_ns": {"mean": st["mean"], "p50": st["p50"], "p99": st["p99"],
                          "max": st["max"]},
            "buckets_ns": {b: int(g[b].sum()) for b in REPORT_BUCKETS},
        })
    return out


def compare_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Bucket by bucket, side by side: mean ns per request and share, one pair per run."""
    rows = []
    for b in REPORT_BUCKETS:
        row: dict[str, Any] = {"bucket": b}
        for name, df in frames.items():
            total = int(df["server_ns"].sum()) if len(df) else 0
            row[f"{name} mean_ns"] = float(df[b].mean()) if len(df) else 0.0
            row[f"{name} share"] = int(df[b].sum()) / total if total else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def capture_summary(df: pd.DataFrame, header: Header) -> dict[str, Any]:
    """The summary of a capture: its rows, with the counters its header kept."""
    return summary(df, lost=header.get("lost", 0), unmatched=header.get("unmatched", 0),
                   duration_s=header.get("duration_s", 0.0), counters=header.get("counters"))
