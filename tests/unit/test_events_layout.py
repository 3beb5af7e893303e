"""The ABI is defined once (pgtrace/collect/events.py): the C the probes see is generated
from it, nothing in probes/ redefines it, and bcc's compiled layout is checked at attach."""

from __future__ import annotations

import ctypes as ct
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pgtrace.collect import events, loader
from pgtrace.collect.events import (
    STRUCTS,
    Arg,
    ArgKey,
    ArgSpecC,
    abi_header,
    check_layout,
    constants,
    event_dtype,
    layout_difference,
    map_mirrors,
    req_event_type,
    struct_types,
)
from pgtrace.errors import AbiMismatchError
from pgtrace.model import (
    ACCOUNT_COLUMNS,
    CONTEXTS,
    COUNTERS,
    COUNTS,
    FLAGS,
    LOCK_TYPES,
    SERVER_BUCKETS,
)

# bcc warns about str table names; that is bcc's business, not this test's
pytestmark = pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")

PROBES = Path(__file__).resolve().parents[2] / "probes"
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Z_][A-Z0-9_]*)[ \t]+(\S+)", re.M)
_STRUCT = re.compile(r"^\s*struct\s+(\w+)\s*\{", re.M)


def _defines(text: str) -> dict[str, str]:
    return dict(_DEFINE.findall(text))


# --- one definition: generated for C, nothing in probes/ repeats it -----------------------------


def test_probes_define_no_abi_name() -> None:
    abi = set(constants()) | {"QUERY_LEN", "RINGBUF_PAGES", "CLIENT_RINGBUF_PAGES",
                              "STATE_SLOTS", "POSTMASTER_PID", "STATE_RUNNING"}
    for path in sorted(PROBES.iterdir()):
        text = path.read_text()
        assert not abi & set(_defines(text)), path.name
        assert not set(STRUCTS) & set(_STRUCT.findall(text)), path.name
    assert not list(PROBES.glob("*abi*")), "the ABI header is generated, not kept in probes/"


def test_generated_header_carries_every_constant() -> None:
    d = {k: int(v.removesuffix("ULL"), 0) for k, v in _defines(abi_header()).items()
         }
    assert d == constants()
    assert set(_STRUCT.findall(abi_header())) == set(STRUCTS)
    # the probes see it first, then pgtrace.h (whose #error needs it)
    assert [name for name, _ in loader.iter_sources()][:2] == ["pgtrace_abi.h", "pgtrace.h"]


def test_indices_follow_the_model() -> None:
    d = constants()
    for prefix, names in (("B_", SERVER_BUCKETS), ("CTX_", CONTEXTS), ("C_", COUNTERS)):
        assert [k for k in d if k.startswith(prefix)] == [prefix + n.upper() for n in names]
        assert [d[prefix + n.upper()] for n in names] == list(range(len(names)))
    assert (d["NBUCKETS"], d["NCTX"], d["NCOUNTERS"], d["NLOCKTYPES"]) == (
        len(SERVER_BUCKETS), len(CONTEXTS), len(COUNTERS), len(LOCK_TYPES))
    assert {k: v for k, v in d.items() if k.startswith("FLAG_")} == {
        f"FLAG_{f.upper()}": 1 << bit for bit, f in enumerate(FLAGS)}
    assert LOCK_TYPES[-1] == "other"
    assert d["MAXDEPTH"] & (d["MAXDEPTH"] - 1) == 0  # the probes mask depths with it
    assert d["TRANCHE_ID_FLAG"] == 1 << 63 and "0x8000000000000000ULL" in abi_header()


def test_runtime_constants_come_from_the_loader() -> None:
    flags = loader.ProgramConfig().cflags()
    for name in ("POSTMASTER_PID", "QUERY_LEN", "RINGBUF_PAGES", "CLIENT_RINGBUF_PAGES",
                 "STATE_SLOTS", "STATE_RUNNING", "WAL_WRITE_IS_SYNC", "WAL_FLUSH_IS_FSYNC"):
        assert sum(f.startswith(f"-D{name}=") for f in flags) == 1, name
    assert f"-DQUERY_LEN={events.DEFAULT_QUERY_LEN}" in flags


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


# --- the check at attach, on layouts made by hand (no root) -----------------------------------


def _tables(query_len: int, **swap: tuple[Any, Any]) -> dict[str, Any]:
    """What bcc would hand over if it compiled exactly our mirror, with some maps swapped."""
    out = {}
    for name, (key, leaf) in map_mirrors(query_len, True, True).items():
        key, leaf = swap.get(name, (key, leaf))
        out[name] = SimpleNamespace(Key=key or ct.c_int, Leaf=leaf)
    return out


def test_check_layout_accepts_bcc_spelling() -> None:
    # bcc spells u64 as c_ulonglong, u8 as c_ubyte: the same layout
    assert layout_difference(ct.c_uint64, ct.c_ulonglong) is None
    check_layout(_tables(128), 128, stacks=True, io_map=True)


def test_check_layout_names_the_first_difference() -> None:
    fields = list(struct_types(128)["runq_event"]._fields_)
    fields[2] = ("pid", ct.c_uint64)  # a u32 grown to u64 on the C side
    drifted = type("RunqEvent", (ct.Structure,), {"_fields_": fields[:3]})
    tables = _tables(128, layout_runq_event=(None, drifted))
    with pytest.raises(AbiMismatchError) as exc:
        check_layout(tables, 128)
    line = exc.value.line()
    assert "\n" not in line
    assert "layout_runq_event's value" in line and ".pid is at 16, 4 bytes, u32" in line
    # a query length other than the one compiled is drift too
    with pytest.raises(AbiMismatchError, match="layout_req_event's value"):
        check_layout(_tables(64), 128)
    # a signedness change is drift
    with pytest.raises(AbiMismatchError, match=r"deferred's key.*u64 in Python.*s64"):
        check_layout(_tables(128, deferred=(ct.c_int64, req_event_type(128))), 128)


# --- against bcc's compiled layout (root + bpf) -----------------------------------------------


@pytest.fixture(scope="module")
def compiled() -> Iterator[dict[int, Any]]:
    """bcc's tables for two QUERY_LEN values (one with stacks), compiled once for the module;
    compile_program has already checked every map's layout."""
    out: dict[int, Any] = {}
    try:
        out[128] = loader.compile_program(loader.ProgramConfig(query_len=128, stacks=True))
        out[64] = loader.compile_program(loader.ProgramConfig(query_len=64))
        yield out
    finally:
        for bpf in out.values():
            bpf.cleanup()


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("qlen", [128, 64])
def test_maps_match_bcc(compiled: dict[int, Any], qlen: int) -> None:
    bpf = compiled[qlen]
    for name, (key, leaf) in map_mirrors(qlen, qlen == 128, False).items():
        compiled = getattr(bpf[name], "sLeaf", bpf[name].Leaf)
        assert layout_difference(leaf, compiled) is None, name
        assert key is None or layout_difference(key, bpf[name].Key) is None, name
    assert event_dtype(qlen).itemsize == ct.sizeof(bpf["layout_req_event"].Leaf)
    # the accumulator is what on_ready_for_query copies to the ring buffer: 8-aligned
    leaf = bpf["tasks"].Leaf
    assert leaf.acc.offset % 8 == 0
    assert ct.sizeof(leaf) == leaf.acc.offset + ct.sizeof(req_event_type(qlen))


@pytest.mark.root
@pytest.mark.bpf
def test_usdt_arg_structs_round_trip(compiled: dict[int, Any]) -> None:
    table = compiled[128]["usdt_args"]
    # a value written through our mirror round-trips through the kernel map
    key = ArgKey(ip=0x1234, argno=4)
    table[key] = ArgSpecC(off=-144, kind=Arg.MEM, size=8, is_signed=1, reg=4)
    got = table[key]
    assert (got.off, got.kind, got.size, got.is_signed, got.reg) == (-144, 2, 8, 1, 4)
    del table[key]


@pytest.mark.root
@pytest.mark.bpf
def test_drifted_c_fails_at_attach(monkeypatch: pytest.MonkeyPatch) -> None:
    """C that no longer matches the mirror (NLW redefined after the generated ABI) is
    refused by compile_program, the first step of every attach, with one line."""
    real = abi_header
    monkeypatch.setattr("pgtrace.collect.loader.abi_header",
                        lambda: real().replace("#define NLW 4", "#define NLW 5"))
    with pytest.raises(AbiMismatchError) as exc:
        loader.compile_program(loader.ProgramConfig())
    assert "\n" not in exc.value.line()
    line = exc.value.line()
    assert ".lw_other_ns is at 216, 8 bytes, u64 in Python, .lw[4].tranche at 216" in line
    assert exc.value.exit_code == 5
