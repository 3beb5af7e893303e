"""Read USDT probe sites from an ELF's ``.note.stapsdt`` section.

Each note (type 3, owner ``stapsdt``) holds the probe's address, the address of
``.stapsdt.base`` at link time, the semaphore's address, then three strings:
provider, name and the argument specs (``-4@-144(%rbp) 8@%rax $0`` ...).
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from pgtrace.elf.image import Segment, file_stamp, open_image, segment_offset
from pgtrace.errors import NoProbesError, TargetError

NOTE_SECTION = ".note.stapsdt"
BASE_SECTION = ".stapsdt.base"
_NOTE_OWNER = "stapsdt"
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
    with open_image(path) as image:
        if image.section(NOTE_SECTION) is None:
            raise _no_probes(path)
        base_addr = image.section_addr(BASE_SECTION)
        sites: list[ProbeSite] = []
        for ntype, owner, desc in image.notes(NOTE_SECTION):
            if ntype != _NT_STAPSDT or owner != _NOTE_OWNER:
                continue
            pc, base, sema, (provider, name, args) = _decode_desc(desc, image.little, image.wide)
            if base and base_addr:  # prelink moved the image: shift by the same delta
                pc += base_addr - base
                sema += (base_addr - base) if sema else 0
            sites.append(_site(path, image.segments, provider, name, pc, base, sema, args))
    if not sites:
        raise _no_probes(path)
    return sites


def _site(
    path: str,
    segments: list[Segment],
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


def read_probes(path: str) -> list[ProbeSite]:
    """Every USDT site in ``path``, in note order (cached per file version)."""
    return list(_cached_probes(path, file_stamp(path)))


def probes_by_name(sites: Iterable[ProbeSite]) -> dict[str, list[ProbeSite]]:
    """Group sites by probe name (note spelling, e.g. ``lwlock__wait__start``)."""
    groups: dict[str, list[ProbeSite]] = {}
    for site in sites:
        groups.setdefault(site.name, []).append(site)
    return groups
