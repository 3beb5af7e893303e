"""Raw request records -> a pandas DataFrame, one row per request."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from pgtrace.collect.events import TRANCHE_ID_FLAG, RunqEvent, event_dtype
from pgtrace.collect.waitevent import tranche_name
from pgtrace.fingerprint import fingerprint, normalize
from pgtrace.model import (
    ACCOUNT_COLUMNS,
    CONTEXTS,
    COUNTS,
    FLAGS,
    LOCK_PREFIX,
    LOCK_TYPES,
    LWLOCK_PREFIX,
    RUNQUEUE_PREFIX,
    SERVER_BUCKETS,
    UNEXPLAINED,
)
from pgtrace.proc import read_mem


class TrancheNames:
    """Names the tranches of lwlock waits.

    A tranche id (from the wait event, flagged) is looked up in the version's
    table; a name pointer (from the USDT argument) is read from server memory.
    """

    def __init__(self, pids: Callable[[], list[int]], major: int = 0) -> None:
        self._pids = pids
        self._major = major
        self._cache: dict[int, str] = {0: "unknown"}

    def __call__(self, addr: int) -> str:
        name = self._cache.get(addr)
        if name is None:
            if addr & TRANCHE_ID_FLAG:
                name = tranche_name(self._major, addr & ~TRANCHE_ID_FLAG)
            else:
                name = self._read(addr)
            self._cache[addr] = name
        return name

    def _read(self, addr: int) -> str:
        for pid in self._pids():
            try:
                raw = read_mem(pid, addr, 64)
            except (OSError, ValueError, OverflowError):
                continue
            text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
            if text.isprintable() and text:
                return text
        return f"tranche@{addr:#x}"


class Fingerprints:
    """Caches fingerprints (and normalized texts) of raw query prefixes."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self._cache: dict[bytes, str] = {}

    def __call__(self, raw: bytes) -> str:
        fp = self._cache.get(raw)
        if fp is None:
            text = raw.decode("utf-8", "replace")
            fp = fingerprint(text)
            self.texts.setdefault(fp, normalize(text))
            if len(self._cache) < 100_000:
                self._cache[raw] = fp
        return fp


def records_frame(
    raw: bytes,
    *,
    query_len: int,
    tranches: Callable[[int], str],
    fingerprints: Fingerprints,
    keep_text: bool = False,
) -> pd.DataFrame:
    """One row per request record in `raw` (concatenated struct req_event).

    The numeric columns are written once, into one int64 block that becomes
    the frame without another copy: this runs while tracing, beside the server.
    """
    a = np.frombuffer(raw, dtype=event_dtype(query_len))
    cols: dict[str, np.ndarray] = {
        "pid": a["pid"],
        "seq": a["seq"],
        "t_start": a["t_start"],
        "t_end": a["t_end"],
    }
    server = a["t_end"].astype(np.int64) - a["t_start"].astype(np.int64)
    cols["server_ns"] = server
    cols["wakeup_ns"] = a["wakeup_ns"]
    buckets = a["buckets"]
    for i, name in enumerate(SERVER_BUCKETS):
        cols[name] = buckets[:, i]
    cols[UNEXPLAINED] = server - buckets.sum(axis=1, dtype=np.int64)
    rq = a["rq_ctx"]
    for i, ctx in enumerate(CONTEXTS):
        cols[RUNQUEUE_PREFIX + ctx] = rq[:, i]
    cols.update(_lwlock_columns(a, tranches))
    lock = a["lock_ns"]
    for i, name in enumerate(LOCK_TYPES):
        if lock[:, i].any():
            cols[LOCK_PREFIX + name] = lock[:, i]
    for name in COUNTS:
        cols[name] = a[name]
    cols["depth_at_end"] = a["depth_at_end"]
    # partial: began before attach; aborted: its backend exited inside it
    for bit, name in enumerate(FLAGS):
        cols[name] = (a["flags"] >> bit) & 1
    for name in ACCOUNT_COLUMNS:
        cols[name] = a[name]
    block = np.empty((len(cols), len(a)), dtype=np.int64)
    for i, col in enumerate(cols.values()):
        block[i] = col
    df = pd.DataFrame(block.T, columns=list(cols), copy=False)
    # fingerprint each distinct text once (grouped by a vectorized 64-bit hash)
    query = np.ascontiguousarray(a["query"])
    texts = query.view(f"S{query_len}").ravel()
    _, first, inverse = np.unique(text_hashes(query), return_index=True, return_inverse=True)
    uniq = [bytes(texts[i]) for i in first.tolist()]
    fps = np.array([fingerprints(q) for q in uniq], dtype=object)
    df["fingerprint"] = fps[inverse.ravel()] if len(a) else np.array([], dtype=object)
    if keep_text:
        decoded = np.array([q.decode("utf-8", "replace") for q in uniq], dtype=object)
        df["query"] = decoded[inverse.ravel()] if len(a) else np.array([], dtype=object)
    return df


FNV_PRIME = np.uint64(0x100000001B3)


def text_hashes(query: np.ndarray) -> np.ndarray:
    """A 64-bit FNV-style hash per row of a fixed-width text column, vectorized."""
    n = len(query)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    raw = np.ascontiguousarray(query).view(np.uint8).reshape(n, -1)
    width = raw.shape[1] - raw.shape[1] % 8
    words = (raw if width == raw.shape[1] else np.ascontiguousarray(raw[:, :width])).view(
        np.uint64)
    acc = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(words.shape[1]):
            acc = (acc ^ words[:, i]) * FNV_PRIME
        for j in range(width, raw.shape[1]):
            acc = (acc ^ raw[:, j].astype(np.uint64)) * FNV_PRIME
    return acc


def _lwlock_columns(a: np.ndarray, tranches: Callable[[int], str]) -> dict[str, np.ndarray]:
    """lwlock:<tranche> columns from the per-request slots."""
    n = len(a)
    out: dict[str, np.ndarray] = {}
    lw = a["lw"]
    for slot in range(lw.shape[1]):
        addrs = lw["tranche"][:, slot]
        ns = lw["ns"][:, slot].astype(np.int64)
        for addr in np.unique(addrs[ns > 0]):
            col = LWLOCK_PREFIX + tranches(int(addr))
            vals = out.setdefault(col, np.zeros(n, dtype=np.int64))
            mask = addrs == addr
            vals[mask] += ns[mask]
    other = a["lw_other_ns"].astype(np.int64)
    if other.any():
        out[LWLOCK_PREFIX + "other"] = out.get(LWLOCK_PREFIX + "other", 0) + other
    return out


def runq_frame(raw: bytes) -> pd.DataFrame:
    """Driver run-queue waits (concatenated struct runq_event) as client_tid, start, end."""
    a = np.frombuffer(raw, dtype=np.dtype(RunqEvent))
    return pd.DataFrame({
        "client_tid": a["pid"].astype(np.int64),
        "start": a["start"].astype(np.int64),
        "end": a["end"].astype(np.int64),
    })
