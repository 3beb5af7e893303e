"""Read USDT probe sites from an ELF's ``.note.stapsdt`` section.

Each note (type 3, owner ``stapsdt``) holds the probe's address, the address of
``.stapsdt.base`` at link time, the semaphore's address, then three strings:
provider, name and the argument specs (``-4@-144(%rbp) 8@%rax $0`` ...).
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pgtrace.errors import NoProbesError, TargetError

NOTE_SECTION = ".note.stapsdt"
BASE_SECTION = ".stapsdt.base"
_NOTE_OWNER = b"stapsdt\0"
_NT_STAPSDT = 3


@dataclass(frozen=True)
class ArgSpec:
    """One probe argument: where its value lives when the probe fires."""

    raw: str
    size: int
    signed: bool
    kind: str  # "reg" | "mem" | "const" | "unsupported"
    reg: str | None
    offset: int = 0
    constant: int = 0

    @property
    def supported(self) -> bool:
        """True when a BPF program can read this argument."""
        return self.kind != "unsupported"


@dataclass(frozen=True)
class ProbeSite:
    """One place in the code where a USDT probe fires."""

    provider: str
    name: str
    address: int
    file_offset: int
    semaphore: int
    semaphore_offset: int
    base: int
    args: tuple[ArgSpec, ...]

    @property
    def supported(self) -> bool:
        """True when every argument of this site can be read."""
        return all(a.supported for a in self.args)


def _register_table() -> dict[str, str]:
    """Map every x86-64 register spelling to its 64-bit name (no high bytes)."""
    table: dict[str, str] = {}
    for x in "abcd":
        full = f"r{x}x"
        for alias in (full, f"e{x}x", f"{x}x", f"{x}l"):
            table[alias] = full
    for x in ("si", "di", "bp", "sp"):
        full = f"r{x}"
        for alias in (full, f"e{x}", x, f"{x}l"):
            table[alias] = full
    for n in range(8, 16):
        full = f"r{n}"
        for alias in (full, f"{full}d", f"{full}w", f"{full}b", f"{full}l"):
            table[alias] = full
    return table


REGISTERS: dict[str, str] = _register_table()

_SIZE = re.compile(r"^(?P<sign>-?)(?P<size>\d+)(?P<float>f?)@(?P<op>.+)$")
_INT = r"[-+]?(?:0[xX][0-9a-fA-F]+|\d+)"
_REG = re.compile(r"^%(?P<reg>[a-z0-9]+)$")
_CONST = re.compile(rf"^\$(?P<val>{_INT})$")
_MEM = re.compile(rf"^(?P<disp>{_INT})?\(%(?P<reg>[a-z0-9]+)\)$")


def _to_int(text: str) -> int:
    """Parse a decimal or 0x-hex integer with an optional sign."""
    return int(text, 16) if text.lstrip("+-").lower().startswith("0x") else int(text, 10)


def parse_arg(raw: str) -> ArgSpec:
    """Parse one ``[-]N@OPERAND`` spec; forms BPF cannot read are kind "unsupported"."""
    m = _SIZE.match(raw)
    if m is None:  # sdt v1/v2 had no size prefix: assume a 64-bit value
        size, signed, is_float, op = 8, False, False, raw
    else:
        size, signed = int(m["size"]), m["sign"] == "-"
        is_float, op = m["float"] == "f", m["op"]

    def unsupported() -> ArgSpec:
        return ArgSpec(raw=raw, size=size, signed=signed, kind="unsupported", reg=None)

    if is_float or size not in (1, 2, 4, 8):
        return unsupported()
    if (c := _CONST.match(op)) is not None:
        return ArgSpec(raw, size, signed, "const", None, constant=_to_int(c["val"]))
    if (r := _REG.match(op)) is not None:
        reg = REGISTERS.get(r["reg"])
        return unsupported() if reg is None else ArgSpec(raw, size, signed, "reg", reg)
    if (mm := _MEM.match(op)) is not None:
        reg = REGISTERS.get(mm["reg"])
        if reg is None:  # %rip-relative with a number, segment or vector registers
            return unsupported()
        disp = _to_int(mm["disp"]) if mm["disp"] else 0
        return ArgSpec(raw, size, signed, "mem", reg, offset=disp)
    return unsupported()  # sym(%rip), disp(%base,%index,scale), ...


def parse_args(text: str) -> tuple[ArgSpec, ...]:
    """Parse a note's space-separated argument string."""
    return tuple(parse_arg(part) for part in text.split())


@contextmanager
def open_elf(path: str | os.PathLike[str]) -> Iterator[Any]:
    """Open ``path`` as an ELFFile, turning every failure into one TargetError."""
    name = os.fspath(path)
    try:
        stream: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise TargetError(f"cannot read {name}: {exc.strerror or exc}") from exc
    with stream:
        try:
            elf = ELFFile(stream)
        except (ELFError, struct.error) as exc:
            raise TargetError(f"{name} is not an ELF file") from exc
        try:
            yield elf
        except (ELFError, struct.error) as exc:
            raise TargetError(f"{name} is a damaged ELF file: {exc}") from exc


def load_segments(elf: Any) -> list[tuple[int, int, int]]:
    """(vaddr, offset, filesz) of every PT_LOAD segment."""
    return [
        (seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD"
    ]


def segment_offset(segments: Iterable[tuple[int, int, int]], vaddr: int) -> int | None:
    for seg_vaddr, seg_offset, filesz in segments:
        if seg_vaddr <= vaddr < seg_vaddr + filesz:
            return vaddr - seg_vaddr + seg_offset
    return None


def vaddr_to_offset(path_or_elffile: str | os.PathLike[str] | Any, vaddr: int) -> int:
    """File offset of link-time ``vaddr``, through the PT_LOAD segment that maps it."""
    if isinstance(path_or_elffile, str | os.PathLike):
        with open_elf(path_or_elffile) as elf:
            return vaddr_to_offset(elf, vaddr)
    offset = segment_offset(load_segments(path_or_elffile), vaddr)
    if offset is None:
        raise TargetError(f"address {vaddr:#x} is not in any file-backed PT_LOAD segment")
    return offset


def _iter_notes(data: bytes, little: bool) -> Iterator[tuple[int, bytes, bytes]]:
    """Yield (type, owner, desc) for each ELF note in a note section."""
    endian = "<" if little else ">"
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from(f"{endian}III", data, pos)
        pos += 12
        name = data[pos : pos + namesz]
        pos += (namesz + 3) & ~3
        desc = data[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        yield ntype, name, desc


def _decode_desc(desc: bytes, little: bool, wide: bool) -> tuple[int, int, int, list[str]]:
    """(pc, base, semaphore, [provider, name, args]) of one stapsdt note."""
    fmt = ("<" if little else ">") + ("QQQ" if wide else "III")
    head = struct.calcsize(fmt)
    pc, base, sema = struct.unpack_from(fmt, desc, 0)
    strings = desc[head:].split(b"\0")
    texts = [s.decode("utf-8", "replace") for s in strings[:3]]
    texts += [""] * (3 - len(texts))
    return pc, base, sema, texts


def _read_probes(path: str) -> list[ProbeSite]:
    with open_elf(path) as elf:
        section = elf.get_section_by_name(NOTE_SECTION)
        if section is None:
            raise _no_probes(path)
        base_section = elf.get_section_by_name(BASE_SECTION)
        base_addr: int = base_section["sh_addr"] if base_section is not None else 0
        little: bool = elf.little_endian
        wide = elf.elfclass == 64
        segments = load_segments(elf)
        sites: list[ProbeSite] = []
        for ntype, owner, desc in _iter_notes(section.data(), little):
            if ntype != _NT_STAPSDT or owner != _NOTE_OWNER:
                continue
            pc, base, sema, (provider, name, args) = _decode_desc(desc, little, wide)
            if base and base_addr:  # prelink moved the image: shift by the same delta
                pc += base_addr - base
                sema += (base_addr - base) if sema else 0
            sites.append(_site(path, segments, provider, name, pc, base, sema, args))
    if not sites:
        raise _no_probes(path)
    return sites


def _site(
    path: str,
    segments: list[tuple[int, int, int]],
    provider: str,
    name: str,
    pc: int,
    base: int,
    sema: int,
    args: str,
) -> ProbeSite:
    offset = segment_offset(segments, pc)
    sema_offset = segment_offset(segments, sema) if sema else 0
    if offset is None or sema_offset is None:
        raise TargetError(f"{path}: probe {provider}:{name} points outside the loaded image")
    return ProbeSite(provider, name, pc, offset, sema, sema_offset, base, parse_args(args))


def _no_probes(path: str) -> NoProbesError:
    return NoProbesError(
        f"{path} has no USDT probes ({NOTE_SECTION}): it was built without --enable-dtrace",
        "use a PostgreSQL built with --enable-dtrace, as the PGDG and Debian packages are",
    )


@functools.lru_cache(maxsize=16)
def _cached_probes(path: str, _stamp: tuple[int, int, int]) -> tuple[ProbeSite, ...]:
    return tuple(_read_probes(path))


def file_stamp(path: str) -> tuple[int, int, int]:
    """(mtime_ns, size, inode) of ``path``, the key for per-file caches."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TargetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return st.st_mtime_ns, st.st_size, st.st_ino


def read_probes(path: str) -> list[ProbeSite]:
    """Every USDT site in ``path``, in note order (cached per file version)."""
    return list(_cached_probes(path, file_stamp(path)))


def probes_by_name(sites: Iterable[ProbeSite]) -> dict[str, list[ProbeSite]]:
    """Group sites by probe name (note spelling, e.g. ``lwlock__wait__start``)."""
    groups: dict[str, list[ProbeSite]] = {}
    for site in sites:
        groups.setdefault(site.name, []).append(site)
    return groups
