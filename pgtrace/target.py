"""Find a PostgreSQL cluster from any of its pids: postmaster, data dir, backends.

Everything comes from /proc and the data directory; no database connection.
"""

from __future__ import annotations

import errno
import os
import platform
import re
from dataclasses import dataclass

from pgtrace.elf.image import open_image
from pgtrace.elf.version import binary_version as binary_version  # callers' name
from pgtrace.elf.version import parse_version as parse_version
from pgtrace.errors import TargetError, UnsupportedError
from pgtrace.proc import PROC, children, cmdline, ns_pids, read_stat, title_of
from pgtrace.proc import parse_stat as parse_stat  # doctor's name for it

POSTGRES_EXES = frozenset({"postgres", "postmaster"})
PF_KTHREAD = 0x00200000  # task flag of kernel threads (include/linux/sched.h)
ROOT_HINT = "run as root: sudo pgtrace ..."

#: The oldest major version traced: the probes, wait events and status-entry layout that
#: pgtrace knows start here.
MIN_MAJOR = 13
#: Architectures whose USDT argument specs and pt_regs layout pgtrace reads (ELF e_machine
#: -> name); `uname -m` spellings of the same.
SUPPORTED_MACHINES = {"EM_X86_64": "x86_64"}
SUPPORTED_HOSTS = frozenset({"x86_64", "amd64"})
_MACHINE_NAMES = {
    "EM_X86_64": "x86_64",
    "EM_AARCH64": "aarch64",
    "EM_386": "i386",
    "EM_ARM": "arm",
    "EM_PPC64": "ppc64",
    "EM_PPC": "ppc",
    "EM_S390": "s390x",
    "EM_RISCV": "riscv64",
    "EM_LOONGARCH": "loongarch64",
    "EM_MIPS": "mips",
}

# Process-title prefixes of auxiliary processes and known background workers
# (PostgreSQL 10..18), longest first where one is a prefix of another.
AUX_KINDS: tuple[str, ...] = (
    "autovacuum launcher",
    "autovacuum worker",
    "background writer",
    "checkpointer",
    "walwriter",
    "walreceiver",
    "walsummarizer",
    "archiver",
    "startup",
    "logger",
    "stats collector",
    "logical replication launcher",
    "logical replication apply worker",
    "logical replication tablesync worker",
    "logical replication parallel worker",
    "logical replication worker",
    "parallel worker",
    "slotsync worker",
    "io worker",
)
CLIENT = "client backend"
WALSENDER = "walsender"
BGWORKER = "background worker"
UNKNOWN = "unknown"

# The host part of a backend title: "[local]" or "host(port)".
_HOST_RE = re.compile(r"(?:^|\s)(?:\[local\]|\S+\(\d+\))(?:\s|$)")


@dataclass(frozen=True)
class Backend:
    """One child of the postmaster and its kind, from the process title."""

    pid: int
    kind: str


@dataclass(frozen=True)
class Target:
    """A running cluster: its postmaster, data directory, binary and children."""

    postmaster_pid: int
    data_dir: str
    port: int | None
    socket_dir: str | None
    binary: str
    version: str
    major: int
    backends: tuple[Backend, ...]

    def client_backends(self) -> tuple[int, ...]:
        """Pids of the client backends (sessions), in pid order."""
        return tuple(b.pid for b in self.backends if b.kind == CLIENT)


# ---------------------------------------------------------------- pure parsing


def backend_kind(title: str) -> str:
    """The kind of a postmaster child from its process title.

    Titles look like "postgres: [cluster_name: ]checkpointer" or
    "postgres: [cluster_name: ]user db host(port) activity" for a client.
    """
    if not title.startswith("postgres: "):
        return UNKNOWN  # freshly forked, title not set yet
    rest = title[len("postgres: ") :].strip()
    candidates = [rest]
    if ": " in rest:  # cluster_name prefix
        candidates.append(rest.split(": ", 1)[1])
    for text in candidates:
        if _starts_with_word(text, WALSENDER):
            return WALSENDER
    if _HOST_RE.search(rest):
        return CLIENT
    for text in candidates:
        for kind in AUX_KINDS:
            if _starts_with_word(text, kind):
                return kind
    return BGWORKER


def _starts_with_word(text: str, word: str) -> bool:
    return text == word or text.startswith(word + " ")


@dataclass(frozen=True)
class PidFile:
    """The lines of postmaster.pid that matter here."""

    pid: int
    data_dir: str
    port: int | None
    socket_dir: str | None


def parse_pidfile(text: str) -> PidFile:
    """Parse postmaster.pid: pid, data dir, start time, port, socket dir, ..."""
    lines = text.split("\n")
    if len(lines) < 2 or not lines[0].strip().lstrip("-").isdigit():
        raise ValueError("not a postmaster.pid")
    port_s = lines[3].strip() if len(lines) > 3 else ""
    sock = lines[4].strip() if len(lines) > 4 else ""
    return PidFile(
        pid=abs(int(lines[0].strip())),  # negative: a standalone backend
        data_dir=lines[1].strip(),
        port=int(port_s) if port_s.isdigit() else None,
        socket_dir=sock or None,
    )


def machine_name(e_machine: str) -> str:
    """The usual name of an ELF e_machine value: "EM_AARCH64" -> "aarch64"."""
    return _MACHINE_NAMES.get(e_machine, e_machine.removeprefix("EM_").lower())


def support_problem(major: int | None, e_machine: str | None, host: str) -> str | None:
    """Why a server cannot be traced here (one phrase), or None when it can.

    ``major`` None: the version is not known (not checked); ``e_machine`` None: the binary's
    architecture is not known (not checked); ``host`` is `uname -m`.
    """
    if host not in SUPPORTED_HOSTS:
        return f"this machine is {host}: pgtrace traces x86_64 only"
    if e_machine is not None and e_machine not in SUPPORTED_MACHINES:
        return f"it is built for {machine_name(e_machine)}: pgtrace traces x86_64 binaries only"
    if major is not None and major < MIN_MAJOR:
        return f"PostgreSQL {major} is too old: pgtrace needs {MIN_MAJOR} or newer"
    return None


# ---------------------------------------------------------------- /proc access


@dataclass(frozen=True)
class _Proc:
    pid: int
    comm: str
    ppid: int
    exe: str | None  # None when unreadable (denied) or gone
    denied: bool = False


def _read_proc(pid: int) -> _Proc:
    """Read one process; TargetError if it is absent, a kernel thread, or unreadable."""
    if pid <= 0:
        raise TargetError(f"no process {pid}")
    try:
        comm, state, ppid, flags = read_stat(pid)
    except FileNotFoundError:
        raise TargetError(f"no process {pid}") from None
    except ProcessLookupError:
        raise TargetError(f"no process {pid}") from None
    if flags & PF_KTHREAD:
        raise TargetError(f"pid {pid} is a kernel thread ({comm}), not a PostgreSQL process")
    if state in ("Z", "X"):
        raise TargetError(f"pid {pid} ({comm}) has exited (zombie)")
    try:
        exe: str | None = os.readlink(f"{PROC}/{pid}/exe")
    except PermissionError:
        return _Proc(pid=pid, comm=comm, ppid=ppid, exe=None, denied=True)
    except FileNotFoundError:
        if not os.path.exists(f"{PROC}/{pid}"):
            raise TargetError(f"no process {pid}") from None
        exe = None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise TargetError(f"no process {pid}") from None
        raise TargetError(f"cannot inspect pid {pid} ({comm}): {exc.strerror}") from None
    return _Proc(pid=pid, comm=comm, ppid=ppid, exe=exe)


def _is_postgres(proc: _Proc) -> bool:
    if proc.exe is None:
        return False
    return os.path.basename(proc.exe.removesuffix(" (deleted)")) in POSTGRES_EXES


# ---------------------------------------------------------------- public API


def list_backends(postmaster_pid: int) -> tuple[Backend, ...]:
    """The current children of a postmaster with their kinds (vanished ones skipped)."""
    out = []
    for kid in children(postmaster_pid):
        raw = cmdline(kid)
        if not raw:
            continue  # exited meanwhile
        out.append(Backend(pid=kid, kind=backend_kind(title_of(raw))))
    return tuple(out)


def find_postmaster(pid: int) -> int:
    """The postmaster pid of the cluster that `pid` belongs to (pid itself if it is one)."""
    proc = _read_proc(pid)
    if proc.denied:
        if proc.comm not in POSTGRES_EXES:
            raise TargetError(f"pid {pid} is {proc.comm}, not a PostgreSQL server process")
        raise TargetError(f"cannot inspect pid {pid} ({proc.comm}): permission denied", ROOT_HINT)
    if proc.exe is None:
        raise TargetError(f"pid {pid} ({proc.comm}) has no executable, not a PostgreSQL process")
    if not _is_postgres(proc):
        name = os.path.basename(proc.exe) or proc.comm
        raise TargetError(f"pid {pid} is {name}, not a PostgreSQL server process")
    while proc.ppid > 0:
        try:
            parent = _read_proc(proc.ppid)
        except TargetError:
            break
        if parent.exe != proc.exe:
            break
        proc = parent
    return proc.pid


def find_target(pid: int) -> Target:
    """Describe the cluster that `pid` (postmaster or any child) belongs to."""
    pm = find_postmaster(pid)
    proc = _read_proc(pm)
    if proc.exe is None:
        raise TargetError(f"cannot inspect postmaster {pm} ({proc.comm})", ROOT_HINT)
    if proc.exe.endswith(" (deleted)"):
        raise TargetError(
            f"the binary of postmaster {pm} ({proc.exe}) was replaced on disk since it started",
            "restart the server so it runs the installed binary",
        )
    pidfile = _read_pidfile(pm)
    if pidfile.pid not in (pm, ns_pids(pm)[-1]):
        raise TargetError(
            f"pid {pm} is a postgres process but not a running postmaster: "
            f"postmaster.pid in {pidfile.data_dir} names pid {pidfile.pid}"
        )
    binary = proc.exe
    if not os.path.exists(binary) and os.path.exists(f"{PROC}/{pm}/root{binary}"):
        binary = f"{PROC}/{pm}/root{binary}"  # another mount namespace (container)
    require_supported_binary(binary if os.path.exists(binary) else f"{PROC}/{pm}/exe", pm)
    version, major = _running_version(pm, binary)
    problem = support_problem(major, None, platform.machine())
    if problem is not None:
        raise UnsupportedError(f"cannot trace postmaster {pm} ({binary}, {version}): {problem}")
    data_major = _pg_version_file(pm)
    if data_major is not None and data_major.partition(".")[0] != str(major):
        raise TargetError(
            f"binary {binary} is PostgreSQL {version} but the data directory "
            f"{pidfile.data_dir} is for PostgreSQL {data_major}"
        )
    return Target(
        postmaster_pid=pm,
        data_dir=pidfile.data_dir,
        port=pidfile.port,
        socket_dir=pidfile.socket_dir,
        binary=binary,
        version=version,
        major=major,
        backends=list_backends(pm),
    )


def binary_machine(path: str) -> str:
    """The ELF e_machine of a binary ("EM_X86_64", "EM_AARCH64", ...)."""
    with open_image(path) as image:
        return image.machine


def require_supported_binary(path: str, pm: int | None = None) -> str:
    """The binary's e_machine; UnsupportedError when it or this machine is not x86_64."""
    machine = binary_machine(path)
    problem = support_problem(None, machine, platform.machine())
    if problem is not None:
        who = f"postmaster {pm} ({path})" if pm is not None else path
        raise UnsupportedError(f"cannot trace {who}: {problem}")
    return machine


def _running_version(pm: int, binary: str) -> tuple[str, int]:
    """Version of the binary the postmaster runs; via /proc/PM/exe if the path is not ours."""
    if os.path.exists(binary):
        return binary_version(binary)
    return binary_version(f"{PROC}/{pm}/exe")


def _read_pidfile(pm: int) -> PidFile:
    """postmaster.pid from the postmaster's cwd (its data directory)."""
    path = f"{PROC}/{pm}/cwd/postmaster.pid"
    try:
        with open(path) as f:
            text = f.read()
    except PermissionError:
        raise TargetError(
            f"cannot read the data directory of postmaster {pm}: permission denied", ROOT_HINT
        ) from None
    except OSError:
        cwd = _readlink_or(f"{PROC}/{pm}/cwd", "?")
        raise TargetError(
            f"pid {pm} is a postgres process but not a running postmaster "
            f"(no postmaster.pid in its working directory {cwd})"
        ) from None
    try:
        return parse_pidfile(text)
    except ValueError:
        raise TargetError(f"malformed postmaster.pid of postmaster {pm}") from None


def _pg_version_file(pm: int) -> str | None:
    try:
        with open(f"{PROC}/{pm}/cwd/PG_VERSION") as f:
            return f.read().strip()
    except OSError:
        return None


def _readlink_or(path: str, default: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return default
