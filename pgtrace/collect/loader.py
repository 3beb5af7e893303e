"""Compile probes/ with -D constants, attach every probe, and always detach.

This module (with session.py) is the only one that imports bcc.  USDT sites
are attached as uprobes through libbcc's ``bpf_attach_uprobe`` with their
semaphore's ``ref_ctr_offset``, so the kernel keeps the semaphore set in every
process mapping the binary while attached, and clears it on detach (bcc's
Python wrapper does not pass that argument).
"""

from __future__ import annotations

import ctypes as ct
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgtrace.collect.btf import VMLINUX_BTF, BtfError, member_offset
from pgtrace.collect.events import (
    DEFAULT_QUERY_LEN,
    PT_REGS,
    Arg,
    ArgKey,
    ArgSpecC,
    abi_header,
    check_layout,
)
from pgtrace.elf.image import load_bias
from pgtrace.elf.symbols import symbol_offset
from pgtrace.elf.usdt import ProbeSite, probes_by_name, read_probes
from pgtrace.errors import (
    BccMissingError,
    KernelHeadersError,
    NoProbesError,
    SetupError,
)

PROBES_DIR = Path(__file__).resolve().parents[2] / "probes"
SOURCES = ("request.bpf.c", "sched.bpf.c", "waits.bpf.c", "syscalls.bpf.c", "stacks.bpf.c")

#: System call numbers by machine (NR_* in syscalls.bpf.c), and the pt_regs
#: field that holds the call's number at its exit. Only x86_64: target.py refuses
#: every other machine before anything is compiled.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"RECVFROM": 45, "SENDTO": 44, "OPENAT": 257, "CLOSE": 3, "FSYNC": 74,
               "FDATASYNC": 75, "PWRITE64": 18, "PWRITEV": 296, "FALLOCATE": 285,
               "EXIT_GROUP": 231},
}
SYSCALL_NR_FIELD = {"x86_64": "orig_ax"}

#: USDT probe -> BPF function, and the argument (0-based) the function reads.
USDT_PROBES: dict[str, tuple[str, int | None]] = {
    "lwlock__wait__start": ("on_lwlock_wait_start", 0),
    "lwlock__wait__done": ("on_lwlock_wait_done", None),
    "lock__wait__start": ("on_lock_wait_start", 4),
    "lock__wait__done": ("on_lock_wait_done", None),
    "smgr__md__read__start": ("on_read_start", None),
    "smgr__md__read__done": ("on_read_done", None),
    "smgr__md__write__start": ("on_write_start", None),
    "smgr__md__write__done": ("on_write_done", None),
    "checkpoint__start": ("on_checkpoint_start", None),
    "checkpoint__done": ("on_checkpoint_done", None),
}

#: Exported functions -> (BPF function, is return probe).
UPROBES: dict[str, tuple[str, bool]] = {
    "ReadyForQuery": ("on_ready_for_query", False),
    "pgstat_report_activity": ("on_report_activity", False),
}

REQUIRED_USDT = ("lwlock__wait__start", "lwlock__wait__done")

BPF_PROBE_ENTRY, BPF_PROBE_RETURN = 0, 1

#: Pages of the driver run-queue ring buffer (-DCLIENT_RINGBUF_PAGES).
CLIENT_RINGBUF_PAGES = 256

#: Task state slots, by pid & (STATE_SLOTS - 1) (-DSTATE_SLOTS).
STATE_SLOTS = 8192


def import_bcc() -> Any:
    """bcc's module, or a clear error naming the package."""
    try:
        import bcc
    except ImportError as exc:
        raise BccMissingError(
            f"cannot import bcc ({exc})",
            "apt-get install python3-bpfcc, and use a venv made with "
            "/usr/bin/python3 -m venv --system-site-packages",
        ) from exc
    return bcc


def check_root() -> None:
    """Refuse early, at the first failing preflight check: root (euid 0), then the machine's
    (kernel, BTF, tracefs, uprobes, tracepoints, headers), as `pgtrace doctor` prints them."""
    from pgtrace.preflight import require

    require()


def check_headers() -> None:
    """bcc needs kernel headers for the running kernel.

    ``$PGTRACE_MODULES_DIR`` replaces /lib/modules here (tests use it to check the error).
    """
    root = os.environ.get("PGTRACE_MODULES_DIR") or "/lib/modules"
    build = Path(root) / os.uname().release / "build"
    if not (build / "include").is_dir():
        raise KernelHeadersError(
            f"no kernel headers at {build}",
            "apt-get install linux-headers-$(uname -r), or run scripts/setup.sh",
        )


def check_tracefs() -> None:
    """Tracepoints need tracefs mounted."""
    if not Path("/sys/kernel/tracing/events").is_dir() and not Path(
        "/sys/kernel/debug/tracing/events"
    ).is_dir():
        raise SetupError(
            "tracefs is not mounted", "mount -t tracefs nodev /sys/kernel/tracing"
        )


@dataclass(frozen=True)
class ProgramConfig:
    """The -D constants a program is compiled with."""

    postmaster_pid: int = 0
    query_len: int = DEFAULT_QUERY_LEN
    ringbuf_pages: int = 4096
    state_running: int = 2
    wal_write_is_sync: bool = False
    wal_flush_is_fsync: bool = False
    mybeentry_addr: int = 0      # nonzero: read query text from the backend status entry
    activity_raw_off: int = 0
    stacks: bool = False         # on/off-CPU stacks for flame graphs
    wait_event_addr: int = 0     # nonzero: classify sleeps by wait event, not LWLock USDT
    io_wait_ctx: tuple[int, ...] = ()  # CTX_* per IO wait event id (with wait_event_addr)
    rfq_uprobe: bool = False     # end requests from a ReadyForQuery uprobe (encrypted streams)

    @classmethod
    def for_sync_method(cls, method: str | None, **kw: Any) -> ProgramConfig:
        """Constants for a wal_sync_method (None: the default, fdatasync)."""
        return cls(
            wal_write_is_sync=method in ("open_sync", "open_datasync"),
            wal_flush_is_fsync=method in ("fsync", "fsync_writethrough"),
            **kw,
        )

    def cflags(self) -> list[str]:
        """Compiler flags for bcc."""
        return [
            f"-I{PROBES_DIR}",
            f"-DPOSTMASTER_PID={self.postmaster_pid}",
            f"-DQUERY_LEN={self.query_len}",
            f"-DRINGBUF_PAGES={self.ringbuf_pages}",
            f"-DCLIENT_RINGBUF_PAGES={CLIENT_RINGBUF_PAGES}",
            f"-DSTATE_SLOTS={STATE_SLOTS}",
            f"-DSTATE_RUNNING={self.state_running}",
            f"-DWAL_WRITE_IS_SYNC={int(self.wal_write_is_sync)}",
            f"-DWAL_FLUSH_IS_FSYNC={int(self.wal_flush_is_fsync)}",
            "-Wno-macro-redefined",
        ] + syscall_flags() + [task_pid_flag()] + (["-DWITH_STACKS"] if self.stacks else []) + (
            [f"-DMYBEENTRY_ADDR={self.mybeentry_addr:#x}ULL",
             f"-DACTIVITY_RAW_OFF={self.activity_raw_off}"]
            if self.mybeentry_addr
            else []
        ) + (
            [f"-DMY_WAIT_EVENT_INFO_ADDR={self.wait_event_addr:#x}ULL"]
            if self.wait_event_addr
            else []
        ) + (["-DRFQ_UPROBE"] if self.rfq_uprobe else [])

    def skips(self, name: str) -> bool:
        """Whether a uprobe or USDT probe is left out under this configuration."""
        if name == "ReadyForQuery":
            return not self.rfq_uprobe
        if name == "pgstat_report_activity":
            return self.mybeentry_addr != 0
        return name.startswith("lwlock__wait__") and self.wait_event_addr != 0


def syscall_flags(machine: str | None = None) -> list[str]:
    """-D flags naming this machine's system call numbers."""
    machine = machine or os.uname().machine
    if machine not in SYSCALLS:
        raise SetupError(f"pgtrace does not know the system calls of {machine}",
                                "run it on x86_64")
    return [f"-DNR_{name}={nr}" for name, nr in SYSCALLS[machine].items()] + [
        f"-DSYSCALL_NR_FIELD={SYSCALL_NR_FIELD[machine]}"]


def task_pid_flag(btf_path: str = VMLINUX_BTF) -> str:
    """-DTASK_PID_OFF: where a task's pid sits in this kernel's task_struct."""
    try:
        return f"-DTASK_PID_OFF={member_offset('task_struct', 'pid', btf_path)}"
    except BtfError as exc:
        raise SetupError(
            f"cannot find task_struct.pid in the kernel's BTF ({exc})",
            "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's are)",
        ) from exc


def program_text() -> str:
    """The BPF program: the generated ABI, the shared header, then each family's file.

    bcc rewrites map calls only in the main text, so the header is inlined
    first; its include guard turns the files' own #include into a no-op.
    """
    return "\n".join(text for _name, text in iter_sources())


@dataclass
class Attachment:
    """Everything attached for one session; detach() undoes all of it."""

    bpf: Any
    perf_fds: list[int] = field(default_factory=list)
    sites: list[ProbeSite] = field(default_factory=list)

    def stop(self) -> None:
        """Detach every probe and tracepoint but keep the maps readable; safe to call twice.

        From here on no program runs: nothing more is recorded and the server pays nothing.
        """
        if self.bpf is not None:  # the tracepoints first: they end requests, and cost most
            for tp in list(self.bpf.raw_tracepoint_fds):
                self.bpf.detach_raw_tracepoint(tp)
            for ev_type, ev_config in list(self.bpf.open_perf_events):
                self.bpf.detach_perf_event(ev_type, ev_config)
        lib = _libbcc()
        while self.perf_fds:
            lib.bpf_close_perf_event_fd(self.perf_fds.pop())

    def detach(self) -> None:
        """Close every uprobe and tracepoint, then the maps; safe to call twice."""
        self.stop()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


_LIB: Any = None


def _libbcc() -> Any:
    """libbcc with the 7-argument bpf_attach_uprobe prototype."""
    global _LIB
    if _LIB is None:
        lib = ct.CDLL("libbcc.so.0", use_errno=True)
        lib.bpf_attach_uprobe.restype = ct.c_int
        lib.bpf_attach_uprobe.argtypes = [
            ct.c_int, ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_uint64, ct.c_int, ct.c_uint32,
        ]
        lib.bpf_close_perf_event_fd.restype = ct.c_int
        lib.bpf_close_perf_event_fd.argtypes = [ct.c_int]
        _LIB = lib
    return _LIB


def attach_uprobe(
    att: Attachment, fn_fd: int, binary: str, offset: int, *, ret: bool = False, ref_ctr: int = 0
) -> None:
    """One uprobe (or uretprobe) on binary+offset for every process, with a semaphore."""
    lib = _libbcc()
    kind = BPF_PROBE_RETURN if ret else BPF_PROBE_ENTRY
    name = f"pgtrace_{os.getpid()}_{offset:x}_{kind}".encode()
    fd = lib.bpf_attach_uprobe(fn_fd, kind, name, binary.encode(), offset, -1, ref_ctr)
    if fd < 0:
        err = ct.get_errno()
        raise SetupError(
            f"cannot attach a uprobe at {binary}+{offset:#x}: {os.strerror(err)}",
            "check `pgtrace doctor`",
        )
    att.perf_fds.append(fd)


def arg_spec(site: ProbeSite, argno: int) -> ct.Structure | None:
    """The C argspec for one argument of a site, or None if unreadable."""
    if argno >= len(site.args):
        return None
    a = site.args[argno]
    spec = ArgSpecC(size=a.size, is_signed=int(a.signed))
    if a.kind == "const":
        spec.kind, spec.off = Arg.CONST, a.constant
        return spec
    if a.kind not in ("reg", "mem") or a.reg is None or a.reg not in PT_REGS:
        return None
    spec.kind = Arg.REG if a.kind == "reg" else Arg.MEM
    spec.reg = PT_REGS.index(a.reg)
    spec.off = a.offset
    return spec


def preflight() -> Any:
    """bcc's module, once root, kernel headers and tracefs are there (else one clear error)."""
    bcc = import_bcc()
    check_root()
    check_headers()
    check_tracefs()
    return bcc


def compile_program(config: ProgramConfig) -> Any:
    """Compile and load the programs, and check their maps' layout against the Python
    mirror (AbiMismatchError, the programs closed); tracepoints attach as bcc loads them."""
    bcc = preflight()
    try:
        bpf = bcc.BPF(text=program_text(), cflags=config.cflags())
    except Exception as exc:
        raise SetupError(f"bcc could not load pgtrace's BPF programs: {exc}") from exc
    try:
        check_layout(bpf, config.query_len, stacks=config.stacks,
                     io_map=bool(config.wait_event_addr))
    except BaseException:
        bpf.cleanup()
        raise
    return bpf


def usdt_sites(binary: str) -> dict[str, list[ProbeSite]]:
    """The binary's USDT sites by probe name; NoProbesError if a required probe is absent."""
    by_name = probes_by_name(read_probes(binary))
    missing = [p for p in REQUIRED_USDT if p not in by_name]
    if missing:
        raise NoProbesError(f"{binary} lacks USDT probes {', '.join(missing)}")
    return by_name


def fill_usdt_args(bpf: Any, sites: dict[str, list[ProbeSite]], binary: str, pid: int,
                   config: ProgramConfig) -> None:
    """The argument specs of the probed sites, at their runtime addresses in `pid`'s mapping.

    An unreadable spec stays out of the map: BPF counts it (badarg).
    """
    args = bpf["usdt_args"]
    try:
        bias = load_bias(binary, pid)
    except LookupError:
        raise NoProbesError(f"{binary} is not mapped in pid {pid}") from None
    for probe, (_fn, argno) in USDT_PROBES.items():
        if argno is None or config.skips(probe):
            continue
        for site in sites.get(probe, []):
            spec = arg_spec(site, argno)
            if spec is not None:
                args[ArgKey(ip=bias + site.address, argno=argno)] = spec


def attach_all(
    bpf: Any, binary: str, pid_for_maps: int, config: ProgramConfig | None = None,
    sites: dict[str, list[ProbeSite]] | None = None,
) -> Attachment:
    """Attach the uprobes and USDT sites; on any failure detach what was attached."""
    bcc = import_bcc()
    att = Attachment(bpf)
    config = config or ProgramConfig()
    try:
        if config.wait_event_addr:
            io_map = bpf["io_wait_ctx"]
            for event_id, ctx in enumerate(config.io_wait_ctx):
                io_map[ct.c_uint32(event_id)] = ct.c_uint8(ctx)
        for sym, (fn, ret) in UPROBES.items():
            if config.skips(sym):
                continue
            fd = bpf.load_func(fn, bcc.BPF.KPROBE).fd
            attach_uprobe(att, fd, binary, symbol_offset(binary, sym), ret=ret)
        by_name = sites if sites is not None else usdt_sites(binary)
        fill_usdt_args(bpf, by_name, binary, pid_for_maps, config)
        for probe, (fn, _argno) in USDT_PROBES.items():
            if config.skips(probe):
                continue
            fd = bpf.load_func(fn, bcc.BPF.KPROBE).fd
            for site in by_name.get(probe, []):
                attach_uprobe(att, fd, binary, site.file_offset, ref_ctr=site.semaphore_offset)
                att.sites.append(site)
    except BaseException:
        att.detach()
        raise
    return att


def iter_sources() -> Iterator[tuple[str, str]]:
    """(file name, text) of every probe source, the generated ABI first (also for --ebpf)."""
    yield "pgtrace_abi.h", abi_header()
    yield "pgtrace.h", (PROBES_DIR / "pgtrace.h").read_text()
    for name in SOURCES:
        yield name, (PROBES_DIR / name).read_text()
