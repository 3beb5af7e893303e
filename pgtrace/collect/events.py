"""ctypes mirrors of the structs in probes/pgtrace.h (checked against bcc by a test)."""

from __future__ import annotations

import ctypes as ct
from typing import Any

import numpy as np

from pgtrace.model import ACCOUNT_COLUMNS, CONTEXTS, COUNTS, LOCK_TYPES, SERVER_BUCKETS

NBUCKETS = len(SERVER_BUCKETS)
NLOCKTYPES = len(LOCK_TYPES)
NCTX = len(CONTEXTS)
NLW = 4
DEFAULT_QUERY_LEN = 128


class LwSlot(ct.Structure):
    """struct lw_slot."""

    _fields_ = [
        ("tranche", ct.c_uint64),
        ("ns", ct.c_uint64),
        ("count", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


def req_event_type(query_len: int = DEFAULT_QUERY_LEN) -> type[ct.Structure]:
    """struct req_event for a given QUERY_LEN."""
    fields: list[tuple[str, type]] = [
        ("t_start", ct.c_uint64),
        ("t_end", ct.c_uint64),
        ("wakeup_ns", ct.c_uint64),
        ("seq", ct.c_uint64),
        ("pid", ct.c_uint32),
        ("depth_at_end", ct.c_uint32),
        ("buckets", ct.c_uint64 * NBUCKETS),
        ("lw", LwSlot * NLW),
        ("lw_other_ns", ct.c_uint64),
        ("lock_ns", ct.c_uint64 * NLOCKTYPES),
        *((name, ct.c_uint32) for name in COUNTS),
        ("rq_ctx", ct.c_uint64 * NCTX),
        *((name, ct.c_uint64) for name in ACCOUNT_COLUMNS),
        ("query", ct.c_char * query_len),
    ]
    return type("ReqEvent", (ct.Structure,), {"_fields_": fields})


class RunqEvent(ct.Structure):
    """struct runq_event: one run-queue wait of a driver thread."""

    _fields_ = [
        ("start", ct.c_uint64),
        ("end", ct.c_uint64),
        ("pid", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


class CheckpointSpan(ct.Structure):
    """struct checkpoint_span: one checkpoint of the traced cluster."""

    _fields_ = [("start", ct.c_uint64), ("end", ct.c_uint64)]


NCHECKPOINTS = 64


class ArgKey(ct.Structure):
    """struct argkey: a USDT site's runtime address and argument number."""

    _fields_ = [("ip", ct.c_uint64), ("argno", ct.c_uint32), ("pad", ct.c_uint32)]


class ArgSpecC(ct.Structure):
    """struct argspec: where a USDT argument lives."""

    _fields_ = [
        ("off", ct.c_int64),
        ("kind", ct.c_uint8),
        ("size", ct.c_uint8),
        ("is_signed", ct.c_uint8),
        ("reg", ct.c_uint8),
        ("pad", ct.c_uint32),
    ]


ARG_REG, ARG_MEM, ARG_CONST = 1, 2, 3

#: x86_64 struct pt_regs, as u64 words.
PT_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
)


def event_dtype(query_len: int = DEFAULT_QUERY_LEN) -> np.dtype[Any]:
    """A numpy dtype with the exact layout of struct req_event."""
    return np.dtype(req_event_type(query_len))
