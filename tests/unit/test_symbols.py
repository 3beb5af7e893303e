"""Function symbols and their file offsets, checked against nm."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pgtrace.elf import symbols as symbols_mod
from pgtrace.elf.symbols import REQUEST_SYMBOLS, read_symbols, symbol_offset
from pgtrace.errors import NoProbesError, TargetError
from tests.unit.test_usdt import (
    POSTGRES,
    build_demo,
    expected_offset,
    needs_postgres,
    nm_symbols,
    readelf_loads,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_demo(tmp_path_factory.mktemp("sym"), "O2")


@needs_postgres
def test_postgres_request_symbols() -> None:
    symbols = read_symbols(POSTGRES)
    dynamic = nm_symbols(POSTGRES, dynamic=True)
    segs = readelf_loads(POSTGRES)
    for name in (
        "ReadyForQuery",
        "pq_startmsgread",
        "PortalRun",
        "CommitTransactionCommand",
        "pgstat_report_activity",
        "secure_read",
        "secure_write",
    ):
        sym = symbols[name]
        assert sym.name == name
        assert sym.address == dynamic[name]
        assert sym.size > 0
        assert sym.file_offset == expected_offset(segs, sym.address)
        assert symbol_offset(POSTGRES, name) == sym.file_offset
    assert set(REQUEST_SYMBOLS) - set(symbols) <= {"exec_simple_query", "exec_execute_message"}


@needs_postgres
def test_only_defined_functions() -> None:
    symbols = read_symbols(POSTGRES)
    assert "malloc" not in symbols  # imported, undefined here
    assert "NBuffers" not in symbols  # a variable, not a function
    assert all(s.address and s.file_offset for s in symbols.values())


def test_demo_symtab(demo: str) -> None:
    symbols = read_symbols(demo)
    expected = nm_symbols(demo)
    segs = readelf_loads(demo)
    for name in ("main", "fire_reg", "fire_mem", "fire_const", "fire_nosema"):
        assert symbols[name].address == expected[name]
        assert symbols[name].file_offset == expected_offset(segs, expected[name])
    assert "demo_reg_semaphore" not in symbols


def test_stripped_demo_has_no_static_functions(demo: str, tmp_path: Path) -> None:
    if shutil.which("strip") is None:
        pytest.skip("no strip")
    stripped = tmp_path / "stripped"
    subprocess.run(["strip", "-o", str(stripped), demo], check=True)
    assert "fire_reg" not in read_symbols(str(stripped))
    with pytest.raises(NoProbesError, match="fire_reg"):
        symbol_offset(str(stripped), "fire_reg")


def test_missing_symbol(demo: str) -> None:
    with pytest.raises(NoProbesError, match="no_such_function"):
        symbol_offset(demo, "no_such_function")


def test_cache_follows_file_changes(demo: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copy(demo, copy)
    first = read_symbols(str(copy))
    hits = symbols_mod._cached_symbols.cache_info().hits
    again = read_symbols(str(copy))
    assert again == first
    assert symbols_mod._cached_symbols.cache_info().hits == hits + 1
    again["main"] = first["fire_reg"]  # callers get a copy, the cache is untouched
    assert read_symbols(str(copy))["main"] == first["main"]
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    misses = symbols_mod._cached_symbols.cache_info().misses
    read_symbols(str(copy))
    assert symbols_mod._cached_symbols.cache_info().misses == misses + 1


def test_not_elf(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(TargetError, match="not an ELF file"):
        read_symbols(str(text))
    with pytest.raises(TargetError, match="cannot read"):
        symbol_offset(str(tmp_path / "absent"), "main")
