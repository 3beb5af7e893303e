"""End to end, pure pandas: join driver requests to server records, split client latency.

A driver connection carries one request at a time, so the server record of a
client request is the one request of that backend that starts after the send
and ends before the reply is read: containment, checked, never guessed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pgtrace.aggregate import capture_summary, stats
from pgtrace.model import E2E_BUCKETS, UNEXPLAINED

if TYPE_CHECKING:
    from pgtrace.capture import Header


def join_requests(client: pd.DataFrame, server: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Client rows with their server record's columns; rows without one are dropped.

    Returns (joined, unmatched): each server record is used at most once, and
    only when t_send <= t_start and t_end <= t_recv on the same backend. The
    match is found on keys alone, then the server's columns are taken whole, so
    nanosecond integers stay integers.
    """
    if client.empty:
        return client.assign(server_row=pd.Series(dtype="int64")), 0
    left = client.astype({"t_send": "int64", "pid": "int64"}).sort_values("t_send")
    left = left.reset_index(drop=True)
    keys = pd.DataFrame({
        "pid": server["pid"].to_numpy(dtype="int64"),
        "k_start": server["t_start"].to_numpy(dtype="int64"),
        "k_end": server["t_end"].to_numpy(dtype="int64"),
        "server_row": np.arange(len(server), dtype="int64"),
    }).sort_values("k_start")
    merged = pd.merge_asof(left, keys, left_on="t_send", right_on="k_start", by="pid",
                           direction="forward")
    ok = merged["server_row"].notna() & (merged["k_end"] <= merged["t_recv"])
    twice = merged.loc[ok, "server_row"].duplicated(keep=False)
    ok[twice[twice].index] = False
    rows = merged.loc[ok, "server_row"].to_numpy(dtype="int64")
    srv = server.iloc[rows].reset_index(drop=True)
    mine = left[ok.to_numpy()].reset_index(drop=True)
    srv = srv.drop(columns=[c for c in srv.columns if c in mine.columns])
    joined = pd.concat([mine, srv], axis=1).assign(server_row=rows)
    return joined, int((~ok).sum())


def runq_overlap(
    starts: np.ndarray, ends: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """Run-queue time inside [a, b) per row, given one thread's disjoint intervals."""
    if len(starts) == 0:
        return np.zeros(len(a), dtype=np.int64)
    order = np.argsort(starts)
    starts, ends = starts[order].astype(np.int64), ends[order].astype(np.int64)
    lengths = ends - starts
    cum = np.concatenate([[0], np.cumsum(lengths)])

    def before(t: np.ndarray) -> np.ndarray:
        i = np.searchsorted(ends, t, side="right")
        full = cum[i]
        j = np.minimum(i, len(starts) - 1)
        part = np.where(i < len(starts), np.clip(t - starts[j], 0, lengths[j]), 0)
        return np.asarray(full + part, dtype=np.int64)

    return np.asarray(before(b.astype(np.int64)) - before(a.astype(np.int64)), dtype=np.int64)


def e2e_frame(joined: pd.DataFrame, runq: pd.DataFrame) -> pd.DataFrame:
    """Add latency_ns and the end-to-end buckets to joined rows.

    `runq` holds the driver threads' run-queue waits (client_tid, start, end);
    each joined row names its driver thread in `client_tid`.
    """
    df = joined.copy()
    df["latency_ns"] = df["t_recv"] - df["t_enqueue"]
    df["client_queue"] = df["t_send"] - df["t_enqueue"]
    transit = df["t_start"] - df["t_send"]
    df["server_wakeup"] = np.minimum(df["wakeup_ns"], transit)
    df["request_transit"] = transit - df["server_wakeup"]
    response = (df["t_recv"] - df["t_end"]).to_numpy(dtype=np.int64)
    wake = np.zeros(len(df), dtype=np.int64)
    for tid, rows in df.groupby("client_tid").indices.items():
        mine = runq[runq["client_tid"] == tid]
        wake[rows] = runq_overlap(
            mine["start"].to_numpy(), mine["end"].to_numpy(),
            df["t_end"].to_numpy()[rows], df["t_recv"].to_numpy()[rows],
        )
    df["client_wakeup"] = np.minimum(wake, response)
    df["response_transit"] = response - df["client_wakeup"]
    parts = [b for b in E2E_BUCKETS if b != UNEXPLAINED]
    df["e2e_unexplained"] = df["latency_ns"] - df[parts].sum(axis=1)
    return df


def _column(b: str) -> str:
    return "e2e_unexplained" if b == UNEXPLAINED else b


def e2e_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per end-to-end bucket: total, share of client latency, p50, p99 (ns)."""
    total = int(df["latency_ns"].sum()) if len(df) else 0
    rows = []
    for b in E2E_BUCKETS:
        s = stats(df[_column(b)]) if len(df) else stats(pd.Series(dtype="int64"))
        rows.append({"bucket": b, "total_ns": s["sum"], "share": s["sum"] / total if total else 0.0,
                     "p50_ns": s["p50"], "p99_ns": s["p99"]})
    return pd.DataFrame(rows)


def tail_shares(df: pd.DataFrame, q: float = 0.99) -> dict[str, float]:
    """What explains the tail: bucket shares of latency among requests at or above quantile q."""
    if df.empty:
        return {b: 0.0 for b in E2E_BUCKETS}
    tail = df[df["latency_ns"] >= df["latency_ns"].quantile(q)]
    total = float(tail["latency_ns"].sum())
    return {b: float(tail[_column(b)].sum()) / total if total else 0.0 for b in E2E_BUCKETS}


def e2e_summary(df: pd.DataFrame) -> dict[str, Any]:
    """e2e_buckets_ns (summing to the client latency total) and the tail shares."""
    return {
        "e2e_buckets_ns": {b: int(df[_column(b)].sum()) for b in E2E_BUCKETS} if len(df)
        else {b: 0 for b in E2E_BUCKETS},
        "client_latency_ns": stats(df["latency_ns"]) if len(df)
        else stats(pd.Series(dtype="int64")),
        "p99_shares": tail_shares(df),
    }


#: What a run's summary takes from the driver and the engine's counters (kept in the
#: capture's header["run"]); everything else is computed from the joined rows.
RUN_KEYS: tuple[str, ...] = ("requests", "errors", "duration_s", "tps", "client_ns",
                             "server_requests", "unmatched_waits", "unmatched", "driver_exit")


def run_summary(df: pd.DataFrame, header: Header) -> dict[str, Any]:
    """The summary of a `pgtrace run` capture, from its rows and header alone.

    `pgtrace run --summary-json` and `pgtrace report --format json` both call this,
    so one capture gives one set of numbers: the server buckets are those of the
    joined requests (the rows), not of every request traced (the sampler's queries,
    the connections' set-up); `server_requests` counts those.
    """
    run: dict[str, Any] = dict(header.get("run", {}))
    out = {k: run[k] for k in RUN_KEYS if k in run}
    out.update({k: v for k, v in capture_summary(df, header).items() if k not in out})
    out.update(e2e_summary(df))
    return out
