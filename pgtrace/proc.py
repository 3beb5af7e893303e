"""Everything pgtrace reads from /proc: stat, cmdline, children, maps and memory.

Readers of a process that may exit at any moment return an empty value ("", b"", [])
when it is gone; memory and maps readers raise OSError (or LookupError) for the caller
to decide.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

PROC = "/proc"


def parse_stat(stat: str) -> tuple[str, str, int, int]:
    """(comm, state, ppid, flags) from the text of /proc/PID/stat."""
    left, _, right = stat.rpartition(")")
    comm = left.split("(", 1)[1] if "(" in left else left
    fields = right.split()
    return comm, fields[0], int(fields[1]), int(fields[6])


def read_stat(pid: int | str) -> tuple[str, str, int, int]:
    """parse_stat of /proc/PID/stat; OSError when the process is gone or unreadable."""
    with open(f"{PROC}/{pid}/stat") as f:
        return parse_stat(f.read())


def state(pid: int) -> str:
    """The one-letter state of a task ("R", "S", ...), "" if it is gone."""
    try:
        return read_stat(pid)[1]
    except (OSError, IndexError, ValueError):
        return ""


def cmdline(pid: int) -> bytes:
    """The raw /proc/PID/cmdline (NUL-separated), b"" if the process is gone."""
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def argv(raw: bytes) -> list[str]:
    """The arguments in raw cmdline bytes."""
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def title_of(raw: bytes) -> str:
    """The process title from raw /proc/PID/cmdline bytes (first NUL-ended field)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def children(pid: int) -> list[int]:
    """Child pids of a process: /proc/PID/task/*/children, or a /proc scan."""
    try:
        tids = os.listdir(f"{PROC}/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"{PROC}/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"{PROC}/{pid}/task/{tid}/children"):
                return children_by_scan(pid)  # no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return sorted(set(kids))


def children_by_scan(pid: int) -> list[int]:
    """Child pids of a process from every /proc/N/stat (kernels without task children)."""
    kids = []
    for name in os.listdir(PROC):
        if not name.isdigit():
            continue
        try:
            if read_stat(name)[2] == pid:
                kids.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(kids)


def ns_pids(pid: int) -> list[int]:
    """The pid in each nested pid namespace (NSpid line), outermost first."""
    try:
        with open(f"{PROC}/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return [pid]


def read_mem(pid: int, addr: int, size: int) -> bytes:
    """`size` bytes of `pid`'s memory at `addr` (OSError, ValueError or OverflowError)."""
    with open(f"{PROC}/{pid}/mem", "rb") as mem:
        mem.seek(addr)
        return mem.read(size)


def read_pointer(pid: int, addr: int) -> int:
    """The 64-bit little-endian word at `addr` in `pid` (struct.error when short)."""
    (value,) = struct.unpack("<Q", read_mem(pid, addr, 8))
    return int(value)


@dataclass(frozen=True)
class Mapping:
    """One file-backed line of /proc/PID/maps."""

    start: int
    end: int
    offset: int
    path: str


def file_mappings(pid: int, path: str) -> list[Mapping]:
    """The mappings of file `path` (compared by real path) in `pid`; OSError if gone."""
    real = os.path.realpath(path)
    found = []
    with open(f"{PROC}/{pid}/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) < 6 or os.path.realpath(parts[5]) != real:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            found.append(Mapping(lo, hi, int(parts[2], 16), parts[5]))
    return found


def offset_address(pid: int, path: str, offset: int) -> int:
    """Runtime address of file offset `offset` of `path` in `pid`; LookupError if unmapped."""
    for m in file_mappings(pid, path):
        if m.offset <= offset < m.offset + (m.end - m.start):
            return m.start - m.offset + offset
    raise LookupError(f"{path} offset {offset:#x} is not mapped in pid {pid}")
