"""Classifying a backend's sleeps by the wait event it published.

Before it sleeps on an LWLock, a heavyweight lock or an I/O, a backend stores
``class | id`` in ``*my_wait_event_info``.  The sched_switch program reads it
there (two reads of user memory per sleep) instead of trapping on the LWLock
USDT probes (two uprobe traps per wait).  Tranche and IO event ids are
numbered per major version: ``pgtrace/tranche_table.py`` has the versions
whose sources were read; other versions keep the USDT probes.
"""

from __future__ import annotations

import struct

from pgtrace.elf.image import data_address
from pgtrace.model import CONTEXTS
from pgtrace.proc import read_mem, read_pointer
from pgtrace.tranche_table import IO_EVENTS, TRANCHES


def supported(major: int) -> bool:
    """Whether this major version's tranche and IO event ids are known."""
    return major in TRANCHES and major in IO_EVENTS


def tranche_name(major: int, tranche_id: int) -> str:
    """The wait event name of an LWLock tranche id, as pg_stat_activity shows it."""
    names = TRANCHES.get(major, ())
    if 0 <= tranche_id < len(names):
        return names[tranche_id]
    return f"extension:{tranche_id}"  # registered at run time (LWTRANCHE_FIRST_USER_DEFINED+)


def io_wait_context(event: str) -> str:
    """The wait context (model.CONTEXTS) a sleep on an IO-class wait event belongs to.

    Only sleeps outside the probes' own contexts get here (for example reads
    waited for through PostgreSQL 18's asynchronous I/O, or relation extension).
    """
    if event.startswith("AIO_") or "READ" in event:
        return "io_read"
    if event.startswith("WAL_"):
        return "wal_write"
    return "io_write"


def io_contexts(major: int) -> tuple[int, ...]:
    """CTX_* index per IO wait event id, for the BPF map."""
    return tuple(CONTEXTS.index(io_wait_context(e)) for e in IO_EVENTS.get(major, ()))


def _pointer(pid: int, addr: int) -> int | None:
    try:
        ptr = read_pointer(pid, addr)
        if ptr:
            read_mem(pid, ptr, 4)
        return ptr
    except (OSError, ValueError, OverflowError, struct.error):
        return None


def locate_wait_event_info(binary: str, major: int, postmaster_pid: int) -> int | None:
    """Runtime address of ``my_wait_event_info`` (the same in every forked backend).

    None when the version's ids are not known, the symbol is not exported, or
    the pointer cannot be read in the postmaster: the USDT probes then serve.
    """
    if not supported(major):
        return None
    try:
        addr = data_address(binary, postmaster_pid, "my_wait_event_info")
    except (OSError, LookupError):
        return None
    return addr if addr is not None and _pointer(postmaster_pid, addr) else None
