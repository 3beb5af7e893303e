"""The kernel/user ABI, defined once: constants and record structs.

Python is the source.  The BPF programs get this as C text (``abi_header()``,
inlined before probes/pgtrace.h by the loader), Python gets ctypes/numpy types
built from the same tables, and ``check_layout`` compares both with what bcc
compiled at every attach, so drift fails there with one line.
``pgtrace attach --ebpf`` prints the generated header with the sources.
"""

from __future__ import annotations

import ctypes as ct
import enum
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

import numpy as np

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

DEFAULT_QUERY_LEN = 128


class Mode(enum.IntEnum):
    """Scheduler mode of a traced task (task_state.mode)."""

    ONCPU = 0
    RUNQ = 1
    BLOCKED = 2


class Req(enum.IntEnum):
    """Request state of a traced task (task_state.req)."""

    NONE = 0   # unknown: startup, before its first ReadyForQuery
    IDLE = 1   # nothing received that a ReadyForQuery will answer
    BUSY = 2   # bytes received since, not yet answered


class Seed(enum.IntEnum):
    """How a backend already running at attach starts (task_state.seed)."""

    NONE = 0     # forked while traced, or resolved
    PENDING = 1  # seeded at attach: its state is read at its next event
    IDLE = 2     # status entry idle: a ReadyForQuery before any receive ends a partial request
    UNKNOWN = 3  # status entry unreadable: its first answered request is only counted partial


class Origin(enum.IntEnum):
    """Who opened a wait context, and so who closes it (ctx_entry.origin)."""

    PROBE = 0    # a USDT start probe: its done probe
    SYSCALL = 1  # a syscall enter: its exit
    SCHED = 2    # a switch-out, from the wait event: the switch-in


class Arg(enum.IntEnum):
    """Where a USDT argument lives (argspec.kind)."""

    REG = 1
    MEM = 2
    CONST = 3


NBUCKETS = len(SERVER_BUCKETS)
NLOCKTYPES = len(LOCK_TYPES)  # LockTagType values (storage/lock.h), the last one = other
NCTX = len(CONTEXTS)
NLW = 4                 # LWLock tranches kept per request; more go to lw_other_ns
MAXDEPTH = 4            # nested wait contexts (a power of two)
NCHECKPOINTS = 64       # checkpoints kept; slot NCHECKPOINTS counts them
NIO_EVENTS = 256        # IO wait event ids the io_wait_ctx map covers
#: req_event lw slots hold TRANCHE_ID_FLAG | id when the tranche came from a wait event
#: (else the address of the tranche name in the server's memory).
TRANCHE_ID_FLAG = 1 << 63


def constants() -> dict[str, int]:
    """Every ABI constant by its C name, in header order."""
    out: dict[str, int] = {f"B_{b.upper()}": i for i, b in enumerate(SERVER_BUCKETS)}
    out["NBUCKETS"] = NBUCKETS
    out |= {f"CTX_{c.upper()}": i for i, c in enumerate(CONTEXTS)}
    out |= {"NCTX": NCTX, "MAXDEPTH": MAXDEPTH}
    for prefix, members in (("MODE", Mode), ("REQ", Req), ("SEED", Seed),
                            ("ORIGIN", Origin), ("ARG", Arg)):
        out |= {f"{prefix}_{m.name}": int(m) for m in members}
    out |= {f"FLAG_{f.upper()}": 1 << bit for bit, f in enumerate(FLAGS)}
    out |= {f"C_{c.upper()}": i for i, c in enumerate(COUNTERS)}
    out |= {"NCOUNTERS": len(COUNTERS), "NLW": NLW, "NLOCKTYPES": NLOCKTYPES,
            "NCHECKPOINTS": NCHECKPOINTS, "NIO_EVENTS": NIO_EVENTS,
            "TRANCHE_ID_FLAG": TRANCHE_ID_FLAG}
    return out


#: One field: name, C type ("struct x" for a struct above it), array length (a number,
#: a constant's name, or None), comment.
Field = tuple[str, str, int | str | None, str]

_COUNT_NOTES = {"n_vcsw": "voluntary context switches", "n_ivcsw": "preemptions"}
_COUNT_FIELDS: tuple[Field, ...] = tuple((n, "u32", None, _COUNT_NOTES.get(n, "")) for n in COUNTS)
_ACCOUNT_NOTES = {
    "ctx_cpu_ns": "on CPU inside a wait context (part of that context's bucket)",
    "idle_ns": "the gap before it: since the previous request's end (0: none)",
    "idle_cpu_ns": "of that gap: on CPU",
    "idle_runq_ns": "of that gap: waiting for a CPU (the wake-up's wait among it)",
}
_ACCOUNT_FIELDS: tuple[Field, ...] = tuple((n, "u64", None, _ACCOUNT_NOTES[n])
                                           for n in ACCOUNT_COLUMNS)

#: Every struct shared by the BPF programs and Python, in dependency order.
STRUCTS: dict[str, tuple[Field, ...]] = {
    "lw_slot": (
        ("tranche", "u64", None, "TRANCHE_ID_FLAG | tranche id, or the name's address"),
        ("ns", "u64", None, ""),
        ("count", "u32", None, ""),
        ("pad", "u32", None, ""),
    ),
    # one record per request: what leaves the kernel
    "req_event": (
        ("t_start", "u64", None, "CLOCK_MONOTONIC ns: request bytes received"),
        ("t_end", "u64", None, "ReadyForQuery sent"),
        ("wakeup_ns", "u64", None, "run-queue wait of the wake-up that delivered the request"),
        ("seq", "u64", None, "per-backend request number"),
        ("pid", "u32", None, ""),
        ("depth_at_end", "u32", None, "wait contexts still open at the end (0 expected)"),
        ("flags", "u32", None, "FLAG_*"),
        ("pad0", "u32", None, ""),
        ("buckets", "u64", "NBUCKETS", "B_*"),
        ("lw", "struct lw_slot", "NLW", ""),
        ("lw_other_ns", "u64", None, ""),
        ("lock_ns", "u64", "NLOCKTYPES", ""),
        *_COUNT_FIELDS,
        ("rq_ctx", "u64", "NCTX", "runqueue split by the context it interrupted (CTX_*)"),
        *_ACCOUNT_FIELDS,
        ("query", "char", "QUERY_LEN", ""),
    ),
    # a checkpoint of the traced cluster: [start, end), end 0 while it runs
    "checkpoint_span": (
        ("start", "u64", None, ""),
        ("end", "u64", None, ""),
    ),
    # a run-queue wait of a driver (client) thread: [start, end)
    "runq_event": (
        ("start", "u64", None, ""),
        ("end", "u64", None, ""),
        ("pid", "u32", None, ""),
        ("pad", "u32", None, ""),
    ),
    "ctx_entry": (
        ("tranche", "u64", None, "LWLock: TRANCHE_ID_FLAG | tranche id, or the name's address"),
        ("kind", "u8", None, "CTX_*"),
        ("locktype", "u8", None, ""),
        ("origin", "u8", None, "ORIGIN_*"),
        ("pad", "u8", 5, ""),
    ),
    "task_state": (
        ("last_ts", "u64", None, "last time charged"),
        ("wake_ts", "u64", None, "when the last wake-up made it runnable"),
        ("wake_runq_ns", "u64", None, "run-queue wait of that wake-up, once it ran"),
        ("wal_fd", "s32", None, "fd of the open WAL segment, -1 if none"),
        ("init_fd", "s32", None, "fd of a WAL segment being created (xlogtemp.*), -1 if none"),
        ("mode", "u8", None, "MODE_*"),
        ("req", "u8", None, "REQ_*"),
        ("depth", "u8", None, ""),
        ("overflow", "u8", None, ""),
        ("opening_wal", "u8", None, "1: opening a WAL segment, 2: a new one (xlogtemp.*)"),
        ("ending", "u8", None, "inside ReadyForQuery: its send ends the request"),
        ("is_client", "u8", None, "a driver thread: report its run-queue waits"),
        ("resending", "u8", None, "a send that carried ReadyForQuery is not complete yet"),
        ("pid", "u32", None, "the task this state belongs to (0: a free slot)"),
        ("sent_tail", "u64", None, "the last 6 bytes sent, big-endian in the low 48 bits"),
        ("resend_len", "u64", None, "bytes of that send still to go out"),
        ("activity_raw", "u64", None, "the backend's st_activity_raw, once read"),
        ("wait_event_ptr", "u64", None, "its my_wait_event_info target, once read"),
        ("recv_fd", "s32", None, "the fd of the receive in progress, -1 if none"),
        ("seed", "u8", None, "SEED_*"),
        ("partial", "u8", None, "the open request began before attach"),
        ("exit_clean", "u8", None, "exit_group(0) seen: a clean end (Terminate)"),
        ("off_ustack", "s32", None, "with stacks: user stack where it last blocked"),
        ("off_kstack", "s32", None, "with stacks: kernel stack where it last blocked"),
        ("stack", "struct ctx_entry", "MAXDEPTH", ""),
        ("acc", "struct req_event", None, ""),
    ),
    "argspec": (
        ("off", "s64", None, "memory displacement or constant"),
        ("kind", "u8", None, "ARG_*"),
        ("size", "u8", None, ""),
        ("is_signed", "u8", None, ""),
        ("reg", "u8", None, "index of the register in struct pt_regs, as u64 words"),
        ("pad", "u32", None, ""),
    ),
    "argkey": (
        ("ip", "u64", None, "runtime address of the USDT site"),
        ("argno", "u32", None, "0-based"),
        ("pad", "u32", None, ""),
    ),
    # stacks for flame graphs: on-CPU samples, off-CPU time by bucket
    "stack_key": (
        ("ustack", "s32", None, ""),
        ("kstack", "s32", None, ""),
        ("bucket", "u32", None, "off-CPU: the bucket the blocked time went to"),
        ("pad", "u32", None, ""),
    ),
}

_SCALARS: dict[str, Any] = {
    "u8": ct.c_uint8, "u32": ct.c_uint32, "u64": ct.c_uint64,
    "s32": ct.c_int32, "s64": ct.c_int64, "char": ct.c_char,
}


def _c_int(value: int) -> str:
    return f"{value:#x}ULL" if value >= 1 << 31 else str(value)


def abi_header() -> str:
    """The C text of the ABI (QUERY_LEN comes as a -D flag)."""
    lines = ["/* pgtrace_abi.h: generated from pgtrace/collect/events.py; do not edit */",
             "#ifndef PGTRACE_ABI_H", "#define PGTRACE_ABI_H", ""]
    lines += [f"#define {name} {_c_int(v)}" for name, v in constants().items()]
    for sname, fields in STRUCTS.items():
        lines += ["", f"struct {sname} {{"]
        for name, ctype, length, comment in fields:
            decl = f"\t{ctype} {name}" + ("" if length is None else f"[{length}]") + ";"
            lines.append(f"{decl}  /* {comment} */" if comment else decl)
        lines.append("};")
    lines += ["", "#endif /* PGTRACE_ABI_H */", ""]
    return "\n".join(lines)


@cache
def struct_types(query_len: int = DEFAULT_QUERY_LEN) -> dict[str, type[ct.Structure]]:
    """ctypes types of every struct in STRUCTS, for a given QUERY_LEN."""
    sizes: dict[str, int] = {**constants(), "QUERY_LEN": query_len}
    out: dict[str, type[ct.Structure]] = {}
    for sname, fields in STRUCTS.items():
        cfields: list[tuple[str, Any]] = []
        for name, ctype, length, _comment in fields:
            base = out[ctype[7:]] if ctype.startswith("struct ") else _SCALARS[ctype]
            if length is not None:
                base = base * (sizes[length] if isinstance(length, str) else length)
            cfields.append((name, base))
        title = "".join(w.title() for w in sname.split("_"))
        out[sname] = type(title, (ct.Structure,), {"_fields_": cfields})
    return out


def req_event_type(query_len: int = DEFAULT_QUERY_LEN) -> type[ct.Structure]:
    """struct req_event for a given QUERY_LEN."""
    return struct_types(query_len)["req_event"]


def event_dtype(query_len: int = DEFAULT_QUERY_LEN) -> np.dtype[Any]:
    """A numpy dtype with the exact layout of struct req_event."""
    return np.dtype(req_event_type(query_len))


_TYPES = struct_types()
RunqEvent = _TYPES["runq_event"]
ArgKey = _TYPES["argkey"]
ArgSpecC = _TYPES["argspec"]

#: x86_64 struct pt_regs, as u64 words.
PT_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
)


# --- the compiled layout against the mirror ---------------------------------------------------

def _kind(t: Any) -> str:
    """A scalar's class and size: bcc's c_ulonglong and our c_uint64 are the same u64."""
    code = str(t._type_)
    cls = "char" if code == "c" else ("s" if code in "bhilq" else "u")
    return f"{cls}{8 * ct.sizeof(t)}"


def layout(t: Any, prefix: str = "") -> Iterator[tuple[str, int, int, str]]:
    """(path, offset, size, kind) of a ctypes type and its members, recursively, in order.

    bcc's own padding members (``__pad_*``) are left out: offsets say where the holes are.
    """
    if isinstance(t, type) and issubclass(t, ct.Structure):
        yield prefix or ".", 0, ct.sizeof(t), "struct"
        for fname, ftype, *_ in t._fields_:
            if fname.startswith("__pad"):
                continue
            field = getattr(t, fname)
            for path, off, size, kind in layout(ftype, f"{prefix}.{fname}"):
                yield path, field.offset + off, size, kind
    elif isinstance(t, type) and issubclass(t, ct.Array):
        arr: Any = t
        elem, n = arr._type_, arr._length_
        esize = ct.sizeof(elem)
        yield prefix or ".", 0, ct.sizeof(t), f"array[{n}]"
        for i in range(n):
            for path, off, size, kind in layout(elem, f"{prefix}[{i}]"):
                yield path, i * esize + off, size, kind
    else:
        yield prefix or ".", 0, ct.sizeof(t), _kind(t)


def layout_difference(ours: Any, theirs: Any) -> str | None:
    """The first member where two layouts differ, described, or None if they agree.

    Scalars first (the first moved field says most), then arrays and structs.
    """
    a, b = list(layout(ours)), list(layout(theirs))
    def scalar(m: tuple[str, int, int, str]) -> bool:
        return not m[3].startswith(("struct", "array"))

    for pairs in (zip(filter(scalar, a), filter(scalar, b), strict=False),
                  zip(a, b, strict=False)):
        for x, y in pairs:
            if x != y:
                return (f"{x[0]} is at {x[1]}, {x[2]} bytes, {x[3]} in Python, "
                        f"{y[0]} at {y[1]}, {y[2]} bytes, {y[3]} as compiled")
    if len(a) != len(b):
        return f"{len(a)} members in Python, {len(b)} as compiled"
    return None


def map_mirrors(query_len: int, stacks: bool,
                io_map: bool) -> dict[str, tuple[Any | None, Any]]:
    """Map name -> (our key type or None: not checked, our leaf type), for every map
    whose keys or values Python reads or writes, or whose values leave the kernel."""
    t = struct_types(query_len)
    out: dict[str, tuple[Any | None, Any]] = {
        "layout_req_event": (None, t["req_event"]),
        "layout_runq_event": (None, t["runq_event"]),
        "deferred": (ct.c_uint64, t["req_event"]),
        "states": (ct.c_int32, t["task_state"]),
        "zero_state": (ct.c_int32, t["task_state"]),
        "tasks": (ct.c_uint32, t["task_state"]),
        "spills": (ct.c_int32, ct.c_uint32),
        "counters": (ct.c_int32, ct.c_uint64),
        "checkpoints": (ct.c_int32, t["checkpoint_span"]),
        "usdt_args": (t["argkey"], t["argspec"]),
    }
    if stacks:
        out["oncpu_samples"] = (t["stack_key"], ct.c_uint64)
        out["offcpu_ns"] = (t["stack_key"], ct.c_uint64)
    if io_map:
        out["io_wait_ctx"] = (ct.c_int32, ct.c_uint8)
    return out


def check_layout(tables: Mapping[str, Any] | Any, query_len: int, *, stacks: bool = False,
                 io_map: bool = False) -> None:
    """Raise AbiMismatchError at the first map whose compiled key or value differs from
    the Python mirror (`tables`: the bcc.BPF object, or name -> object with Key, Leaf)."""
    for name, (key, leaf) in map_mirrors(query_len, stacks, io_map).items():
        table = tables[name]
        compiled = getattr(table, "sLeaf", table.Leaf)  # per-CPU maps: one CPU's value
        for what, ours, theirs in (("value", leaf, compiled), ("key", key, table.Key)):
            diff = None if ours is None else layout_difference(ours, theirs)
            if diff is not None:
                raise AbiMismatchError(
                    f"the BPF map {name}'s {what} layout is not pgtrace's mirror: {diff}",
                    "probes/ and pgtrace/collect/events.py disagree")
