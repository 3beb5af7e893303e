"""Struct member offsets from BTF: a synthetic blob, and the running kernel's."""

from __future__ import annotations

import os
import platform
import struct
from pathlib import Path

import pytest

from pgtrace.collect.btf import VMLINUX_BTF, BtfError, member_offset


def btf_blob(kflag_bitfield: bool = False) -> bytes:
    """BTF with an int, an enum, and `struct demo { int a; int b; u8 c:3; }`."""
    strings = b"\0int\0demo\0a\0b\0c\0colour\0red\0"
    off = {name: strings.index(b"\0" + name.encode() + b"\0") + 1
           for name in ("int", "demo", "a", "b", "c", "colour", "red")}
    types = struct.pack("<III", off["int"], 1 << 24, 4) + struct.pack("<I", 32)  # INT
    types += struct.pack("<III", off["colour"], (6 << 24) | 1, 4)  # ENUM, one value
    types += struct.pack("<iI", off["red"], 0)
    info = (4 << 24) | 3 | (1 << 31 if kflag_bitfield else 0)  # STRUCT, three members
    types += struct.pack("<III", off["demo"], info, 12)
    c_off = (3 << 24) | 64 if kflag_bitfield else 64  # kind_flag: bitfield size in the top byte
    for name, bits in (("a", 0), ("b", 32), ("c", c_off)):
        types += struct.pack("<III", off[name], 1, bits)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


@pytest.mark.parametrize("kflag", [False, True])
def test_offsets_of_members(tmp_path: Path, kflag: bool) -> None:
    path = tmp_path / "btf"
    path.write_bytes(btf_blob(kflag))
    assert member_offset("demo", "a", str(path)) == 0
    assert member_offset("demo", "b", str(path)) == 4
    assert member_offset("demo", "c", str(path)) == 8


def test_missing_member_and_struct(tmp_path: Path) -> None:
    path = tmp_path / "btf"
    path.write_bytes(btf_blob())
    with pytest.raises(BtfError, match="no member d in struct demo"):
        member_offset("demo", "d", str(path))
    with pytest.raises(BtfError, match="no member a in struct other"):
        member_offset("other", "a", str(path))


def test_not_btf(tmp_path: Path) -> None:
    path = tmp_path / "btf"
    path.write_bytes(b"\x7fELF" + bytes(40))
    with pytest.raises(BtfError, match="not BTF"):
        member_offset("demo", "a", str(path))
    with pytest.raises(BtfError, match="cannot read"):
        member_offset("demo", "a", str(tmp_path / "absent"))


def test_running_kernel() -> None:
    assert os.path.exists(VMLINUX_BTF), "pgtrace needs the kernel's BTF (CONFIG_DEBUG_INFO_BTF)"
    # pt_regs is the x86-64 syscall ABI: orig_ax is its 16th 8-byte word
    if platform.machine() == "x86_64":
        assert member_offset("pt_regs", "orig_ax") == 15 * 8
    pid, tgid = member_offset("task_struct", "pid"), member_offset("task_struct", "tgid")
    assert tgid == pid + 4  # pid_t pid; pid_t tgid; side by side in every kernel since 2.6
