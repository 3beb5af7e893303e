"""One ELF file opened once: its PT_LOAD segments, sections, notes, symbols and load bias.

Every reader of the server binary (USDT notes, function symbols, data symbols, the
version in .rodata, the architecture) goes through ``open_image``; failures become one
TargetError naming the file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_NOTE_N_TYPE

from pgtrace import proc
from pgtrace.errors import TargetError

#: (vaddr, offset, filesz) of one PT_LOAD segment.
Segment = tuple[int, int, int]


def load_segments(elf: Any) -> list[Segment]:
    """(vaddr, offset, filesz) of every PT_LOAD segment of an ELFFile."""
    return [
        (seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD"
    ]


def segment_offset(segments: Iterable[Segment], vaddr: int) -> int | None:
    """File offset of link-time `vaddr` through the segment holding it (None: not in file)."""
    for seg_vaddr, seg_offset, filesz in segments:
        if seg_vaddr <= vaddr < seg_vaddr + filesz:
            return vaddr - seg_vaddr + seg_offset
    return None


def file_stamp(path: str) -> tuple[int, int, int]:
    """(mtime_ns, size, inode) of ``path``, the key for per-file caches."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TargetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return st.st_mtime_ns, st.st_size, st.st_ino


class ElfImage:
    """An open ELFFile and the facts read from it."""

    def __init__(self, path: str, elf: Any) -> None:
        self.path = path
        self.elf = elf
        self.segments = load_segments(elf)

    @property
    def machine(self) -> str:
        """ELF e_machine ("EM_X86_64", "EM_AARCH64", ...)."""
        return str(self.elf["e_machine"])

    @property
    def little(self) -> bool:
        return bool(self.elf.little_endian)

    @property
    def wide(self) -> bool:
        """True for ELFCLASS64."""
        return bool(self.elf.elfclass == 64)

    def section(self, name: str) -> Any | None:
        return self.elf.get_section_by_name(name)

    def section_data(self, name: str) -> bytes:
        """The bytes of section `name` (b"" when absent)."""
        section = self.section(name)
        return bytes(section.data()) if section is not None else b""

    def section_addr(self, name: str) -> int:
        """The link-time address of section `name` (0 when absent)."""
        section = self.section(name)
        return int(section["sh_addr"]) if section is not None else 0

    def notes(self, name: str) -> Iterator[tuple[int, str, bytes]]:
        """(type, owner, desc) of each note in section `name`, through pyelftools."""
        section = self.section(name)
        if section is None or not hasattr(section, "iter_notes"):
            return
        for note in section.iter_notes():
            ntype = note["n_type"]  # pyelftools names numbers by the GNU table
            number = ENUM_NOTE_N_TYPE.get(ntype, -1) if isinstance(ntype, str) else ntype
            yield int(number), str(note["n_name"]), bytes(note["n_descdata"])

    def symbol_tables(self) -> Iterator[Any]:
        """.symtab then .dynsym, those present."""
        for name in (".symtab", ".dynsym"):
            table = self.section(name)
            if table is not None and hasattr(table, "iter_symbols"):
                yield table

    def object_address(self, name: str) -> int | None:
        """Link-time address of a defined data symbol (STT_OBJECT), or None."""
        for table in reversed(list(self.symbol_tables())):  # .dynsym first
            for sym in table.get_symbol_by_name(name) or []:
                if sym["st_info"]["type"] == "STT_OBJECT" and sym["st_shndx"] != "SHN_UNDEF":
                    return int(sym["st_value"])
        return None

    def offset_of(self, vaddr: int) -> int:
        """File offset of link-time `vaddr`; TargetError when no PT_LOAD maps it."""
        offset = segment_offset(self.segments, vaddr)
        if offset is None:
            raise TargetError(f"address {vaddr:#x} is not in any file-backed PT_LOAD segment")
        return offset

    def load_bias(self, pid: int) -> int:
        """Runtime minus link-time address of this image in `pid` (0 for a fixed image).

        OSError when `pid` is gone, LookupError when it does not map the image.
        """
        if not self.segments:
            raise LookupError(f"{self.path} has no PT_LOAD segment")
        vaddr, offset, _size = min(self.segments)
        return proc.offset_address(pid, self.path, offset) - vaddr


@contextmanager
def open_image(path: str | os.PathLike[str]) -> Iterator[ElfImage]:
    """Open ``path`` once as an ElfImage, turning every failure into one TargetError."""
    name = os.fspath(path)
    try:
        stream: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise TargetError(f"cannot read {name}: {exc.strerror or exc}") from exc
    with stream:
        try:
            elf = ELFFile(stream)
            image = ElfImage(name, elf)
        except (ELFError, struct.error) as exc:
            raise TargetError(f"{name} is not an ELF file") from exc
        try:
            yield image
        except (ELFError, struct.error) as exc:
            raise TargetError(f"{name} is a damaged ELF file: {exc}") from exc


def load_bias(binary: str, pid: int) -> int:
    """Runtime minus link-time address of `binary` in `pid` (OSError, LookupError)."""
    with open_image(binary) as image:
        return image.load_bias(pid)


def data_address(binary: str, pid: int, name: str) -> int | None:
    """Runtime address in `pid` of data symbol `name` of `binary`; None when it has none.

    OSError when `pid` is gone, LookupError when it does not map `binary`.
    """
    with open_image(binary) as image:
        vaddr = image.object_address(name)
        return None if vaddr is None else image.load_bias(pid) + vaddr


def vaddr_to_offset(path: str | os.PathLike[str], vaddr: int) -> int:
    """File offset of link-time ``vaddr`` in ``path``, through the PT_LOAD segment that maps it."""
    with open_image(path) as image:
        return image.offset_of(vaddr)
