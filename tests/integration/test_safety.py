# ruff: noqa: F811 - the cluster/pm/attaches fixtures come from test_attach_cli
"""Safe by default (issue 13), with root, real clusters and real BPF.

- a `postgres` built by an unprivileged user is never executed as root (probes, doctor,
  attach --pid), and the settings pgtrace reads with `postgres -C` run as its owner;
- Ctrl-C in attach's first second (imports) or while it loads and attaches its programs:
  one line, exit 130, and nothing left behind (programs, tracefs events, USDT semaphores);
- an output that cannot be written at the end: the report is printed, then one line;
- every file attach writes is 0600 whatever the umask;
- a bad --dsn: one warning line at the start, the reason kept in the capture;
- doctor says which other processes take the uprobe traps (same binary).

The traced clusters run private copies of the server binary (test_attach_cli's fixtures),
so that other pgtrace runs on this machine do not move the semaphores checked here.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pgtrace.capture import read_capture, write_capture
from pgtrace.cluster import TempCluster, start_cluster
from pgtrace.sampler import dsn_problem
from tests.integration.test_attach_cli import (  # noqa: F401 - fixtures
    PGTRACE,
    READY,
    Attach,
    _env,
    _server_copy,
    assert_detached,
    attaches,
    cluster,
    kernel_objects,
    pm,
    prog_exists,
    run_cli,
    semaphores,
    src_bin,
    tracefs_pgtrace_events,
    wait_for,
)
from tests.unit.test_capture import HEADER, requests_frame

pytestmark = [pytest.mark.root]

# --- 1. a user's `postgres` is never run as root -------------------------------------------

FAKE_SRC = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
/* both version strings a real server has in .rodata */
const char versionstr[] = "postgres (PostgreSQL) 15.99\n";
const char version_str[] = "PostgreSQL 15.99 on x86_64-pc-linux-gnu, compiled by gcc, 64-bit";

int main(int argc, char **argv) {
    FILE *log = fopen(EUID_LOG, "a");          /* every run: who ran me, with what */
    if (log) {
        fprintf(log, "%d", (int) geteuid());
        for (int i = 1; i < argc; i++) fprintf(log, " %s", argv[i]);
        fputc('\n', log);
        fclose(log);
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--version")) { fputs(versionstr, stdout); return 0; }
        if (!strcmp(argv[i], "-C")) {           /* ssl = off; no other setting */
            if (i + 1 < argc && !strcmp(argv[i + 1], "ssl")) { puts("off"); return 0; }
            return 1;
        }
    }
    char cwd[4096];                            /* a "postmaster": postmaster.pid, then wait */
    if (!getcwd(cwd, sizeof cwd)) return 1;
    FILE *pf = fopen("postmaster.pid.tmp", "w");
    if (!pf) return 1;
    fprintf(pf, "%d\n%s\n%ld\n5432\n/tmp\n", (int) getpid(), cwd, (long) time(NULL));
    fclose(pf);
    rename("postmaster.pid.tmp", "postmaster.pid");
    if (argc < 0) puts(version_str);
    for (;;) pause();
}
"""


@pytest.fixture
def fake_postmaster() -> Iterator[tuple[int, Path]]:
    """A `postgres` owned by nobody, running as nobody in a data directory of nobody's.

    Yields (its pid, the log where each run of it appends its euid and arguments).
    """
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="pgtrace-fake-", dir="/tmp"))
    proc = None
    pid = 0
    try:
        base.chmod(0o755)
        log = base / "euid.log"
        log.touch()
        log.chmod(0o666)
        src = base / "fake.c"
        src.write_text(FAKE_SRC)
        exe = base / "postgres"
        subprocess.run(["gcc", "-O1", f'-DEUID_LOG="{log}"', "-o", str(exe), str(src)],
                       check=True)
        data = base / "data"
        data.mkdir()
        (data / "PG_VERSION").write_text("15\n")
        for p in (exe, data, base):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        data.chmod(0o700)
        proc = subprocess.Popen(["runuser", "-u", "nobody", "--", str(exe), "-D", str(data)],
                                cwd=data, stdin=subprocess.DEVNULL)
        pidfile = data / "postmaster.pid"
        wait_for(pidfile.exists, 10, "the fake postmaster's postmaster.pid")
        pid = int(pidfile.read_text().split()[0])
        yield pid, log
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def _runs(log: Path) -> list[tuple[int, str]]:
    out = []
    for line in log.read_text().splitlines():
        euid, _, args = line.partition(" ")
        out.append((int(euid), args))
    return out


@pytest.mark.bpf
def test_a_users_postgres_is_never_run_as_root(fake_postmaster: tuple[int, Path]) -> None:
    pid, log = fake_postmaster
    nobody = pwd.getpwnam("nobody").pw_uid
    assert _runs(log) == [(nobody, f"-D {Path(log).parent / 'data'}")]  # the start itself

    probes = run_cli("probes", "--pid", str(pid))
    assert probes.returncode == 4, probes.stderr  # found, version read, no USDT notes
    doctor = run_cli("doctor", "--pid", str(pid))
    assert f"PostgreSQL 15.99, postmaster {pid}" in doctor.stdout, doctor.stdout
    assert "ok   binary         PostgreSQL 15.99 (x86_64)" in doctor.stdout
    attach = run_cli("attach", "--pid", str(pid), "--duration", "1", timeout=300)
    assert attach.returncode == 4, attach.stderr  # refused: built without probes
    assert "Traceback" not in probes.stderr + doctor.stderr + attach.stderr

    runs = _runs(log)
    assert [r for r in runs if r[0] == 0] == []
    assert all(euid == nobody for euid, _args in runs), runs
    # the settings (`postgres -C`) were read, as the data directory's owner
    assert any(args.endswith("-C ssl") for _euid, args in runs), runs


# --- 9. Ctrl-C before tracing has started ---------------------------------------------------


def _interrupted_cleanly(a: Attach, progs: set[int], postmaster: int) -> None:
    rc, out, err = a.finish(timeout=120)
    # the progress lines of attach's start (compiling..., attached after N s), then one line
    progress = re.compile(r"compiling the BPF programs\.\.\.$|attached after \d+\.\d s$")
    lines = [ln for ln in err.splitlines() if ln.strip() and not progress.match(ln)]
    assert rc == 130, err
    assert len(lines) == 1 and lines[0].startswith("pgtrace: interrupted"), err
    assert "Traceback" not in err and "Aborted" not in err
    assert out == ""
    assert_detached(progs, postmaster)  # the kernel frees the programs asynchronously


def test_ctrl_c_during_startup(pm: int, attaches: Callable[..., Attach]) -> None:
    """While Python still imports: nothing is loaded yet."""
    a = attaches("-p", str(pm), "--duration", "60")

    def importing() -> bool:  # numpy's extension is mapped: pgtrace.attach's imports
        with open(f"/proc/{a.pid}/maps") as f:
            return "_multiarray_umath" in f.read()

    wait_for(importing, 30, "attach to import its modules")
    a.proc.send_signal(signal.SIGINT)
    _interrupted_cleanly(a, set(), pm)


@pytest.mark.bpf
@pytest.mark.parametrize("when", ["programs loaded", "first attachment"])
def test_ctrl_c_while_attaching(pm: int, attaches: Callable[..., Attach], when: str) -> None:
    """SIGINT once the programs are loaded (bcc compiled them), or once the process holds its
    first attachment (a tracepoint link or perf event, then the uprobes follow): the attach
    finishes its step, detaches all, exits 130."""
    landed = 0
    for _attempt in range(4):
        a = attaches("-p", str(pm), "--duration", "60")
        progs: set[int] = set()

        def reached(a: Attach = a) -> bool:
            nonlocal progs
            if a.proc.poll() is not None:
                raise AssertionError(f"attach exited early: {a.stderr()}")
            if when == "programs loaded":
                progs = kernel_objects(a.pid)[1]
                return bool(progs)
            return kernel_objects(a.pid)[0] > 0

        wait_for(reached, 300, when)
        progs |= kernel_objects(a.pid)[1]
        before_ready = READY not in a.stderr()
        a.proc.send_signal(signal.SIGINT)
        if not before_ready:  # the attach was faster than this poll: a normal end
            rc, out, _err = a.finish(timeout=120)
            assert rc == 0 and " requests in " in out
            continue
        landed += 1
        _interrupted_cleanly(a, progs, pm)
        break
    assert landed, f"SIGINT never arrived before the attach was ready ({when})"


# --- 2/5. outputs: private, and a failure at the end still prints the report ----------------


@pytest.mark.bpf
def test_outputs_are_private_whatever_the_umask(pm: int, tmp_path: Path) -> None:
    out = tmp_path / "run.pgtrace"
    res = subprocess.run(
        [PGTRACE, "attach", "-p", str(pm), "--duration", "1", "--stacks", "-o", str(out),
         "--summary-json", str(tmp_path / "s.json"), "--query-text"],
        capture_output=True, text=True, timeout=300, env=_env(), umask=0,
        stdin=subprocess.DEVNULL, check=False)
    assert res.returncode == 0, res.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["run.pgtrace", "run.pgtrace.offcpu.folded", "run.pgtrace.oncpu.folded",
                       "s.json"]
    for name in written:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    _df, header = read_capture(out)
    oncpu = (tmp_path / "run.pgtrace.oncpu.folded").read_text().splitlines()
    assert oncpu == header["stacks"]["oncpu"]


@pytest.mark.bpf
def test_a_write_failure_at_the_end_keeps_the_report(
    pm: int, tmp_path: Path, attaches: Callable[..., Attach]
) -> None:
    d = tmp_path / "out"
    d.mkdir()
    a = attaches("-p", str(pm), "--duration", "3", "-o", str(d / "run.pgtrace"),
                 "--summary-json", str(d / "s.json"))
    a.wait_ready(timeout=300)
    shutil.rmtree(d)  # gone before the end: nothing can be written there
    rc, out, err = a.finish(timeout=120)
    assert rc == 9, err
    assert " requests in " in out  # the report is printed first
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"pgtrace: cannot write {d}/run.pgtrace: No such file"), err
    assert f"cannot write {d}/s.json" in last and last.endswith("(the report above is complete)")
    assert "Traceback" not in err


def test_outputs_are_checked_before_loading(pm: int, tmp_path: Path) -> None:
    started = time.monotonic()
    res = run_cli("attach", "-p", str(pm), "--duration", "60", "--summary-json",
                  str(tmp_path / "nodir" / "s.json"))
    assert res.returncode == 9
    assert res.stderr.strip() == f"pgtrace: --summary-json {tmp_path}/nodir/s.json: no " \
        f"directory {tmp_path}/nodir"
    assert time.monotonic() - started < 30  # refused at once, not after a 60 s trace


# --- 7. a bad --dsn -------------------------------------------------------------------------


@pytest.mark.bpf
def test_a_bad_dsn_is_one_warning_at_the_start(cluster: TempCluster, pm: int,
                                               tmp_path: Path) -> None:
    dsn = f"host={cluster.socket_dir} port={cluster.port} user=postgres dbname=nosuchdb"
    problem = dsn_problem(dsn)
    assert problem is not None and 'database "nosuchdb" does not exist' in problem
    assert dsn_problem(cluster.dsn) is None
    out = tmp_path / "run.pgtrace"
    res = run_cli("attach", "-p", str(pm), "--duration", "1", "--dsn", dsn, "-o", str(out),
                  timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    warning = f"pgtrace: warning: no timeline (server counters): cannot use --dsn: {problem}"
    assert lines[0] == warning, res.stderr
    assert lines.count(warning) == 1
    assert lines.index(warning) < lines.index(READY)
    _df, header = read_capture(out)
    assert header["timeline_error"] == problem
    assert all("wal_fpi" not in s for s in header["timeline"])  # PSI only


# --- 3. doctor: the other processes that run the same binary --------------------------------


def test_doctor_names_other_clusters_on_the_binary(src_bin: str) -> None:
    base = _server_copy(src_bin, strip_notes=False)
    clusters: list[TempCluster] = []
    try:
        for _ in range(2):
            clusters.append(start_cluster(bin_dir=base, preload=[]))
        one, two = clusters
        res = run_cli("doctor", "--pid", str(one.postmaster_pid), "--json")
        checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
        scope = checks["probe-scope"]
        assert scope["ok"], scope
        assert f"process running {base}/postgres" in scope["detail"]
        assert f"(parents {two.postmaster_pid})" in scope["detail"], scope["detail"]
        two.stop()
        clusters.pop()
        res = run_cli("doctor", "--pid", str(one.postmaster_pid), "--json")
        checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
        assert checks["probe-scope"]["detail"].endswith(": no other process runs it now")
    finally:
        for c in clusters:
            c.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_png_export_is_private(tmp_path: Path) -> None:
    """`report --png DIR`: figures drawn in a private directory, moved out 0600; DIR 0700."""
    capture = tmp_path / "run.pgtrace"
    write_capture(capture, requests_frame(50), HEADER)
    figs = tmp_path / "figs"
    res = subprocess.run([PGTRACE, "report", str(capture), "--format", "html", "-o",
                          str(tmp_path / "r.html"), "--png", str(figs)], capture_output=True,
                         text=True, timeout=300, env=_env(), umask=0, check=False)
    assert res.returncode == 0, res.stderr
    pngs = sorted(figs.iterdir())
    assert pngs and all(p.suffix == ".png" for p in pngs), pngs  # no temporary left
    assert stat.S_IMODE(figs.stat().st_mode) == 0o700
    for p in [*pngs, tmp_path / "r.html"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
