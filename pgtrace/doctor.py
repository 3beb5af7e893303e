"""Environment checks: can this machine (and this server) be traced, and if not, the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import TextIO

from pgtrace.errors import PgtraceError

MIN_KERNEL = (5, 8)  # BPF ring buffers
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

PROC_STATUS = "/proc/self/status"
BTF_PATH = "/sys/kernel/btf/vmlinux"
UPROBE_PMU = "/sys/bus/event_source/devices/uprobe/type"
PSI_CPU = "/proc/pressure/cpu"
SYSTEM_BCC = "/usr/lib/python3/dist-packages/bcc"

def _raw_category(name: str) -> str:
    """The tracefs category of a raw tracepoint the probes use."""
    return "raw_syscalls" if name in ("sys_enter", "sys_exit") else "sched"


def _probe_tracepoints() -> tuple[str, ...]:
    """Every tracepoint the BPF programs in probes/ attach to (cat:name)."""
    from pgtrace.collect.loader import iter_sources

    found = set()
    for _file, text in iter_sources():
        found |= {f"{cat}:{name}"
                  for cat, name in re.findall(r"\bTRACEPOINT_PROBE\((\w+),\s*(\w+)\)", text)}
        found |= {f"{_raw_category(name)}:{name}"
                  for name in re.findall(r"\bRAW_TRACEPOINT_PROBE\((\w+)\)", text)}
    return tuple(sorted(found))


TRACEPOINTS: tuple[str, ...] = _probe_tracepoints()
REQUIRED_PROBES: tuple[str, ...] = (
    "lwlock__wait__start",
    "lwlock__wait__done",
    "lock__wait__start",
    "lock__wait__done",
    "query__start",
)

SUDO_FIX = "sudo pgtrace doctor"
BCC_FIX = (
    "apt-get install python3-bpfcc, and make the venv with "
    "/usr/bin/python3 -m venv --system-site-packages .venv"
)
DTRACE_FIX = (
    "use a PostgreSQL built with --enable-dtrace (Debian and PGDG packages are), "
    "or bash scripts/build-postgres.sh"
)
_SUBPROCESS_TIMEOUT = 120.0

_LOAD_PROGRAM = """
import sys
import bcc
b = bcc.BPF(text="RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }")
try:
    n = len(b.raw_tracepoint_fds)
finally:
    b.cleanup()
sys.stdout.write(str(n))
"""
_IMPORT_PROGRAM = """
import os, sys
import bcc
sys.stdout.write(getattr(bcc, "__version__", "?") + " " + os.path.dirname(bcc.__file__))
"""


@dataclass(frozen=True)
class Check:
    """One check: its name, whether it passed, what was seen, and the fix if it failed."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


# ---------------------------------------------------------------- pure helpers


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) from a uname release like "6.18.44-fc-v769"."""
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise ValueError(f"unrecognised kernel release {release!r}")
    return int(m.group(1)), int(m.group(2))


def effective_caps(status_text: str) -> int:
    """The CapEff bit mask from the text of /proc/PID/status (0 if absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_trace_caps(caps: int) -> bool:
    """True when the mask allows loading BPF and attaching probes."""
    bpf_perfmon = (1 << CAP_BPF) | (1 << CAP_PERFMON)
    return bool(caps & (1 << CAP_SYS_ADMIN)) or (caps & bpf_perfmon) == bpf_perfmon


def _first_error_line(text: str) -> str:
    """The most telling line of a failed subprocess's stderr."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# ---------------------------------------------------------------- individual checks


def check_privileges() -> Check:
    """Root, or CAP_BPF + CAP_PERFMON, in the effective set."""
    try:
        with open(PROC_STATUS) as f:
            caps = effective_caps(f.read())
    except OSError as exc:
        return Check("privileges", False, f"cannot read {PROC_STATUS}: {exc.strerror}", SUDO_FIX)
    uid = os.geteuid()
    names = [
        n
        for bit, n in (
            (CAP_BPF, "CAP_BPF"),
            (CAP_PERFMON, "CAP_PERFMON"),
            (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        )
        if caps & (1 << bit)
    ]
    who = "root" if uid == 0 else f"uid {uid}"
    if has_trace_caps(caps):
        return Check("privileges", True, f"{who}, effective {'+'.join(names)}")
    return Check(
        "privileges", False, f"{who} without CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN)", SUDO_FIX
    )


def check_kernel(release: str | None = None) -> Check:
    """Kernel new enough for BPF ring buffers."""
    release = release or os.uname().release
    try:
        version = kernel_version(release)
    except ValueError as exc:
        return Check("kernel", False, str(exc), "boot a Linux kernel 5.8 or newer")
    need = ".".join(map(str, MIN_KERNEL))
    if version >= MIN_KERNEL:
        return Check("kernel", True, f"{release} (>= {need})")
    return Check(
        "kernel",
        False,
        f"{release} is older than {need} (no BPF ring buffer)",
        "boot a Linux kernel 5.8 or newer (Debian 12: apt-get install linux-image-amd64)",
    )


def check_btf() -> Check:
    """Kernel BTF type information."""
    if os.path.exists(BTF_PATH):
        return Check("btf", True, BTF_PATH)
    return Check("btf", False, f"no {BTF_PATH}", "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y")


def _tracefs_fix(tracefs: str) -> str:
    return f"mount -t tracefs nodev {tracefs}"


def check_tracefs(tracefs: str) -> Check:
    """tracefs mounted (its events/ directory is visible)."""
    events = os.path.join(tracefs, "events")
    try:
        os.stat(events)
    except PermissionError:
        return Check("tracefs", False, f"at {tracefs} is not readable: permission denied", SUDO_FIX)
    except OSError:
        return Check("tracefs", False, f"not mounted at {tracefs}", _tracefs_fix(tracefs))
    if not os.path.isdir(events):
        return Check("tracefs", False, f"not mounted at {tracefs}", _tracefs_fix(tracefs))
    return Check("tracefs", True, f"mounted at {tracefs}")


def check_uprobes() -> Check:
    """The uprobe PMU that perf_event_open attaches uprobes through."""
    try:
        with open(UPROBE_PMU) as f:
            pmu = f.read().strip()
    except OSError:
        return Check(
            "uprobes",
            False,
            f"no uprobe PMU ({UPROBE_PMU})",
            "boot a kernel built with CONFIG_UPROBES=y and CONFIG_UPROBE_EVENTS=y",
        )
    return Check("uprobes", True, f"uprobe PMU type {pmu}")


def check_tracepoints(tracefs: str, tracefs_check: Check) -> Check:
    """Every tracepoint the probes attach to has an id under tracefs."""
    if not tracefs_check.ok:
        detail = f"skipped: tracefs {tracefs_check.detail}"
        if tracefs_check.detail.startswith("not mounted"):
            detail = "skipped: tracefs not mounted"
        return Check("tracepoints", False, detail, tracefs_check.fix)
    missing = []
    for tp in TRACEPOINTS:
        cat, name = tp.split(":")
        try:
            os.stat(os.path.join(tracefs, "events", cat, name, "id"))
        except PermissionError:
            return Check("tracepoints", False, f"{tracefs}: permission denied", SUDO_FIX)
        except OSError:
            missing.append(tp)
    if not missing:
        return Check("tracepoints", True, f"all {len(TRACEPOINTS)} present")
    if any(tp.startswith(("syscalls:", "raw_syscalls:")) for tp in missing):
        fix = "boot a kernel built with CONFIG_FTRACE_SYSCALLS=y"
    else:
        fix = "boot a kernel built with CONFIG_TRACEPOINTS=y"
    return Check("tracepoints", False, "missing: " + ", ".join(missing), fix)


def apt_has_package(name: str) -> bool:
    """True when apt has the package installed or installable (False without apt)."""
    try:
        res = subprocess.run(
            ["apt-cache", "policy", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    for line in res.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key in ("Installed", "Candidate") and value.strip() not in ("", "(none)"):
            return True
    return False


def headers_fix(release: str) -> str:
    """The command that installs (or links) headers for this kernel."""
    if apt_has_package(f"linux-headers-{release}"):
        return "apt-get install linux-headers-$(uname -r)"
    return (
        "sudo bash scripts/setup.sh  (apt has no linux-headers-$(uname -r); "
        "it links the generic Debian headers)"
    )


def check_headers(modules_dir: str, release: str | None = None) -> Check:
    """Kernel headers where bcc looks for them: <modules_dir>/<release>/build."""
    release = release or os.uname().release
    build = os.path.join(modules_dir, release, "build")
    source = os.path.join(modules_dir, release, "source")
    real = os.path.realpath(build)
    if not (
        os.path.isdir(os.path.join(build, "include"))
        and os.path.exists(os.path.join(build, "Makefile"))
    ):
        if os.path.islink(build):
            detail = f"{build} -> {os.readlink(build)} is not a configured headers tree"
        else:
            detail = f"no kernel headers at {build}"
        return Check("headers", False, detail, headers_fix(release))
    if os.path.islink(source) and not os.path.isdir(source):
        detail = f"{source} -> {os.readlink(source)} is dangling"
        return Check("headers", False, detail, headers_fix(release))
    detail = build if real == os.path.abspath(build) else f"{build} -> {real}"
    base = os.path.basename(real)
    if base.startswith("linux-headers-") and base[len("linux-headers-") :] != release:
        detail += f" (generic headers of {base[len('linux-headers-') :]})"
    return Check("headers", True, detail)


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=_SUBPROCESS_TIMEOUT,
        check=False,
        cwd="/",  # no stray ./bcc directory shadows the real module
    )


def _venv_sees_system_packages() -> bool:
    """False only inside a venv made without --system-site-packages."""
    if sys.prefix == sys.base_prefix:
        return True
    try:
        with open(os.path.join(sys.prefix, "pyvenv.cfg")) as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "include-system-site-packages":
                    return value.strip().lower() == "true"
    except OSError:
        pass
    return False


def check_bcc_import() -> Check:
    """bcc's Python module importable by this interpreter (checked in a child process)."""
    try:
        res = _run_python(_IMPORT_PROGRAM)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("bcc", False, f"cannot run {sys.executable}: {exc}", BCC_FIX)
    if res.returncode == 0:
        version, _, where = res.stdout.partition(" ")
        return Check("bcc", True, f"bcc {version} ({where})")
    detail = f"import bcc failed: {_first_error_line(res.stderr)}"
    if os.path.isdir(SYSTEM_BCC) and not _venv_sees_system_packages():
        detail += (
            f"; bcc is installed for /usr/bin/python3 but {sys.executable} "
            "does not see the system site packages"
        )
    return Check("bcc", False, detail, BCC_FIX)


def check_bcc_load(blockers: list[Check]) -> Check:
    """Compile and load a trivial tracepoint program, then detach it at once."""
    for blocker in blockers:
        if not blocker.ok:
            why = {
                "privileges": "not root",
                "headers": "no kernel headers",
                "bcc": "bcc not importable",
                "tracefs": "tracefs not mounted",
            }.get(blocker.name, f"{blocker.name} failed")
            return Check("bcc-load", False, f"skipped: {why}", blocker.fix)
    try:
        res = _run_python(_LOAD_PROGRAM)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("bcc-load", False, f"compile/load did not finish: {exc}", None)
    if res.returncode == 0:
        return Check(
            "bcc-load", True, "compiled, loaded and detached a sched_switch raw tracepoint program"
        )
    return Check(
        "bcc-load",
        False,
        f"compile/load failed: {_first_error_line(res.stderr)}",
        "check the kernel headers match the running kernel: sudo bash scripts/setup.sh",
    )


def check_psi() -> Check:
    """Pressure stall information for CPU, read by the sampler."""
    try:
        with open(PSI_CPU) as f:
            first = f.readline().strip()
    except OSError as exc:
        return Check(
            "psi",
            False,
            f"cannot read {PSI_CPU}: {exc.strerror}",
            "boot with psi=1 on the kernel command line (CONFIG_PSI=y)",
        )
    return Check("psi", True, f"{PSI_CPU}: {first}")


def check_target(pid: int) -> tuple[Check, str | None]:
    """The cluster of `pid`, and its binary (None when it cannot be found)."""
    from pgtrace.target import find_target

    try:
        t = find_target(pid)
    except PgtraceError as exc:
        return Check("target", False, exc.message, exc.hint), None
    clients = len(t.client_backends())
    port = t.port if t.port is not None else "none"
    detail = (
        f"PostgreSQL {t.version}, postmaster {t.postmaster_pid}, {t.data_dir}, port {port}, "
        f"{len(t.backends)} children ({clients} client backends)"
    )
    return Check("target", True, detail), t.binary


def check_engine(pid: int) -> Check:
    """How `attach` would time LWLock waits and end requests on the cluster of `pid`."""
    from pgtrace.collect.waitevent import locate_wait_event_info, supported
    from pgtrace.settings import server_settings
    from pgtrace.target import find_target

    try:
        t = find_target(pid)
    except PgtraceError as exc:
        return Check("engine", False, exc.message, exc.hint)
    if locate_wait_event_info(t.binary, t.major, t.postmaster_pid) is not None:
        lw = f"LWLock waits from wait events (tranche ids of PostgreSQL {t.major})"
    elif supported(t.major):
        lw = "LWLock waits from the lwlock__wait USDT probes (my_wait_event_info not found)"
    else:
        lw = f"LWLock waits from the lwlock__wait USDT probes (no tranche table for {t.major})"
    ssl = server_settings(t.binary, t.postmaster_pid, t.data_dir, ("ssl",)).get("ssl") == "on"
    end = ("requests end at a uprobe on ReadyForQuery (ssl = on)" if ssl
           else "requests end at the send of 'Z'")
    return Check("engine", True, f"{lw}; {end}")


def check_binary(path: str) -> Check:
    """A server binary pgtrace traces: this machine's arch (x86_64), version 13 or newer."""
    from pgtrace.target import (
        MIN_MAJOR,
        binary_version,
        machine_name,
        require_supported_binary,
        support_problem,
    )

    fix = f"trace a PostgreSQL {MIN_MAJOR} or newer on x86_64"
    try:
        arch = machine_name(require_supported_binary(path))
        version, major = binary_version(path)
    except PgtraceError as exc:
        return Check("binary", False, exc.message, exc.hint or fix)
    problem = support_problem(major, None, os.uname().machine)
    if problem is not None:
        return Check("binary", False, f"cannot trace {path}: {problem}", fix)
    return Check("binary", True, f"PostgreSQL {version} ({arch})")


def check_usdt(path: str) -> list[Check]:
    """USDT probes of a binary, then the ones pgtrace cannot do without."""
    from pgtrace.elf.usdt import read_probes
    from pgtrace.target import binary_version

    try:
        sites = read_probes(path)
    except PgtraceError as exc:
        return [
            Check("usdt", False, exc.message, exc.hint or DTRACE_FIX),
            Check("usdt-required", False, "skipped: no USDT probes", DTRACE_FIX),
        ]
    names = {s.name for s in sites}
    try:
        version = f"PostgreSQL {binary_version(path)[0]}: "
    except PgtraceError:
        version = ""
    usdt = Check("usdt", True, f"{version}{len(sites)} probe sites, {len(names)} probes in {path}")
    missing = [p for p in REQUIRED_PROBES if p not in names]
    if missing:
        required = Check("usdt-required", False, "missing: " + ", ".join(missing), DTRACE_FIX)
    else:
        required = Check("usdt-required", True, ", ".join(REQUIRED_PROBES))
    return [usdt, required]


def processes_running(binary: str) -> dict[int, int]:
    """{pid: ppid} of every process whose executable is `binary` (same file)."""
    try:
        want = os.stat(binary)
    except OSError:
        return {}
    from pgtrace.target import parse_stat

    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{name}/exe")
            if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                continue
            with open(f"/proc/{name}/stat") as f:
                found[int(name)] = parse_stat(f.read())[2]
        except (OSError, IndexError, ValueError):
            continue
    return found


PROBE_SCOPE = (
    "attach's uprobes and USDT probes (and their semaphores, ref_ctr_offset) go into every "
    "process running {binary}, not only the traced cluster's"
)


def check_probe_scope(binary: str, pid: int | None) -> Check:
    """Which processes beyond the target cluster take the uprobe traps while attached."""
    running = processes_running(binary)
    mine: set[int] = set()
    if pid is not None:
        from pgtrace.target import find_target

        try:
            t = find_target(pid)
        except PgtraceError:
            pass
        else:
            pm = t.postmaster_pid
            mine = {pm} | {p for p, pp in running.items() if pp == pm}
    others = {p: pp for p, pp in running.items() if p not in mine}
    heads = sorted(p for p, pp in others.items() if pp not in others)
    detail = PROBE_SCOPE.format(binary=binary)
    if not others:
        detail += ": no other process runs it now" if mine else ": no process runs it now"
    else:
        shown = ", ".join(map(str, heads[:5])) + (", ..." if len(heads) > 5 else "")
        detail += (f": {len(others)} {'other ' if mine else ''}processes run it now "
                   f"(parents {shown}) and pay the traps while pgtrace is attached")
    return Check("probe-scope", True, detail)


# ---------------------------------------------------------------- entry points


def run_checks(
    pid: int | None = None,
    binary: str | None = None,
    *,
    tracefs: str = "/sys/kernel/tracing",
    modules_dir: str = "/lib/modules",
) -> list[Check]:
    """Run every check; the pid/binary ones only when a pid or binary is given."""
    privileges = check_privileges()
    tracefs_check = check_tracefs(tracefs)
    headers = check_headers(modules_dir)
    bcc = check_bcc_import()
    checks = [
        privileges,
        check_kernel(),
        check_btf(),
        tracefs_check,
        check_uprobes(),
        check_tracepoints(tracefs, tracefs_check),
        headers,
        bcc,
        check_bcc_load([privileges, headers, bcc, tracefs_check]),
        check_psi(),
    ]
    path = binary
    if pid is not None:
        target, target_binary = check_target(pid)
        checks.append(target)
        if target.ok:
            checks.append(check_engine(pid))
        path = path or target_binary
    if path is not None:
        checks.append(check_binary(path))
        checks.extend(check_usdt(path))
        checks.append(check_probe_scope(path, pid))
    return checks


def render_checks(checks: list[Check], stream: TextIO, *, as_json: bool) -> None:
    """Write the checks as aligned lines, or as one JSON document."""
    if as_json:
        doc = {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}
        json.dump(doc, stream, indent=2)
        stream.write("\n")
        return
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        line = f"{'ok' if c.ok else 'FAIL':<4} {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"  -> fix: {c.fix}"
        stream.write(line + "\n")
