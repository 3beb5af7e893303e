"""`pgtrace doctor`: can this machine (and this server) be traced, and if not, the fix.

It prints preflight's checks (the ones `attach` runs and stops at), then its own: bcc
imported and a test program compiled (in a child process), PSI, and with --pid/--binary
the server: its cluster, binary, USDT probes and who else runs the binary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from typing import TextIO

from pgtrace.errors import PgtraceError
from pgtrace.preflight import TRACEPOINTS, Check, machine_checks

__all__ = ["TRACEPOINTS", "Check", "render_checks", "run_checks"]

PSI_CPU = "/proc/pressure/cpu"
SYSTEM_BCC = "/usr/lib/python3/dist-packages/bcc"

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


def _first_error_line(text: str) -> str:
    """The most telling line of a failed subprocess's stderr."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# ---------------------------------------------------------------- the checks doctor adds


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
    """USDT probes of a binary, then the ones `attach` refuses to start without."""
    from pgtrace.collect.loader import REQUIRED_USDT
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
    missing = [p for p in REQUIRED_USDT if p not in names]
    if missing:
        required = Check("usdt-required", False, "missing: " + ", ".join(missing), DTRACE_FIX)
    else:
        required = Check("usdt-required", True, ", ".join(REQUIRED_USDT))
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
    tracefs: str | None = None,
    modules_dir: str | None = None,
) -> list[Check]:
    """Preflight's checks (all of them), then doctor's; the server's when a pid/binary is given."""
    checks = machine_checks(tracefs, modules_dir)
    by = {c.name: c for c in checks}
    bcc = check_bcc_import()
    checks += [
        bcc,
        check_bcc_load([by["privileges"], by["headers"], bcc, by["tracefs"]]),
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
