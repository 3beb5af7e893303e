"""Tranche and IO wait event tables, and how sleeps on them are classified."""

from __future__ import annotations

import os

import pytest

from pgtrace.collect.events import NIO_EVENTS, TRANCHE_ID_FLAG
from pgtrace.collect.waitevent import (
    io_contexts,
    io_wait_context,
    supported,
    tranche_name,
)
from pgtrace.model import CONTEXTS
from pgtrace.tranche_table import IO_EVENTS, TRANCHES

PG15 = "/usr/lib/postgresql/15/bin/postgres"


@pytest.mark.parametrize("major", sorted(TRANCHES))
def test_fixed_tranche_ids(major: int) -> None:
    # ids that have not moved since 13 (lwlocknames.txt / lwlocklist.h)
    assert tranche_name(major, 8) == "WALWrite"
    assert tranche_name(major, 4) == "ProcArray"
    names = TRANCHES[major]
    # built-in tranches follow the individual locks in enum order
    first = names.index("XactBuffer")
    assert names[first + 7] == "WALInsert"
    assert names[first + 8] == "BufferContent"
    assert len(set(n for n in names if not n.startswith("<"))) == sum(
        1 for n in names if not n.startswith("<"))


def test_version_differences() -> None:
    # 17 moved the SLRU locks into tranches and added individual locks before the built-ins
    assert "XactSLRU" in TRANCHES[15] and TRANCHES[15].index("XactSLRU") < 48
    assert TRANCHES[17].index("XactSLRU") > TRANCHES[17].index("BufferContent")
    assert "AioWorkerSubmissionQueue" in TRANCHES[18]
    assert "AioWorkerSubmissionQueue" not in TRANCHES[17]
    assert IO_EVENTS[18][0] == "AIO_IO_COMPLETION"
    assert not any(e.startswith("AIO_") for e in IO_EVENTS[17])


def test_extension_tranches_are_named_by_id() -> None:
    user = len(TRANCHES[15])  # LWTRANCHE_FIRST_USER_DEFINED
    assert tranche_name(15, user) == f"extension:{user}"
    assert tranche_name(99, 8) == "extension:8"  # unknown version: no table
    assert not supported(14) and not supported(16) and supported(15)
    assert TRANCHE_ID_FLAG == 1 << 63
    # every known IO wait event id has its slot in the BPF map
    assert all(len(io_contexts(major)) <= NIO_EVENTS for major in IO_EVENTS)


def test_io_wait_contexts() -> None:
    assert io_wait_context("AIO_IO_COMPLETION") == "io_read"
    assert io_wait_context("DATA_FILE_READ") == "io_read"
    assert io_wait_context("DATA_FILE_EXTEND") == "io_write"
    assert io_wait_context("WAL_SYNC") == "wal_write"
    ctx = io_contexts(18)
    assert len(ctx) == len(IO_EVENTS[18])
    assert CONTEXTS[ctx[0]] == "io_read"
    assert io_contexts(16) == ()


@pytest.mark.skipif(not os.path.exists(PG15), reason="PostgreSQL 15 is not installed")
def test_pg15_table_matches_the_binary() -> None:
    """Every name in the 15 table is a string the installed server carries.

    (As a NUL-terminated tail: the linker stores "LockManager" inside
    "PredicateLockManager".)
    """
    with open(PG15, "rb") as f:
        blob = f.read()
    missing = [n for n in TRANCHES[15]
               if not n.startswith("<") and f"{n}\0".encode() not in blob]
    assert not missing, missing
