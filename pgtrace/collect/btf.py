"""Field offsets of kernel structs, from the running kernel's BTF.

The raw tracepoints get task pointers; reading a task's pid needs the offset of
``task_struct.pid`` in *this* kernel, which headers of another build (Debian's
``linux-headers-amd64`` linked for a newer kernel) would get wrong.
"""

from __future__ import annotations

import struct
from functools import lru_cache

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# kind -> bytes of kind-specific data after struct btf_type (per vlen entry when a tuple)
_FIXED = {1: 4, 2: 0, 3: 12, 7: 0, 8: 0, 9: 0, 10: 0, 11: 0, 12: 0, 14: 4, 16: 0, 17: 4,
          18: 0}
_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
KIND_STRUCT = 4


class BtfError(Exception):
    """BTF missing, unreadable, or without the member asked for."""


def _cstr(strings: bytes, off: int) -> bytes:
    return strings[off:strings.index(b"\0", off)]


@lru_cache(maxsize=8)
def member_offset(struct_name: str, member: str, path: str = VMLINUX_BTF) -> int:
    """Byte offset of `member` in `struct struct_name`, per the BTF at `path`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BtfError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) < 24:
        raise BtfError(f"{path}: not BTF")
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "<HBBIIIII", data, 0)
    if magic != BTF_MAGIC:
        raise BtfError(f"{path}: not BTF (magic {magic:#x})")
    types = data[hdr_len + type_off:hdr_len + type_off + type_len]
    strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
    want_s, want_m = struct_name.encode(), member.encode()
    pos = 0
    while pos + 12 <= len(types):
        name_off, info, _size = struct.unpack_from("<III", types, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        pos += 12
        if kind in _PER_VLEN:
            if kind == KIND_STRUCT and _cstr(strings, name_off) == want_s:
                for i in range(vlen):
                    m_name, _m_type, m_off = struct.unpack_from("<III", types, pos + 12 * i)
                    if _cstr(strings, m_name) == want_m:
                        bits: int = m_off & 0xFFFFFF if info >> 31 else m_off
                        return bits // 8
            pos += _PER_VLEN[kind] * vlen
        elif kind in _FIXED:
            pos += _FIXED[kind]
        else:
            raise BtfError(f"{path}: BTF kind {kind} unknown to pgtrace")
    raise BtfError(f"{path}: no member {member} in struct {struct_name}")
