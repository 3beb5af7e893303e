"""The Python mirrors of probes/pgtrace.h agree with the C: constants, and bcc's own layout."""

from __future__ import annotations

import ctypes as ct
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgtrace.collect import events
from pgtrace.collect.events import ArgKey, ArgSpecC, event_dtype, req_event_type
from pgtrace.model import ACCOUNT_COLUMNS, COUNTERS, COUNTS, LOCK_TYPES, SERVER_BUCKETS

# bcc warns about str table names; that is bcc's business, not this test's
pytestmark = pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")

HEADER = Path(__file__).resolve().parents[2] / "probes" / "pgtrace.h"
_DEFINE = re.compile(r"^#define\s+([A-Z_][A-Z0-9_]*)\s+(-?\d+)\b", re.M)


def header_defines() -> dict[str, int]:
    """Every `#define NAME <integer>` of pgtrace.h (the first one wins, as in C)."""
    out: dict[str, int] = {}
    for name, value in _DEFINE.findall(HEADER.read_text()):
        out.setdefault(name, int(value))
    return out


# --- constants: pure text, no root ----------------------------------------------------------


def test_bucket_indices_match_model() -> None:
    d = header_defines()
    by_index = {v: k for k, v in d.items() if k.startswith("B_")}
    assert d["NBUCKETS"] == len(SERVER_BUCKETS) == events.NBUCKETS
    assert sorted(by_index) == list(range(len(SERVER_BUCKETS)))
    assert [by_index[i] for i in range(len(SERVER_BUCKETS))] == [
        "B_" + b.upper() for b in SERVER_BUCKETS
    ]


def test_counter_indices_match_model() -> None:
    d = header_defines()
    counters = {k: v for k, v in d.items() if k.startswith("C_")}
    assert d["NCOUNTERS"] == len(COUNTERS)
    for name, idx in counters.items():
        assert COUNTERS[idx] == name[2:].lower(), name
    # every named counter in the model has its C index (all NCOUNTERS slots are named)
    named = set(COUNTERS)
    assert {k[2:].lower() for k in counters} == named


def test_lock_types_and_lw_slots_match() -> None:
    d = header_defines()
    assert d["NLOCKTYPES"] == len(LOCK_TYPES) == events.NLOCKTYPES
    assert LOCK_TYPES[-1] == "other"
    assert d["NLW"] == events.NLW
    assert d["QUERY_LEN"] == events.DEFAULT_QUERY_LEN


def test_arg_kinds_match() -> None:
    d = header_defines()
    assert (d["ARG_REG"], d["ARG_MEM"], d["ARG_CONST"]) == (
        events.ARG_REG,
        events.ARG_MEM,
        events.ARG_CONST,
    )


def test_counts_are_the_u32_fields_in_order() -> None:
    names = [f[0] for f in req_event_type()._fields_]
    i = names.index(COUNTS[0])
    assert names[i : i + len(COUNTS)] == list(COUNTS)
    assert names[i + len(COUNTS) :] == ["rq_ctx", *ACCOUNT_COLUMNS, "query"]


@pytest.mark.parametrize("qlen", [128, 64, 200])
def test_numpy_dtype_has_the_ctypes_layout(qlen: int) -> None:
    rt = req_event_type(qlen)
    dt = event_dtype(qlen)
    assert dt.itemsize == ct.sizeof(rt)
    assert list(dt.names or ()) == [f[0] for f in rt._fields_]
    for name, *_ in rt._fields_:
        assert dt.fields is not None
        assert dt.fields[name][1] == getattr(rt, name).offset, name


# --- against bcc's compiled layout (root + bpf) -----------------------------------------------


def _layout(t: Any, prefix: str = "") -> Iterator[tuple[str, int, int, str]]:
    """(path, offset, size, kind) of every leaf of a ctypes type, recursively, in order."""
    if isinstance(t, type) and issubclass(t, ct.Structure):
        for fname, ftype, *_ in t._fields_:
            field = getattr(t, fname)
            for path, off, size, kind in _layout(ftype, f"{prefix}.{fname}"):
                yield path, field.offset + off, size, kind
        yield prefix or ".", 0, ct.sizeof(t), "struct"
    elif isinstance(t, type) and issubclass(t, ct.Array):
        elem = t._type_
        esize = ct.sizeof(elem)
        for i in range(t._length_):
            for path, off, size, kind in _layout(elem, f"{prefix}[{i}]"):
                yield path, i * esize + off, size, kind
        yield prefix, 0, ct.sizeof(t), f"array[{t._length_}]"
    else:
        # scalar: the struct-module code says size and signedness (c_uint64 is c_ulong)
        yield prefix, 0, ct.sizeof(t), str(t._type_)


def _assert_same_layout(ours: Any, theirs: Any) -> None:
    assert ct.sizeof(ours) == ct.sizeof(theirs)
    assert [f[0] for f in ours._fields_] == [f[0] for f in theirs._fields_]
    assert list(_layout(ours)) == list(_layout(theirs))


@pytest.fixture(scope="module")
def compiled() -> Iterator[dict[int, Any]]:
    """bcc's tables for two QUERY_LEN values, compiled once for the module."""
    from pgtrace.collect.loader import ProgramConfig, compile_program

    out: dict[int, Any] = {}
    try:
        for qlen in (128, 64):
            out[qlen] = compile_program(ProgramConfig(query_len=qlen))
        yield out
    finally:
        for bpf in out.values():
            bpf.cleanup()


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("qlen", [128, 64])
def test_req_event_matches_bcc(compiled: dict[int, Any], qlen: int) -> None:
    theirs = compiled[qlen]["layout_req_event"].Leaf
    _assert_same_layout(req_event_type(qlen), theirs)
    assert event_dtype(qlen).itemsize == ct.sizeof(theirs)


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("qlen", [128, 64])
def test_task_state_accumulator_matches_bcc(compiled: dict[int, Any], qlen: int) -> None:
    tasks = compiled[qlen]["tasks"]
    assert ct.sizeof(tasks.Key) == 4
    leaf = tasks.Leaf
    acc = dict((f[0], f[1]) for f in leaf._fields_)["acc"]
    _assert_same_layout(req_event_type(qlen), acc)
    # the accumulator is what on_ready_for_query copies to the ring buffer: 8-aligned
    assert leaf.acc.offset % 8 == 0
    assert ct.sizeof(leaf) == leaf.acc.offset + ct.sizeof(acc)


@pytest.mark.root
@pytest.mark.bpf
def test_usdt_arg_structs_match_bcc(compiled: dict[int, Any]) -> None:
    table = compiled[128]["usdt_args"]
    _assert_same_layout(ArgKey, table.Key)
    _assert_same_layout(ArgSpecC, table.Leaf)
    # a value written through our mirror round-trips through the kernel map
    key = ArgKey(ip=0x1234, argno=4)
    table[key] = ArgSpecC(off=-144, kind=events.ARG_MEM, size=8, is_signed=1, reg=4)
    got = table[key]
    assert (got.off, got.kind, got.size, got.is_signed, got.reg) == (-144, 2, 8, 1, 4)
    del table[key]
