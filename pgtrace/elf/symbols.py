"""Function symbols of an ELF, with the file offsets uprobes attach at."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pgtrace.elf.image import Segment, file_stamp, open_image, segment_offset
from pgtrace.errors import NoProbesError

# Functions pgtrace puts uprobes on to find request boundaries (both protocols).
REQUEST_SYMBOLS: tuple[str, ...] = (
    "ReadyForQuery",
    "pq_startmsgread",
    "PortalRun",
    "CommitTransactionCommand",
    "pgstat_report_activity",
    "exec_simple_query",
    "exec_execute_message",
)


@dataclass(frozen=True)
class Symbol:
    """A defined function: link-time address, size, and file offset."""

    name: str
    address: int
    size: int
    file_offset: int


def _functions(table: Any, segments: list[Segment]) -> dict[str, Symbol]:
    """Defined STT_FUNC symbols of one symbol table; globals win over locals."""
    found: dict[str, Symbol] = {}
    local: set[str] = set()
    for sym in table.iter_symbols():
        info = sym["st_info"]
        if info["type"] != "STT_FUNC" or sym["st_shndx"] == "SHN_UNDEF":
            continue
        name: str = sym.name
        address: int = sym["st_value"]
        offset = segment_offset(segments, address)
        if not name or not address or offset is None:
            continue
        is_local = info["bind"] == "STB_LOCAL"
        if name in found and (is_local or name not in local):
            continue
        found[name] = Symbol(name, address, sym["st_size"], offset)
        if is_local:
            local.add(name)
        else:
            local.discard(name)
    return found


def _read_symbols(path: str) -> dict[str, Symbol]:
    with open_image(path) as image:
        symbols: dict[str, Symbol] = {}
        for table in image.symbol_tables():  # .dynsym last: it wins on a clash
            symbols.update(_functions(table, image.segments))
    return symbols


@functools.lru_cache(maxsize=16)
def _cached_symbols(path: str, _stamp: tuple[int, int, int]) -> dict[str, Symbol]:
    return _read_symbols(path)


def read_symbols(path: str) -> dict[str, Symbol]:
    """Defined function symbols from .dynsym and .symtab (cached per file version)."""
    return dict(_cached_symbols(path, file_stamp(path)))


def symbol_offset(path: str, name: str) -> int:
    """File offset of function ``name`` in ``path``, for a uprobe."""
    symbol = _cached_symbols(path, file_stamp(path)).get(name)
    if symbol is None:
        raise NoProbesError(
            f"{path} has no function symbol {name!r} for a uprobe",
            "use an unstripped PostgreSQL build that exports it (Debian's does)",
        )
    return symbol.file_offset
