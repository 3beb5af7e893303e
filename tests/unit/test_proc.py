"""pgtrace.proc and the ELF image's load bias, checked on real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from pgtrace import proc
from pgtrace.elf.image import data_address, load_bias, open_image
from tests.unit.test_target import wait_for

SLEEP = os.path.realpath("/bin/sleep")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """/bin/sleep asleep: exec'd, its libc initialised, in nanosleep."""
    child = subprocess.Popen([SLEEP, "30"])
    try:
        wait_for(lambda: bool(proc.file_mappings(child.pid, SLEEP)))
        wait_for(lambda: proc.state(child.pid) == "S")  # R until it reaches nanosleep
        yield child
    finally:
        child.kill()
        child.wait(timeout=10)


def test_parse_stat_with_spaces_and_parens_in_comm() -> None:
    text = "42 (a) b (c)) S 7 42 42 0 -1 4194560 0 0"
    assert proc.parse_stat(text) == ("a) b (c)", "S", 7, 4194560)


def test_state_cmdline_and_argv_of_a_child(sleeper: subprocess.Popen[bytes]) -> None:
    sleeper.send_signal(signal.SIGSTOP)
    wait_for(lambda: proc.state(sleeper.pid) == "T")
    assert proc.argv(proc.cmdline(sleeper.pid)) == [SLEEP, "30"]
    assert proc.title_of(proc.cmdline(sleeper.pid)) == SLEEP
    assert proc.read_stat(sleeper.pid)[2] == os.getpid()


def test_gone_process_reads_as_empty() -> None:
    child = subprocess.Popen(["true"])
    child.wait(timeout=10)
    assert proc.state(child.pid) == ""
    assert proc.cmdline(child.pid) == b""
    assert proc.children(child.pid) == []


def test_children_agree_with_a_stat_scan(sleeper: subprocess.Popen[bytes]) -> None:
    mine = proc.children(os.getpid())
    assert sleeper.pid in mine
    assert mine == proc.children_by_scan(os.getpid())


def test_load_bias_maps_code_to_the_file_bytes(sleeper: subprocess.Popen[bytes]) -> None:
    """The entry point read through the bias is the file's bytes at its offset."""
    with open_image(SLEEP) as image:
        entry = int(image.elf["e_entry"])
        offset = image.offset_of(entry)
        bias = image.load_bias(sleeper.pid)
    with open(SLEEP, "rb") as f:
        f.seek(offset)
        expected = f.read(32)
    assert bias % 4096 == 0
    assert proc.read_mem(sleeper.pid, bias + entry, 32) == expected
    # the USDT path (runtime address of a file offset) lands on the same address
    assert proc.offset_address(sleeper.pid, SLEEP, offset) == bias + entry
    assert load_bias(SLEEP, sleeper.pid) == bias


def test_data_address_in_bss_points_at_argv0(sleeper: subprocess.Popen[bytes]) -> None:
    """program_invocation_name (a copy-relocated pointer past the file's bytes) is argv[0]."""
    addr = data_address(SLEEP, sleeper.pid, "program_invocation_name")
    assert addr is not None
    text = proc.read_mem(sleeper.pid, proc.read_pointer(sleeper.pid, addr), 256)
    assert text.split(b"\0", 1)[0] == SLEEP.encode()
    assert data_address(SLEEP, sleeper.pid, "no_such_symbol") is None


def test_unmapped_binary_and_gone_pid(sleeper: subprocess.Popen[bytes]) -> None:
    with pytest.raises(LookupError, match="not mapped"):
        load_bias(os.path.realpath("/bin/true"), sleeper.pid)
    child = subprocess.Popen(["true"])
    child.wait(timeout=10)
    with pytest.raises(OSError):
        load_bias(SLEEP, child.pid)
