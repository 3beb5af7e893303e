"""Target discovery: title parsing, /proc parsing, and the errors bad pids get."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pgtrace import proc, target
from pgtrace.errors import TargetError
from pgtrace.proc import parse_stat, title_of
from pgtrace.target import (
    backend_kind,
    binary_version,
    find_postmaster,
    find_target,
    list_backends,
    parse_pidfile,
    parse_version,
)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `cond()` until true or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.01)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A `sleep 30` of our own, killed afterwards."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


# ---------------------------------------------------------------- titles


@pytest.mark.parametrize(
    ("title", "kind"),
    [
        ("postgres: checkpointer", "checkpointer"),
        ("postgres: 15/main: checkpointer", "checkpointer"),
        ("postgres: background writer", "background writer"),
        ("postgres: 15/main: background writer", "background writer"),
        ("postgres: walwriter", "walwriter"),
        ("postgres: autovacuum launcher", "autovacuum launcher"),
        ("postgres: 15/main: autovacuum worker mydb", "autovacuum worker"),
        ("postgres: logical replication launcher", "logical replication launcher"),
        ("postgres: 15/main: logical replication launcher", "logical replication launcher"),
        ("postgres: archiver last was 000000010000000000000003", "archiver"),
        ("postgres: startup recovering 000000010000000000000003", "startup"),
        ("postgres: walreceiver streaming 0/3000148", "walreceiver"),
        ("postgres: logger", "logger"),
        ("postgres: stats collector", "stats collector"),
        ("postgres: parallel worker for PID 4242", "parallel worker"),
        (
            "postgres: logical replication worker for subscription 16394",
            "logical replication worker",
        ),
        ("postgres: postgres postgres [local] idle", "client backend"),
        ("postgres: 15/main: postgres postgres [local] SELECT", "client backend"),
        ("postgres: app shop 10.0.0.7(51234) idle in transaction", "client backend"),
        ("postgres: 15/main: app shop ::1(40000) INSERT waiting", "client backend"),
        ("postgres: app shop [local] authentication", "client backend"),
        # a user named like an auxiliary process is still a client
        ("postgres: checkpointer shop [local] idle", "client backend"),
        ("postgres: walsender repl [local] streaming 0/3000148", "walsender"),
        ("postgres: 15/main: walsender repl 10.0.0.8(5433) idle", "walsender"),
        ("postgres: TimescaleDB Background Worker Scheduler", "background worker"),
        ("postgres: pg_wait_sampling collector", "background worker"),
        ("/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main", "unknown"),
        ("", "unknown"),
    ],
)
def test_backend_kind(title: str, kind: str) -> None:
    assert backend_kind(title) == kind


def test_title_of_strips_padding_and_trailing_space() -> None:
    raw = b"postgres: 15/main: checkpointer " + b"\0" * 40
    assert title_of(raw) == "postgres: 15/main: checkpointer"
    assert title_of(b"/usr/bin/postgres\0-D\0/data\0") == "/usr/bin/postgres"
    assert title_of(b"") == ""


# ---------------------------------------------------------------- /proc and files


def test_parse_stat_with_awkward_comm() -> None:
    text = "4043 (we ird) (x) S 1 4043 4043 0 -1 4194304 3772 492 0 0 0 1"
    assert parse_stat(text) == ("we ird) (x", "S", 1, 4194304)


def test_parse_stat_of_ourselves() -> None:
    with open(f"/proc/{os.getpid()}/stat") as f:
        _comm, state, ppid, flags = parse_stat(f.read())
    assert ppid == os.getppid()
    assert state in "RS"
    assert not flags & target.PF_KTHREAD


def test_parse_pidfile_full() -> None:
    text = "4043\n/tmp/pg/data\n1795306786\n54999\n/tmp/pg\n\n  2146322         4\nready   \n"
    pf = parse_pidfile(text)
    assert (pf.pid, pf.data_dir, pf.port, pf.socket_dir) == (4043, "/tmp/pg/data", 54999, "/tmp/pg")


def test_parse_pidfile_without_socket_and_while_starting() -> None:
    pf = parse_pidfile("77\n/srv/data\n1700000000\n5432\n\n")
    assert pf.socket_dir is None
    assert pf.port == 5432
    early = parse_pidfile("77\n/srv/data\n")
    assert (early.port, early.socket_dir) == (None, None)


def test_parse_pidfile_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_pidfile("hello\n")
    with pytest.raises(ValueError):
        parse_pidfile("")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n", ("15.18", 15)),
        ("postgres (PostgreSQL) 16.2\n", ("16.2", 16)),
        ("postgres (PostgreSQL) 17beta1\n", ("17beta1", 17)),
        ("postgres (PostgreSQL) 18devel\n", ("18devel", 18)),
    ],
)
def test_parse_version(output: str, expected: tuple[str, int]) -> None:
    assert parse_version(output) == expected


def test_parse_version_rejects_other_programs() -> None:
    with pytest.raises(ValueError):
        parse_version("sleep (GNU coreutils) 9.1\n")


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _elf(tmp_path: Path, *strings: str, name: str = "postgres") -> str:
    """A small x86_64 executable whose read-only data holds `strings`; running it would
    create `ran` next to it."""
    src = tmp_path / "fake.c"
    decls = "".join(f"const char s{i}[] = {json.dumps(t)};\n" for i, t in enumerate(strings))
    uses = "".join(f"puts(s{i});" for i in range(len(strings)))
    src.write_text("#include <stdio.h>\n" + decls + "int main(void) { "
                   f"fclose(fopen({json.dumps(str(tmp_path / 'ran'))}, \"w\")); {uses} "
                   "return 0; }\n")
    exe = tmp_path / name
    subprocess.run(["gcc", "-O0", "-o", str(exe), str(src)], check=True)
    return str(exe)


def test_binary_version_is_read_not_run(tmp_path: Path) -> None:
    """--version is what PG_BACKEND_VERSIONSTR says; the binary itself never runs."""
    fake = _elf(tmp_path, "postgres (PostgreSQL) 16.4\n",
                "PostgreSQL 16.4 on x86_64-pc-linux-gnu, compiled by gcc 12.2.0, 64-bit")
    assert binary_version(fake) == ("16.4", 16)
    assert not (tmp_path / "ran").exists()


def test_binary_version_of_the_installed_server() -> None:
    """Debian's 15 names itself `15.18 (Debian ...)` in both strings: the version is 15.x."""
    version, major = binary_version("/usr/lib/postgresql/15/bin/postgres")
    assert major == 15 and version.startswith("15.")


@pytest.mark.parametrize(
    ("strings", "why"),
    [
        (("hello",), "names no PostgreSQL version"),
        (("postgres (PostgreSQL) 16.4\n",
          "PostgreSQL 13.1 on x86_64-pc-linux-gnu, compiled by gcc, 64-bit"),
         "names versions 13.1, 16.4"),
        (("postgres (PostgreSQL) 16.4\n", "postgres (PostgreSQL) 17.0\n"),
         "names versions 16.4, 17.0"),
    ],
)
def test_binary_version_refuses_what_is_no_postgres(tmp_path: Path, strings: tuple[str, ...],
                                                    why: str) -> None:
    fake = _elf(tmp_path, *strings)
    with pytest.raises(TargetError, match=why):
        binary_version(fake)
    assert not (tmp_path / "ran").exists()


def test_binary_version_of_a_script_or_nothing(tmp_path: Path) -> None:
    """A script that would print a version is not run: it is no ELF binary."""
    fake = _script(tmp_path / "postgres", f"touch {tmp_path / 'ran'}; "
                   "echo 'postgres (PostgreSQL) 16.4'")
    with pytest.raises(TargetError, match="is not an ELF file"):
        binary_version(fake)
    assert not (tmp_path / "ran").exists()
    with pytest.raises(TargetError, match="cannot read"):
        binary_version(str(tmp_path / "absent"))


# ---------------------------------------------------------------- bad pids


def test_kernel_thread() -> None:
    with pytest.raises(TargetError) as err:
        find_target(2)  # kthreadd
    assert err.value.message == "pid 2 is a kernel thread (kthreadd), not a PostgreSQL process"


def test_pid_1_is_not_postgres() -> None:
    with open("/proc/1/comm") as f:
        comm = f.read().strip()
    with pytest.raises(TargetError) as err:
        find_target(1)
    assert err.value.message.startswith("pid 1 is ")
    assert err.value.message.endswith(", not a PostgreSQL server process")
    assert comm in err.value.message


def test_dead_pid() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    with pytest.raises(TargetError) as err:
        find_target(proc.pid)
    assert err.value.message == f"no process {proc.pid}"


@pytest.mark.parametrize("pid", [0, -1])
def test_impossible_pids(pid: int) -> None:
    with pytest.raises(TargetError, match=f"no process {pid}"):
        find_target(pid)


def test_other_program(sleeper: subprocess.Popen[bytes]) -> None:
    with pytest.raises(TargetError) as err:
        find_target(sleeper.pid)
    assert err.value.message == f"pid {sleeper.pid} is sleep, not a PostgreSQL server process"
    assert err.value.exit_code == 3
    assert "\n" not in err.value.line()


def test_a_postgres_named_program_that_is_no_postmaster(tmp_path: Path) -> None:
    """An executable called postgres without postmaster.pid in its cwd is refused."""
    fake = tmp_path / "postgres"
    shutil.copy("/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "30"], cwd=tmp_path)
    try:
        assert find_postmaster(proc.pid) == proc.pid
        with pytest.raises(TargetError, match="not a running postmaster"):
            find_target(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_postgres_named_program_with_a_stale_pidfile(tmp_path: Path) -> None:
    """postmaster.pid naming another pid: an orphan or a copied data directory."""
    fake = tmp_path / "postgres"
    shutil.copy("/bin/sleep", fake)
    (tmp_path / "postmaster.pid").write_text("1\n/somewhere/else\n0\n5432\n/tmp\n")
    proc = subprocess.Popen([str(fake), "30"], cwd=tmp_path)
    try:
        with pytest.raises(TargetError, match="names pid 1"):
            find_target(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_list_backends_lists_children() -> None:
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    kids: tuple[target.Backend, ...] = ()
    try:
        wait_for(lambda: len(list_backends(parent.pid)) == 2)
        kids = list_backends(parent.pid)
        assert all(b.kind == "unknown" for b in kids)  # titles are not postgres titles
        assert [b.pid for b in kids] == proc.children_by_scan(parent.pid)
    finally:
        for kid in kids:
            os.kill(kid.pid, signal.SIGKILL)
        parent.kill()
        parent.wait(timeout=10)


@pytest.mark.parametrize(
    ("major", "machine", "host", "problem"),
    [
        (15, "EM_X86_64", "x86_64", None),
        (13, "EM_X86_64", "x86_64", None),
        (18, None, "x86_64", None),
        (None, "EM_X86_64", "x86_64", None),
        (12, "EM_X86_64", "x86_64", "PostgreSQL 12 is too old: pgtrace needs 13 or newer"),
        (18, "EM_AARCH64", "x86_64",
         "it is built for aarch64: pgtrace traces x86_64 binaries only"),
        (18, "EM_PPC64", "x86_64", "it is built for ppc64: pgtrace traces x86_64 binaries only"),
        (18, "EM_X86_64", "aarch64", "this machine is aarch64: pgtrace traces x86_64 only"),
    ],
)
def test_support_problem(major: int | None, machine: str | None, host: str,
                         problem: str | None) -> None:
    assert target.support_problem(major, machine, host) == problem


def test_machine_of_this_python() -> None:
    import sys

    assert target.binary_machine(sys.executable) == "EM_X86_64"
    assert target.require_supported_binary(sys.executable) == "EM_X86_64"
    assert target.machine_name("EM_AARCH64") == "aarch64"
    assert target.machine_name("EM_SPARCV9") == "sparcv9"
