"""records_frame: raw struct req_event bytes (built with the ctypes mirror) -> DataFrame."""

from __future__ import annotations

import ctypes as ct
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pgtrace.collect.events import req_event_type
from pgtrace.collect.frame import Fingerprints, records_frame
from pgtrace.fingerprint import fingerprint, normalize
from pgtrace.model import COUNTS, LOCK_TYPES, SERVER_BUCKETS

TRANCHES = {0x1000: "WALWrite", 0x2000: "BufferContent", 0x3000: "LockManager"}
B = {name: i for i, name in enumerate(SERVER_BUCKETS)}
L = {name: i for i, name in enumerate(LOCK_TYPES)}


def record(qlen: int = 128, **kw: Any) -> bytes:
    """One struct req_event as the kernel writes it."""
    ev = req_event_type(qlen)()
    for name in ("t_start", "t_end", "wakeup_ns", "seq", "pid", "depth_at_end",
                 "lw_other_ns", *COUNTS):
        if name in kw:
            setattr(ev, name, kw[name])
    for bucket, ns in kw.get("buckets", {}).items():
        ev.buckets[B[bucket]] = ns
    for i, (tranche, ns, count) in enumerate(kw.get("lw", [])):
        ev.lw[i].tranche, ev.lw[i].ns, ev.lw[i].count = tranche, ns, count
    for locktype, ns in kw.get("lock", {}).items():
        ev.lock_ns[L[locktype]] = ns
    if "query" in kw:
        ev.query = kw["query"]
    return bytes(ev)


def resolve(addr: int) -> str:
    """The fake tranche resolver: a dict lookup, as TrancheNames falls back for unknowns."""
    return TRANCHES.get(addr, f"tranche@{addr:#x}")


def make_frame(raw: bytes, qlen: int = 128, keep_text: bool = False) -> pd.DataFrame:
    return records_frame(raw, query_len=qlen, tranches=resolve,
                         fingerprints=Fingerprints(), keep_text=keep_text)


RECORDS = [
    dict(pid=101, seq=7, t_start=1_000_000, t_end=1_005_000, wakeup_ns=33, depth_at_end=0,
         buckets={"cpu": 2_000, "runqueue": 500, "lwlock": 1_500, "fsync": 900},
         lw=[(0x1000, 1_000, 2), (0x2000, 500, 1)],
         n_lwlock=3, n_fsync=1, n_vcsw=4, n_ivcsw=1,
         query=b"INSERT INTO t VALUES (1, 'abc')"),
    dict(pid=102, seq=1, t_start=2_000_000, t_end=2_010_000, wakeup_ns=0, depth_at_end=1,
         buckets={"cpu": 3_000, "lock": 4_000, "lwlock": 2_600, "io_read": 400},
         lw=[(0x2000, 100, 1), (0x3000, 200, 1), (0x1000, 300, 1), (0x4000, 1_000, 1)],
         lw_other_ns=1_000, lock={"transactionid": 3_000, "relation": 1_000},
         n_lock=2, n_lwlock=5, n_read=3, query=b"SELECT * FROM t WHERE id = 42"),
    dict(pid=101, seq=8, t_start=3_000_000, t_end=3_000_100,
         buckets={"cpu": 100}, query=b""),
]


@pytest.fixture
def df() -> pd.DataFrame:
    return make_frame(b"".join(record(**r) for r in RECORDS))  # type: ignore[arg-type]


def test_identity_and_time_columns(df: pd.DataFrame) -> None:
    assert len(df) == 3
    assert list(df["pid"]) == [101, 102, 101]
    assert list(df["seq"]) == [7, 1, 8]
    assert list(df["t_start"]) == [1_000_000, 2_000_000, 3_000_000]
    assert list(df["t_end"]) == [1_005_000, 2_010_000, 3_000_100]
    assert list(df["server_ns"]) == [5_000, 10_000, 100]
    assert list(df["wakeup_ns"]) == [33, 0, 0]
    assert list(df["depth_at_end"]) == [0, 1, 0]
    for col in ("pid", "seq", "t_start", "t_end", "server_ns", *SERVER_BUCKETS, "unexplained"):
        assert df[col].dtype == np.int64, col


def test_bucket_columns_and_unexplained(df: pd.DataFrame) -> None:
    for r, (_, row) in zip(RECORDS, df.iterrows(), strict=True):
        buckets: dict[str, int] = r["buckets"]  # type: ignore[assignment]
        for b in SERVER_BUCKETS:
            assert row[b] == buckets.get(b, 0), b
        assert row["unexplained"] == row["server_ns"] - sum(buckets.values())
    assert list(df["unexplained"]) == [100, 0, 0]
    total = df[[*SERVER_BUCKETS, "unexplained"]].sum(axis=1)
    assert (total == df["server_ns"]).all()


def test_lwlock_columns_from_slots(df: pd.DataFrame) -> None:
    lw = sorted(c for c in df.columns if c.startswith("lwlock:"))
    assert lw == ["lwlock:BufferContent", "lwlock:LockManager", "lwlock:WALWrite",
                  "lwlock:other", "lwlock:tranche@0x4000"]
    assert list(df["lwlock:WALWrite"]) == [1_000, 300, 0]
    assert list(df["lwlock:BufferContent"]) == [500, 100, 0]
    assert list(df["lwlock:LockManager"]) == [0, 200, 0]
    # lw_other_ns (tranches beyond the NLW slots) goes to lwlock:other
    assert list(df["lwlock:other"]) == [0, 1_000, 0]
    # per request the tranche columns sum to the lwlock bucket
    assert (df[lw].sum(axis=1) == df["lwlock"]).all()


def test_unknown_tranche_goes_through_the_resolver() -> None:
    raw = record(pid=1, t_start=0, t_end=10, buckets={"lwlock": 10}, lw=[(0x4000, 10, 1)])
    df = records_frame(raw, query_len=128, tranches=resolve, fingerprints=Fingerprints())
    assert list(df["lwlock:tranche@0x4000"]) == [10]


def test_same_tranche_in_different_slots_is_one_column() -> None:
    raw = b"".join([
        record(pid=1, t_start=0, t_end=10, buckets={"lwlock": 10}, lw=[(0x1000, 10, 1)]),
        record(pid=2, t_start=0, t_end=10, buckets={"lwlock": 7},
               lw=[(0x2000, 3, 1), (0x1000, 4, 1)]),
    ])
    df = make_frame(raw)
    assert list(df["lwlock:WALWrite"]) == [10, 4]
    assert list(df["lwlock:BufferContent"]) == [0, 3]


def test_lock_columns_only_for_types_present(df: pd.DataFrame) -> None:
    lock = sorted(c for c in df.columns if c.startswith("lock:"))
    assert lock == ["lock:relation", "lock:transactionid"]
    assert list(df["lock:transactionid"]) == [0, 3_000, 0]
    assert list(df["lock:relation"]) == [0, 1_000, 0]
    assert (df[lock].sum(axis=1) == df["lock"]).all()


def test_lock_type_other_is_the_last_slot() -> None:
    raw = record(pid=1, t_start=0, t_end=5, buckets={"lock": 5}, lock={"other": 5})
    df = make_frame(raw)
    assert [c for c in df.columns if c.startswith("lock:")] == ["lock:other"]


def test_no_wait_columns_without_waits() -> None:
    df = make_frame(record(pid=1, t_start=0, t_end=5, buckets={"cpu": 5}))
    assert not [c for c in df.columns if c.startswith(("lwlock:", "lock:"))]


def test_counts(df: pd.DataFrame) -> None:
    for name in COUNTS:
        expect = [int(r.get(name, 0)) for r in RECORDS]  # type: ignore[call-overload]
        assert list(df[name]) == expect, name
        assert df[name].dtype == np.int64


def test_fingerprints_without_text(df: pd.DataFrame) -> None:
    assert "query" not in df.columns
    assert list(df["fingerprint"]) == [
        fingerprint("INSERT INTO t VALUES (1, 'abc')"),
        fingerprint("SELECT * FROM t WHERE id = 42"),
        "",
    ]
    assert df["fingerprint"][0] == fingerprint("insert into t values (2, 'x')")


def test_query_text_only_with_keep_text() -> None:
    raw = b"".join(record(**r) for r in RECORDS)  # type: ignore[arg-type]
    fps = Fingerprints()
    df = records_frame(raw, query_len=128, tranches=resolve, fingerprints=fps,
                       keep_text=True)
    assert list(df["query"]) == [
        "INSERT INTO t VALUES (1, 'abc')",
        "SELECT * FROM t WHERE id = 42",
        "",
    ]
    # the fingerprints object keeps the normalized text of each fingerprint
    fp0 = df["fingerprint"][0]
    assert fps.texts[fp0] == normalize("INSERT INTO t VALUES (1, 'abc')")


def test_full_length_query_without_nul() -> None:
    text = b"SELECT " + b"x" * 57  # exactly QUERY_LEN=64 bytes, no terminator
    assert len(text) == 64
    raw = record(64, pid=1, t_start=0, t_end=1, query=text)
    df = make_frame(raw, qlen=64, keep_text=True)
    assert df["query"][0] == text.decode()
    assert df["fingerprint"][0] == fingerprint(text.decode())


@pytest.mark.parametrize("qlen", [64, 128, 256])
def test_other_query_lengths(qlen: int) -> None:
    raw = b"".join(record(qlen, pid=p, seq=p, t_start=p, t_end=p + 10,
                          buckets={"cpu": 10}, query=b"select 1") for p in range(5))
    assert len(raw) == 5 * ct.sizeof(req_event_type(qlen))
    df = make_frame(raw, qlen=qlen)
    assert list(df["pid"]) == list(range(5))
    assert (df["server_ns"] == 10).all()
    assert (df["unexplained"] == 0).all()
    assert df["fingerprint"].nunique() == 1


def test_no_records() -> None:
    df = make_frame(b"")
    assert len(df) == 0
    for col in ("pid", "server_ns", *SERVER_BUCKETS, "unexplained", "fingerprint"):
        assert col in df.columns


def test_fingerprints_cache_is_per_raw_prefix() -> None:
    fps = Fingerprints()
    a = fps(b"SELECT 1")
    b = fps(b"select   2")
    assert a == b
    assert len(fps.texts) == 1
    assert fps.texts[a] == "select ?"
