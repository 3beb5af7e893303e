"""Where a backend keeps its statement text: MyBEEntry->st_activity_raw.

Reading it at the end of a request (in BPF) spares a uprobe on
pgstat_report_activity, which traps twice per request. The field offset is
known per major version and checked against live backends before use.
"""

from __future__ import annotations

import struct

from pgtrace.elf.image import data_address
from pgtrace.proc import read_mem, read_pointer

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


def _check(pid: int, entry_ptr: int, offset: int) -> bool | None:
    """Whether pid's PgBackendStatus names pid and has a readable activity string.

    None when pid has no entry (or is gone): it says nothing about the layout.
    """
    try:
        entry = read_pointer(pid, entry_ptr)
        if not entry:
            return None
        (procpid,) = struct.unpack("<i", read_mem(pid, entry + PROCPID_OFFSET, 4))
        raw = read_pointer(pid, entry + offset)
        (state,) = struct.unpack("<i", read_mem(pid, entry + offset - STATE_GAP, 4))
        if procpid != pid or not raw or not 0 <= state <= MAX_STATE:
            return False
        text = read_mem(pid, raw, 64).split(b"\0", 1)[0]
        return all(32 <= b < 127 or b in (9, 10, 13) or b >= 128 for b in text)
    except (OSError, ValueError, OverflowError, struct.error):
        return None


def locate_activity(binary: str, major: int, pids: list[int]) -> tuple[int, int] | None:
    """(runtime address of MyBEEntry, st_activity_raw offset), checked on live backends."""
    offset = ACTIVITY_RAW_OFFSET.get(major)
    if offset is None or not pids:
        return None
    try:
        addr = data_address(binary, pids[0], "MyBEEntry")
    except (OSError, LookupError):
        return None
    if addr is None:
        return None
    verdicts = [v for v in (_check(p, addr, offset) for p in pids) if v is not None]
    # every backend with an entry must agree: one mismatch means the layout is not known
    return (addr, offset) if verdicts and all(verdicts) else None
