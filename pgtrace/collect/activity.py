"""Where a backend keeps its statement text: MyBEEntry->st_activity_raw.

Reading it at the end of a request (in BPF) spares a uprobe on
pgstat_report_activity, which traps twice per request. The field offset is
known per major version and checked against live backends before use.
"""

from __future__ import annotations

import os
import struct

from pgtrace.elf.symbols import object_address
from pgtrace.elf.usdt import load_segments, open_elf

#: offsetof(PgBackendStatus, st_activity_raw) on 64-bit Linux, by major version. The fields
#: before it (utils/backend_status.h) are the same from 13 to 18; 18 adds st_plan_id after it.
ACTIVITY_RAW_OFFSET: dict[int, int] = {13: 248, 14: 248, 15: 248, 16: 248, 17: 248, 18: 248}
#: offsetof(PgBackendStatus, st_procpid).
PROCPID_OFFSET = 4
#: offsetof(PgBackendStatus, st_state): st_appname sits between it and st_activity_raw
#: (13 to 18). request.bpf.c reads it at ACTIVITY_RAW_OFF - 16.
STATE_GAP = 16
#: BackendState values, STATE_UNDEFINED .. STATE_DISABLED (18 adds STATE_STARTING).
MAX_STATE = 7


def state_running(major: int) -> int:
    """STATE_RUNNING in `major`'s BackendState: 2, or 3 from 18 (STATE_STARTING before
    STATE_IDLE). The other states sit at fixed distances from it (pgtrace.h)."""
    return 3 if major >= 18 else 2


def load_bias(binary: str, pid: int) -> int:
    """Runtime address minus link-time address of `binary` in `pid`."""
    with open_elf(binary) as elf:
        lowest = min(vaddr for vaddr, _off, _size in load_segments(elf))
    real = os.path.realpath(binary)
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and int(parts[2], 16) == 0 and os.path.realpath(parts[5]) == real:
                return int(parts[0].split("-")[0], 16) - (lowest & ~0xFFF)
    raise LookupError(f"{binary} is not mapped in pid {pid}")


def _read(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(addr)
        return mem.read(size)


def _check(pid: int, entry_ptr: int, offset: int) -> bool | None:
    """Whether pid's PgBackendStatus names pid and has a readable activity string.

    None when pid has no entry (or is gone): it says nothing about the layout.
    """
    try:
        (entry,) = struct.unpack("<Q", _read(pid, entry_ptr, 8))
        if not entry:
            return None
        (procpid,) = struct.unpack("<i", _read(pid, entry + PROCPID_OFFSET, 4))
        (raw,) = struct.unpack("<Q", _read(pid, entry + offset, 8))
        (state,) = struct.unpack("<i", _read(pid, entry + offset - STATE_GAP, 4))
        if procpid != pid or not raw or not 0 <= state <= MAX_STATE:
            return False
        text = _read(pid, raw, 64).split(b"\0", 1)[0]
        return all(32 <= b < 127 or b in (9, 10, 13) or b >= 128 for b in text)
    except (OSError, ValueError, OverflowError, struct.error):
        return None


def locate_activity(binary: str, major: int, pids: list[int]) -> tuple[int, int] | None:
    """(runtime address of MyBEEntry, st_activity_raw offset), checked on live backends."""
    offset = ACTIVITY_RAW_OFFSET.get(major)
    vaddr = object_address(binary, "MyBEEntry")
    if offset is None or vaddr is None or not pids:
        return None
    try:
        addr = load_bias(binary, pids[0]) + vaddr
    except (OSError, LookupError):
        return None
    verdicts = [v for v in (_check(p, addr, offset) for p in pids) if v is not None]
    # every backend with an entry must agree: one mismatch means the layout is not known
    return (addr, offset) if verdicts and all(verdicts) else None
