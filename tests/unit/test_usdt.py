"""USDT note parsing, checked against readelf and a binary built here with <sys/sdt.h>."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgtrace.elf.image import vaddr_to_offset
from pgtrace.elf.symbols import REQUEST_SYMBOLS
from pgtrace.elf.usdt import (
    ArgSpec,
    ProbeSite,
    parse_arg,
    probes_by_name,
    read_probes,
)
from pgtrace.errors import NoProbesError, TargetError
from pgtrace.report.probes import render_probes

POSTGRES = "/usr/lib/postgresql/15/bin/postgres"
DEMO_SOURCE = Path(__file__).parent / "data" / "sdt_demo.c"
NOP = 0x90

needs_postgres = pytest.mark.skipif(
    not Path(POSTGRES).exists(), reason=f"{POSTGRES} is not installed"
)
needs_readelf = pytest.mark.skipif(shutil.which("readelf") is None, reason="no readelf")


# ---------------------------------------------------------------- helpers


@dataclass
class Seg:
    offset: int
    vaddr: int
    filesz: int


@dataclass
class Note:
    provider: str
    name: str
    location: int
    base: int
    semaphore: int
    args: str


def readelf(*args: str) -> str:
    return subprocess.run(
        ["readelf", "-W", *args], check=True, capture_output=True, text=True
    ).stdout


def readelf_notes(path: str) -> list[Note]:
    """The stapsdt notes as readelf -n prints them."""
    pattern = re.compile(
        r"Provider: (\S+)\s+Name: (\S+)\s+Location: (0x[0-9a-f]+), "
        r"Base: (0x[0-9a-f]+), Semaphore: (0x[0-9a-f]+)\s+Arguments: ?([^\n]*)"
    )
    return [
        Note(p, n, int(loc, 16), int(b, 16), int(s, 16), a.strip())
        for p, n, loc, b, s, a in pattern.findall(readelf("-n", path))
    ]


def readelf_loads(path: str) -> list[Seg]:
    segs = []
    for line in readelf("-l", path).splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            segs.append(Seg(int(f[1], 16), int(f[2], 16), int(f[4], 16)))
    return segs


def readelf_section(path: str, name: str) -> tuple[int, int, int]:
    """(addr, offset, size) of a section, from readelf -S."""
    for line in readelf("-S", path).splitlines():
        m = re.search(rf"\]\s+{re.escape(name)}\s+\S+\s+([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)", line)
        if m:
            return int(m[1], 16), int(m[2], 16), int(m[3], 16)
    raise AssertionError(f"no section {name} in {path}")


def expected_offset(segs: list[Seg], vaddr: int) -> int:
    (seg,) = [s for s in segs if s.vaddr <= vaddr < s.vaddr + s.filesz]
    return vaddr - seg.vaddr + seg.offset


def nm_symbols(path: str, dynamic: bool = False) -> dict[str, int]:
    args = ["nm", "-D", path] if dynamic else ["nm", path]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return {f[2]: int(f[0], 16) for f in (line.split() for line in out.splitlines()) if len(f) == 3}


def build_demo(out_dir: Path, opt: str) -> str:
    """Compile tests/unit/data/sdt_demo.c as a PIE with the given -O level."""
    if shutil.which("gcc") is None or not Path("/usr/include/x86_64-linux-gnu/sys/sdt.h").exists():
        pytest.skip("gcc or <sys/sdt.h> (systemtap-sdt-dev) is missing")
    out = out_dir / f"sdt_demo_{opt}"
    subprocess.run(
        ["gcc", f"-{opt}", "-fPIE", "-pie", "-g0", "-o", str(out), str(DEMO_SOURCE)],
        check=True,
        capture_output=True,
    )
    return str(out)


@pytest.fixture(scope="module", params=["O0", "O2"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_demo(tmp_path_factory.mktemp("sdt"), request.param)


def one(sites: list[ProbeSite], name: str) -> ProbeSite:
    (site,) = probes_by_name(sites)[name]
    return site


# ---------------------------------------------------------------- arg grammar


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("8@%rax", ArgSpec("8@%rax", 8, False, "reg", "rax")),
        ("-8@%rdi", ArgSpec("-8@%rdi", 8, True, "reg", "rdi")),
        ("-4@%eax", ArgSpec("-4@%eax", 4, True, "reg", "rax")),
        ("4@%r14d", ArgSpec("4@%r14d", 4, False, "reg", "r14")),
        ("2@%r9w", ArgSpec("2@%r9w", 2, False, "reg", "r9")),
        ("2@%dx", ArgSpec("2@%dx", 2, False, "reg", "rdx")),
        ("1@%dil", ArgSpec("1@%dil", 1, False, "reg", "rdi")),
        ("1@%al", ArgSpec("1@%al", 1, False, "reg", "rax")),
        ("-1@%sil", ArgSpec("-1@%sil", 1, True, "reg", "rsi")),
        ("1@%r8b", ArgSpec("1@%r8b", 1, False, "reg", "r8")),
        ("-4@-144(%rbp)", ArgSpec("-4@-144(%rbp)", 4, True, "mem", "rbp", offset=-144)),
        ("4@(%r12)", ArgSpec("4@(%r12)", 4, False, "mem", "r12")),
        ("4@0(%r13)", ArgSpec("4@0(%r13)", 4, False, "mem", "r13")),
        ("2@12(%r12)", ArgSpec("2@12(%r12)", 2, False, "mem", "r12", offset=12)),
        ("8@0x10(%rsp)", ArgSpec("8@0x10(%rsp)", 8, False, "mem", "rsp", offset=16)),
        ("-4@$0", ArgSpec("-4@$0", 4, True, "const", None)),
        ("-4@$-5", ArgSpec("-4@$-5", 4, True, "const", None, constant=-5)),
        ("4@$8192", ArgSpec("4@$8192", 4, False, "const", None, constant=8192)),
        ("8@$0x1f", ArgSpec("8@$0x1f", 8, False, "const", None, constant=31)),
        ("%rsi", ArgSpec("%rsi", 8, False, "reg", "rsi")),  # sdt v1: no size prefix
    ],
)
def test_parse_arg_forms(raw: str, expected: ArgSpec) -> None:
    assert parse_arg(raw) == expected
    assert parse_arg(raw).supported


@pytest.mark.parametrize(
    "raw",
    [
        "-4@NBuffers(%rip)",
        "-4@40+CheckpointStats(%rip)",
        "8@16(%rip)",
        "8@8(%rax,%rbx,4)",
        "1@%ah",
        "8f@%xmm0",
        "16@%rax",
        "8@$sym",
        "garbage",
    ],
)
def test_parse_arg_unsupported(raw: str) -> None:
    arg = parse_arg(raw)
    assert arg.kind == "unsupported"
    assert arg.reg is None
    assert not arg.supported
    assert arg.raw == raw


# ---------------------------------------------------------------- the built demo


def test_demo_matches_readelf(demo: str) -> None:
    sites = read_probes(demo)
    notes = readelf_notes(demo)
    segs = readelf_loads(demo)
    assert [(s.provider, s.name) for s in sites] == [(n.provider, n.name) for n in notes]
    assert {s.name for s in sites} == {"reg", "mem", "const", "nosema"}
    data = Path(demo).read_bytes()
    for site, note in zip(sites, notes, strict=True):
        assert site.address == note.location
        assert site.base == note.base
        assert site.semaphore == note.semaphore
        assert site.file_offset == expected_offset(segs, note.location)
        assert site.file_offset == vaddr_to_offset(demo, site.address)
        assert data[site.file_offset] == NOP
        assert " ".join(a.raw for a in site.args) == note.args


def test_demo_register_args(demo: str) -> None:
    rdi, eax, flag = one(read_probes(demo), "reg").args
    assert rdi == ArgSpec("-8@%rdi", 8, True, "reg", "rdi")
    assert eax == ArgSpec("-4@%eax", 4, True, "reg", "rax")
    assert (flag.size, flag.signed) == (1, False)
    assert flag.kind in ("reg", "mem")


def test_demo_memory_args(demo: str) -> None:
    local, stacked, field = one(read_probes(demo), "mem").args
    assert (local.size, local.signed) == (8, True)
    assert (stacked.size, stacked.signed) == (2, True)
    assert (field.size, field.signed) == (4, True)
    mems = [a for a in (local, stacked, field) if a.kind == "mem"]
    assert mems, "the demo must produce at least one memory operand"
    for arg in mems:
        assert arg.reg is not None
        disp = "" if arg.raw.endswith(f"@(%{arg.reg})") else str(arg.offset)
        assert arg.raw == f"-{arg.size}@{disp}(%{arg.reg})"
    if "O0" in demo:  # at -O0 the local lives in the frame below %rbp
        assert local.kind == "mem" and local.reg == "rbp" and local.offset < 0


def test_demo_const_args(demo: str) -> None:
    assert one(read_probes(demo), "const").args == (
        ArgSpec("-4@$0", 4, True, "const", None, constant=0),
        ArgSpec("-4@$-5", 4, True, "const", None, constant=-5),
    )


def test_demo_semaphores(demo: str) -> None:
    sites = read_probes(demo)
    symbols = nm_symbols(demo)
    addr, offset, size = readelf_section(demo, ".probes")
    data = Path(demo).read_bytes()
    for name in ("reg", "mem", "const"):
        site = one(sites, name)
        assert site.semaphore == symbols[f"demo_{name}_semaphore"]
        assert site.semaphore_offset == site.semaphore - addr + offset
        assert offset <= site.semaphore_offset < offset + size
        assert data[site.semaphore_offset : site.semaphore_offset + 2] == b"\0\0"
    # the data segment is mapped at a different offset than its vaddr in a PIE
    assert any(s.semaphore_offset != s.semaphore for s in sites if s.semaphore)
    nosema = one(sites, "nosema")
    assert (nosema.semaphore, nosema.semaphore_offset, nosema.args) == (0, 0, ())


def test_prelink_base_adjustment(demo: str, tmp_path: Path) -> None:
    """A note whose base differs from .stapsdt.base is shifted by the difference."""
    before = read_probes(demo)
    base_addr, _, _ = readelf_section(demo, ".stapsdt.base")
    _, note_off, note_size = readelf_section(demo, ".note.stapsdt")
    data = bytearray(Path(demo).read_bytes())
    note = bytes(data[note_off : note_off + note_size])
    stale = (base_addr + 0x10).to_bytes(8, "little")
    patched = note.replace(base_addr.to_bytes(8, "little"), stale)
    assert patched.count(stale) == len(before)
    data[note_off : note_off + note_size] = patched
    moved = tmp_path / "moved"
    moved.write_bytes(bytes(data))
    for old, new in zip(before, read_probes(str(moved)), strict=True):
        assert new.base == base_addr + 0x10
        assert new.address == old.address - 0x10
        assert new.semaphore == (old.semaphore - 0x10 if old.semaphore else 0)


# ---------------------------------------------------------------- the real postgres


@needs_postgres
def test_postgres_probes_present() -> None:
    groups = probes_by_name(read_probes(POSTGRES))
    for name in (
        "query__start",
        "query__done",
        "lwlock__wait__start",
        "lwlock__wait__done",
        "lock__wait__start",
        "transaction__commit",
    ):
        assert name in groups, name
        assert all(s.provider == "postgresql" for s in groups[name])
    lwlock = groups["lwlock__wait__start"]
    assert all(s.args[0] == ArgSpec("8@%rax", 8, False, "reg", "rax") for s in lwlock)
    (lock,) = groups["lock__wait__start"]
    assert [a.kind for a in lock.args] == ["mem"] * 5 + ["reg"]


@needs_postgres
@needs_readelf
def test_postgres_matches_readelf() -> None:
    sites = read_probes(POSTGRES)
    notes = readelf_notes(POSTGRES)
    segs = readelf_loads(POSTGRES)
    probes_addr, probes_off, probes_size = readelf_section(POSTGRES, ".probes")
    assert len(sites) == len(notes) > 60
    with open(POSTGRES, "rb") as f:
        data = f.read()
    for site, note in zip(sites, notes, strict=True):
        assert (site.name, site.address, site.semaphore) == (
            note.name,
            note.location,
            note.semaphore,
        )
        assert site.file_offset == expected_offset(segs, site.address)
        assert data[site.file_offset] == NOP, site
        assert site.semaphore_offset != 0
        assert site.semaphore_offset == site.semaphore - probes_addr + probes_off
        assert probes_off <= site.semaphore_offset < probes_off + probes_size


@needs_postgres
def test_render_text() -> None:
    out = io.StringIO()
    render_probes(POSTGRES, read_probes(POSTGRES), out, as_json=False)
    text = out.getvalue()
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert re.search(r"postgresql:lwlock__wait__start\s+\d+ sites\s+semaphore 0x[0-9a-f]+", text)
    assert "8@%rax" in text
    assert "unsupported arg form" in text  # NBuffers(%rip) in buffer__sync__done
    tail = lines[lines.index("Request-boundary uprobe symbols:") + 1 :]
    assert [line.split()[0] for line in tail] == list(REQUEST_SYMBOLS)
    assert re.search(r"ReadyForQuery\s+offset 0x[0-9a-f]+", text)


@needs_postgres
def test_render_json() -> None:
    sites = read_probes(POSTGRES)
    out = io.StringIO()
    render_probes(POSTGRES, sites, out, as_json=True)
    doc = json.loads(out.getvalue())
    assert doc["binary"] == POSTGRES
    by_name = {p["name"]: p for p in doc["probes"]}
    assert sum(len(p["sites"]) for p in doc["probes"]) == len(sites)
    lw = by_name["lwlock__wait__start"]
    assert lw["provider"] == "postgresql"
    assert len(lw["sites"]) == len(probes_by_name(sites)["lwlock__wait__start"])
    first = lw["sites"][0]
    assert set(first) == {"address", "file_offset", "semaphore", "semaphore_offset", "args"}
    assert set(first["args"][0]) == {"raw", "size", "signed", "kind", "reg", "offset", "constant"}
    assert set(doc["symbols"]) == set(REQUEST_SYMBOLS)
    assert isinstance(doc["symbols"]["ReadyForQuery"], int)


def test_render_demo_marks_missing_symbols(demo: str) -> None:
    out = io.StringIO()
    render_probes(demo, read_probes(demo), out, as_json=False)
    assert "demo:nosema  1 site  semaphore none" in out.getvalue()
    assert out.getvalue().count("MISSING") == len(REQUEST_SYMBOLS)


# ---------------------------------------------------------------- errors


def test_binary_without_notes() -> None:
    with pytest.raises(NoProbesError, match="--enable-dtrace") as info:
        read_probes("/bin/true")
    assert "/bin/true" in info.value.message


@pytest.mark.parametrize("kind", ["text", "missing", "directory", "empty"])
def test_unreadable_target(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "postgres"
    if kind == "text":
        target.write_text("#!/bin/sh\nexit 0\n")
    elif kind == "directory":
        target.mkdir()
    elif kind == "empty":
        target.write_bytes(b"")
    with pytest.raises(TargetError) as info:
        read_probes(str(target))
    assert str(target) in info.value.message
    assert "\n" not in info.value.line()


def test_vaddr_outside_image(demo: str) -> None:
    with pytest.raises(TargetError, match="PT_LOAD"):
        vaddr_to_offset(demo, 0x7FFF_0000_0000)
