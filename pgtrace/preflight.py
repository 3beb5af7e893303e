"""What tracing needs from this machine: one list of checks, printed by `doctor`, run by `attach`.

`attach` (and `run`, `lab run`) stops at the first failing check, with its one line
(detail and fix) and its exit code; `doctor` prints them all, then its own (bcc, a test
compile, PSI, the server). Privileges: root (euid 0), as the tracing path needs it: bcc
loads and attaches as root, the programs read other users' backends' memory, and the
server's settings are read by dropping to the data directory's owner.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from pgtrace.errors import KernelHeadersError, NotRootError, PgtraceError, SetupError

MIN_KERNEL = (5, 8)  # BPF ring buffers
BTF_PATH = "/sys/kernel/btf/vmlinux"
UPROBE_PMU = "/sys/bus/event_source/devices/uprobe/type"
#: Where tracefs may be mounted, in the order bcc's own lookup prefers them.
TRACEFS_PLACES = ("/sys/kernel/debug/tracing", "/sys/kernel/tracing")
SUDO_FIX = "run it with sudo"


@dataclass(frozen=True)
class Check:
    """One check: its name, whether it passed, what was seen, and the fix if it failed."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


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


def default_tracefs() -> str:
    """The tracefs bcc uses: the first mounted place (its events/ visible), as bcc looks."""
    for place in TRACEFS_PLACES:
        if os.path.isdir(os.path.join(place, "events")):
            return place
    return TRACEFS_PLACES[-1]


def default_modules_dir() -> str:
    """/lib/modules, or ``$PGTRACE_MODULES_DIR`` (tests use it to check the error)."""
    return os.environ.get("PGTRACE_MODULES_DIR") or "/lib/modules"


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) from a uname release like "6.18.44-fc-v769"."""
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise ValueError(f"unrecognised kernel release {release!r}")
    return int(m.group(1)), int(m.group(2))


def check_privileges() -> Check:
    """Root: effective uid 0."""
    uid = os.geteuid()
    if uid == 0:
        return Check("privileges", True, "root (euid 0)")
    return Check("privileges", False, f"tracing needs root (euid 0; this is uid {uid})",
                 SUDO_FIX)


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
        f"kernel {release} is older than {need} (no BPF ring buffer)",
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
        return Check("tracefs", False, f"tracefs at {tracefs} is not readable: permission denied",
                     SUDO_FIX)
    except OSError:
        return Check("tracefs", False, f"tracefs is not mounted at {tracefs}",
                     _tracefs_fix(tracefs))
    if not os.path.isdir(events):
        return Check("tracefs", False, f"tracefs is not mounted at {tracefs}",
                     _tracefs_fix(tracefs))
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
        detail = f"skipped: {tracefs_check.detail}"
        if "not mounted" in tracefs_check.detail:
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
    return Check("tracepoints", False, "missing tracepoints: " + ", ".join(missing), fix)


def apt_has_package(name: str) -> bool:
    """True when apt has the package installed or installable (False without apt)."""
    try:
        res = subprocess.run(["apt-cache", "policy", name], capture_output=True, text=True,
                             timeout=30, check=False)
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


#: The error (and so the exit code) `attach` stops with when a check fails.
ERRORS: dict[str, type[PgtraceError]] = {
    "privileges": NotRootError, "kernel": SetupError, "btf": SetupError,
    "tracefs": SetupError, "uprobes": SetupError,
    "tracepoints": SetupError, "headers": KernelHeadersError,
}


def machine_checks(tracefs: str | None = None, modules_dir: str | None = None, *,
                   first_failure: bool = False) -> list[Check]:
    """The checks in order (names as in ERRORS); with first_failure, up to the first failing."""
    tracefs = tracefs or default_tracefs()
    out: list[Check] = []
    steps = (check_privileges, check_kernel, check_btf, lambda: check_tracefs(tracefs),
             check_uprobes, lambda: check_tracepoints(tracefs, out[3]),
             lambda: check_headers(modules_dir or default_modules_dir()))
    for step in steps:
        out.append(step())
        if first_failure and not out[-1].ok:
            break
    return out


def require() -> None:
    """Raise the first failing check as its error: one line (detail, fix), its exit code."""
    failed = [c for c in machine_checks(first_failure=True) if not c.ok]
    if failed:
        raise ERRORS[failed[0].name](failed[0].detail, failed[0].fix)
