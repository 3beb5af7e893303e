"""The system call numbers the raw syscall programs dispatch on, against the kernel's uapi."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pgtrace.collect.loader import SYSCALLS, syscall_flags
from pgtrace.errors import SetupError

UAPI = {  # linux-libc-dev: x86-64's own table
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
}


@pytest.mark.parametrize("machine", sorted(SYSCALLS))
def test_numbers_match_the_uapi_headers(machine: str) -> None:
    header = UAPI[machine]
    assert header.exists(), f"{header} is missing: apt-get install linux-libc-dev"
    defined = {m.group(1).upper(): int(m.group(2))
               for m in re.finditer(r"^#define __NR_(\w+)\s+(\d+)\s*$", header.read_text(), re.M)}
    for name, nr in SYSCALLS[machine].items():
        assert defined[name] == nr, (machine, name)


def test_flags_name_every_call() -> None:
    flags = syscall_flags("x86_64")
    assert "-DNR_SENDTO=44" in flags and "-DNR_RECVFROM=45" in flags
    assert "-DSYSCALL_NR_FIELD=orig_ax" in flags


def test_unknown_machine_is_one_clear_error() -> None:
    with pytest.raises(SetupError, match="system calls of riscv64"):
        syscall_flags("riscv64")
