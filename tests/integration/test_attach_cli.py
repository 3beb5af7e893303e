"""`pgtrace attach` as a user runs it: the real CLI in a subprocess against a real cluster.

The traced cluster runs a private copy of the server binary (see the `cluster` fixture), so
other pgtrace runs on this machine neither disturb these checks nor get disturbed by them.

Bad input gives one `pgtrace:` line and a non-zero exit with nothing left attached; a run
ends cleanly on SIGINT, SIGTERM or --duration (report printed, probes gone, the USDT
semaphores in the backends back to 0); a SIGKILLed run leaves nothing behind either.

"Nothing attached" is checked three ways: the BPF programs the run held no longer exist
(looked up by id with the bpf syscall), tracefs has no pgtrace uprobe, and the USDT
semaphores read from a live backend's memory are 0 (the kernel raises them while a uprobe
with ref_ctr_offset is attached, in every process mapping the binary).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgtrace.capture import read_capture
from pgtrace.cluster import TempCluster, find_pg_bin, start_cluster
from pgtrace.collect.loader import USDT_PROBES
from pgtrace.elf.usdt import read_probes
from pgtrace.preflight import check_headers

pytestmark = [pytest.mark.root, pytest.mark.bpf]

PGTRACE = str(Path(sys.executable).parent / "pgtrace")  # the venv's console script
PGBENCH_DEFAULT = "/usr/lib/postgresql/15/bin/pgbench"
READY = "Tracing... hit Ctrl-C to end."
SUMMARY_KEYS = {
    "requests", "lost", "unmatched", "duration_s", "server_ns", "buckets_ns", "lwlock_ns",
    "lock_ns", "per_backend", "incomplete",
}
BUCKETS = [
    "cpu", "runqueue", "fsync", "wal_write", "lwlock", "lock", "io_read", "io_write",
    "other_wait", "unexplained",
]
# pgbench -S: one request per transaction (+1 for its scale query)
CLIENTS, TXNS = 2, 200
PGBENCH_REQUESTS = CLIENTS * TXNS

Conn = psycopg.Connection[tuple[Any, ...]]


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `cond()` until it is true; fail naming `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGTRACE_"))}
    env["LC_ALL"] = "C.UTF-8"
    env.update(extra)
    return env


# --- what the kernel holds ------------------------------------------------------------------

_libc = ct.CDLL(None, use_errno=True)
_SYS_BPF = 321  # x86_64
_BPF_PROG_GET_FD_BY_ID = 13


def prog_exists(prog_id: int) -> bool:
    """Whether a BPF program with this id is still loaded (anyone holds it)."""
    attr = (ct.c_uint32 * 4)(prog_id, 0, 0, 0)
    fd = _libc.syscall(_SYS_BPF, _BPF_PROG_GET_FD_BY_ID, ct.byref(attr), ct.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True
    err = ct.get_errno()
    assert err == errno.ENOENT, os.strerror(err)
    return False


def kernel_objects(pid: int) -> tuple[int, set[int]]:
    """(attachments: perf event and BPF link fds, BPF program ids) held by a process."""
    perf, progs = 0, set()
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link in ("anon_inode:[perf_event]", "anon_inode:bpf_link"):
                    perf += 1
                elif link == "anon_inode:bpf-prog":
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        m = re.search(r"^prog_id:\s*(\d+)", f.read(), re.M)
                    if m:
                        progs.add(int(m.group(1)))
            except OSError:
                continue  # closed meanwhile
    return perf, progs


def tracefs_pgtrace_events() -> list[str]:
    """uprobe/kprobe events pgtrace might have created through tracefs (expected: none)."""
    out = []
    for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        for name in ("uprobe_events", "kprobe_events"):
            with contextlib.suppress(OSError):
                out += [ln for ln in Path(root, name).read_text().splitlines() if "pgtrace" in ln]
    return out


def semaphores(pid: int, notes: str | None = None) -> dict[str, int]:
    """The USDT semaphores pgtrace attaches to, read from the memory of process `pid`.

    Their file offsets come from the notes of `notes` (default: the process's binary).
    """
    binary = os.path.realpath(f"/proc/{pid}/exe")
    maps = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == binary:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi, int(parts[2], 16)))
    addrs: dict[str, int] = {}
    for site in read_probes(notes or binary):
        if site.name not in USDT_PROBES or not site.semaphore:
            continue
        off = site.semaphore_offset
        for lo, hi, pgoff in maps:
            if pgoff <= off < pgoff + (hi - lo):
                addrs[site.name] = lo + off - pgoff
                break
        else:
            raise AssertionError(f"semaphore of {site.name} is not mapped in pid {pid}")
    assert set(addrs) == set(USDT_PROBES)
    out = {}
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for name, addr in addrs.items():
            mem.seek(addr)
            out[name] = struct.unpack("<H", mem.read(2))[0]
    return out


# --- the pgtrace process --------------------------------------------------------------------


class Attach:
    """`pgtrace attach ...` running in the background, its output in files."""

    def __init__(self, args: list[str], tmp: Path, env: dict[str, str] | None = None) -> None:
        n = len(list(tmp.glob("attach-*.out")))
        self.out_path = tmp / f"attach-{n}.out"
        self.err_path = tmp / f"attach-{n}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [PGTRACE, "attach", *args], stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, cwd=tmp, env=env or _env(),
            )
        self.progs: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until it says it is tracing; then it holds its probes and programs."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"pgtrace exited early ({self.proc.returncode}): {self.stderr()}"
                )
            return READY in self.stderr()

        wait_for(ready, timeout, "pgtrace to print that it is tracing")
        perf, self.progs = kernel_objects(self.pid)
        assert perf > len(USDT_PROBES)  # uprobes, USDT sites and tracepoints
        assert self.progs

    def finish(self, sig: int | None = None, timeout: float = 60.0) -> tuple[int, str, str]:
        """Send `sig` (or just wait); (exit code, stdout, stderr)."""
        if sig is not None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        return rc, self.stdout(), self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def attaches(tmp_path: Path) -> Iterator[Callable[..., Attach]]:
    """Start attaches; any still running at the end is killed (and so detached)."""
    started: list[Attach] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Attach:
        a = Attach(list(args), tmp_path, env)
        started.append(a)
        return a

    try:
        yield start
    finally:
        for a in started:
            a.kill()


def run_cli(*args: str, user: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 90.0, cwd: str | Path = "/") -> subprocess.CompletedProcess[str]:
    cmd = [PGTRACE, *args]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or _env(), stdin=subprocess.DEVNULL, cwd=cwd, check=False)


def assert_progress(stderr: str, banner: bool = True) -> None:
    """stderr of a run that went well: its life in order, nothing else."""
    lines = stderr.splitlines()
    expected = [r"compiling the BPF programs\.\.\.", r"attached after \d+\.\d s",
                *([re.escape(READY)] if banner else []),
                r"traced \d+\.\d s; after it, converting the records took \d+\.\d\d s and "
                r"the whole report \d+\.\d\d s"]
    assert len(lines) == len(expected), stderr
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), stderr


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pgtrace: "), stderr
    return lines[0]


def requests_of(report: str) -> int:
    m = re.match(r"(\d+) requests in ", report)
    assert m, report
    return int(m.group(1))


#: Probes a default attach leaves alone on this server: LWLock waits come from wait events.
UNUSED_PROBES = {"lwlock__wait__start", "lwlock__wait__done"}


def assert_attached(sems: dict[str, int]) -> None:
    """Every probe pgtrace uses has its semaphore raised; the LWLock ones stay 0."""
    assert all(v > 0 for k, v in sems.items() if k not in UNUSED_PROBES), sems
    assert all(sems[k] == 0 for k in UNUSED_PROBES), sems


def assert_detached(progs: set[int], backend: int) -> None:
    """The programs are gone, tracefs is clean, the backend's semaphores are 0 again."""
    wait_for(lambda: not any(prog_exists(p) for p in progs), 10, "BPF programs to be freed")
    assert tracefs_pgtrace_events() == []
    assert semaphores(backend) == dict.fromkeys(USDT_PROBES, 0)


# --- fixtures -------------------------------------------------------------------------------


def _server_copy(src_bin: str, strip_notes: bool) -> str:
    """A bin dir with initdb, pg_ctl and a copy of postgres (its notes removed if asked).

    initdb and pg_ctl run the postgres beside them; share/ and lib/ stay the compiled-in
    ones. A copy is a file of its own, so uprobes on it are ours alone.
    """
    base = tempfile.mkdtemp(prefix="pgtrace-bin-", dir="/tmp")
    os.chmod(base, 0o755)  # the postgres user runs these
    for tool in ("initdb", "pg_ctl"):
        shutil.copy2(os.path.join(src_bin, tool), os.path.join(base, tool))
    src, dst = os.path.join(src_bin, "postgres"), os.path.join(base, "postgres")
    if strip_notes:
        subprocess.run(["objcopy", "--remove-section=.note.stapsdt", src, dst],
                       check=True, capture_output=True)
    else:
        shutil.copy2(src, dst)
    return base


@contextlib.contextmanager
def cluster_on_copy(src_bin: str, strip_notes: bool = False) -> Iterator[TempCluster]:
    base = _server_copy(src_bin, strip_notes)
    cluster = None
    try:
        cluster = start_cluster(bin_dir=base, preload=[])
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def src_bin(pg_bin: str | None) -> str:
    return os.path.realpath(find_pg_bin(pg_bin=pg_bin))


@pytest.fixture(scope="module")
def cluster(src_bin: str) -> Iterator[TempCluster]:
    """The traced cluster: the server binary, but a private copy of it.

    uprobes are per file, and the kernel raises a USDT semaphore in every process that maps
    the file. On the shared binary, any other pgtrace running on this machine (another
    test session, another cluster) would show in the semaphores checked here, and our
    probes would fire in its servers; on a copy, both stay apart.
    """
    with cluster_on_copy(src_bin) as c:
        yield c


@pytest.fixture(scope="module")
def pm(cluster: TempCluster) -> int:
    return cluster.postmaster_pid


def _conn_args(c: TempCluster) -> list[str]:
    return ["-h", c.socket_dir, "-p", str(c.port), "-U", "postgres", "postgres"]


@pytest.fixture(scope="module")
def pgbench(cluster: TempCluster, src_bin: str) -> Callable[..., None]:
    """pgbench_* tables made once; the callable runs a select-only pgbench to its end."""
    exe = os.path.join(src_bin, "pgbench")
    if not os.access(exe, os.X_OK):
        exe = PGBENCH_DEFAULT
    res = subprocess.run([exe, "-i", "-s", "1", "-q", *_conn_args(cluster)],
                         capture_output=True, text=True, env=_env(), timeout=120, check=False)
    assert res.returncode == 0, res.stderr

    def run(clients: int = CLIENTS, txns: int = TXNS) -> None:
        res = subprocess.run(
            [exe, "-n", "-S", "-c", str(clients), "-t", str(txns), *_conn_args(cluster)],
            capture_output=True, text=True, env=_env(), timeout=120, check=False,
        )
        assert res.returncode == 0, res.stderr
        assert f"number of transactions actually processed: {clients * txns}/" in res.stdout

    return run


@pytest.fixture
def conn(cluster: TempCluster) -> Iterator[Conn]:
    c = psycopg.connect(cluster.dsn, autocommit=True)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def backend(conn: Conn) -> int:
    """A client backend that exists before any attach (seeded, not followed)."""
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    pid = int(row[0])
    assert semaphores(pid) == dict.fromkeys(USDT_PROBES, 0), "a probe is already attached"
    return pid


@pytest.fixture(scope="module")
def other_cluster(src_bin: str) -> Iterator[TempCluster]:
    c = start_cluster(bin_dir=src_bin, preload=[])
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def noprobe_cluster(src_bin: str) -> Iterator[TempCluster]:
    """The server binary with its .note.stapsdt removed: what pgtrace sees of a server
    built without --enable-dtrace."""
    if not shutil.which("objcopy"):
        pytest.skip("objcopy (binutils) is needed to make a server binary without probes")
    with cluster_on_copy(src_bin, strip_notes=True) as c:
        yield c


# --- bad input: one line, non-zero, nothing attached ----------------------------------------


def _bad_attach(pid_args: list[str], backend: int, code: int | None = None,
                env: dict[str, str] | None = None) -> str:
    res = run_cli("attach", *pid_args, "--duration", "2", env=env)
    assert res.returncode != 0, res.stdout
    if code is not None:
        assert res.returncode == code, res.stderr
    line = one_line(res.stderr)
    assert res.stdout == ""
    assert tracefs_pgtrace_events() == []
    assert semaphores(backend) == dict.fromkeys(USDT_PROBES, 0)
    return line


def test_not_a_postgres_process(backend: int) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        line = _bad_attach(["-p", str(sleeper.pid)], backend, code=3)
        assert f"pid {sleeper.pid} is sleep, not a PostgreSQL server process" in line
    finally:
        sleeper.kill()
        sleeper.wait()


def test_dead_pid(backend: int) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    line = _bad_attach(["-p", str(gone.pid)], backend, code=3)
    assert f"no process {gone.pid}" in line


def test_kernel_thread(backend: int) -> None:
    line = _bad_attach(["-p", "2"], backend, code=3)
    assert "pid 2 is a kernel thread" in line


def test_backends_of_two_clusters(backend: int, other_cluster: TempCluster) -> None:
    with psycopg.connect(other_cluster.dsn, autocommit=True) as other:
        row = other.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        line = _bad_attach(["-p", str(backend), "-p", str(row[0])], backend, code=2)
    assert "one cluster" in line


def test_postmaster_with_a_backend(pm: int, backend: int) -> None:
    line = _bad_attach(["-p", str(pm), "-p", str(backend)], backend, code=2)
    assert "postmaster's pid alone" in line


def test_auxiliary_process_is_not_a_client_backend(pm: int, backend: int) -> None:
    from pgtrace.target import list_backends

    aux = [b.pid for b in list_backends(pm) if b.kind == "checkpointer"]
    assert aux
    line = _bad_attach(["-p", str(aux[0])], backend, code=3)
    assert f"pid {aux[0]} is not a client backend" in line


def test_binary_without_probes(noprobe_cluster: TempCluster, backend: int) -> None:
    line = _bad_attach(["-p", str(noprobe_cluster.postmaster_pid)], backend, code=4)
    assert "has no USDT probes" in line
    assert "--enable-dtrace" in line
    # nothing left in that cluster's backends either (the stripped binary keeps the
    # layout of the original, whose notes say where the semaphores are)
    with psycopg.connect(noprobe_cluster.dsn, autocommit=True) as c:
        row = c.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        sems = semaphores(int(row[0]), notes=os.path.realpath(f"/proc/{backend}/exe"))
    assert sems == dict.fromkeys(USDT_PROBES, 0)


def test_not_root(pm: int, backend: int) -> None:
    # the venv must be usable by nobody: every directory on the way searchable
    for p in Path(PGTRACE).parents:
        assert os.stat(p).st_mode & stat.S_IXOTH, f"{p} is not searchable by other users"
    res = run_cli("attach", "-p", str(pm), "--duration", "1", user="nobody")
    assert res.returncode == 77, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("pgtrace: tracing needs root (euid 0; this is uid "), line
    assert res.stdout == ""
    assert semaphores(backend) == dict.fromkeys(USDT_PROBES, 0)


def test_missing_kernel_headers(pm: int, backend: int, tmp_path: Path) -> None:
    line = _bad_attach(["-p", str(pm)], backend, code=5,
                       env=_env(PGTRACE_MODULES_DIR=str(tmp_path)))
    # the line doctor prints for the same check (its fix: apt's package, or setup.sh here)
    headers = check_headers(str(tmp_path))
    assert line == f"pgtrace: {headers.detail} ({headers.fix})"
    assert f"no kernel headers at {tmp_path}/{os.uname().release}/build" in line


# --- clean ends -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_detaches_cleanly(
    sig: int, pm: int, conn: Conn, backend: int, pgbench: Callable[..., None],
    attaches: Callable[..., Attach],
) -> None:
    a = attaches("-p", str(pm))
    a.wait_ready()
    assert_attached(semaphores(backend))
    pgbench()
    for _ in range(10):  # the seeded backend's requests count too
        conn.execute("select 1")
    rc, out, err = a.finish(sig)
    assert rc == 0, err
    assert_progress(err)
    assert requests_of(out) >= PGBENCH_REQUESTS + 10
    assert "Where the server time went" in out
    assert_detached(a.progs, backend)


def test_sigkill_leaves_nothing_and_a_new_attach_works(
    pm: int, backend: int, pgbench: Callable[..., None], attaches: Callable[..., Attach],
    tmp_path: Path,
) -> None:
    a = attaches("-p", str(pm))
    a.wait_ready()
    assert_attached(semaphores(backend))
    a.kill()
    assert a.proc.returncode == -signal.SIGKILL
    # the kernel closed its perf events and programs when it died
    assert_detached(a.progs, backend)

    summary_path = tmp_path / "s.json"
    b = attaches("-p", str(pm), "--duration", "4", "--summary-json", str(summary_path))
    b.wait_ready()
    pgbench()
    assert b.proc.poll() is None, "the run ended before the workload did"
    rc, out, err = b.finish()
    assert rc == 0, err
    summ = json.loads(summary_path.read_text())
    assert summ["requests"] >= PGBENCH_REQUESTS
    assert requests_of(out) == summ["requests"]
    assert_detached(b.progs, backend)


def test_duration_outputs(
    pm: int, backend: int, pgbench: Callable[..., None], attaches: Callable[..., Attach],
    tmp_path: Path,
) -> None:
    capture = tmp_path / "run.pgtrace"
    summary_path = tmp_path / "summary.json"
    old = os.umask(0o022)
    try:
        a = attaches("-p", str(pm), "--duration", "4", "-o", str(capture),
                     "--summary-json", str(summary_path))
    finally:
        os.umask(old)
    a.wait_ready()
    pgbench()
    assert a.proc.poll() is None, "the run ended before the workload did"
    rc, out, err = a.finish()
    assert rc == 0, err
    assert_progress(err)
    assert_detached(a.progs, backend)

    summ = json.loads(summary_path.read_text())
    assert set(summ) == SUMMARY_KEYS
    assert list(summ["buckets_ns"]) == BUCKETS
    assert set(summ["server_ns"]) == {"sum", "mean", "p50", "p99", "max"}
    assert summ["requests"] >= PGBENCH_REQUESTS
    assert requests_of(out) == summ["requests"]
    assert sum(summ["buckets_ns"].values()) == summ["server_ns"]["sum"]
    assert 4.0 <= summ["duration_s"] < 6.0
    assert sum(b["requests"] for b in summ["per_backend"].values()) == summ["requests"]

    assert stat.S_IMODE(capture.stat().st_mode) == 0o600
    res = run_cli("report", str(capture), "--format", "json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    offline = json.loads(res.stdout)
    assert {k: offline[k] for k in summ} == summ


def test_two_attaches_at_once(
    pm: int, backend: int, pgbench: Callable[..., None], attaches: Callable[..., Attach],
) -> None:
    a = attaches("-p", str(pm))
    b = attaches("-p", str(pm))
    a.wait_ready()
    b.wait_ready()
    pgbench()
    rc, out_a, err = a.finish(signal.SIGINT)
    assert rc == 0, err
    # one ending does not detach the other: its USDT sites are still live
    assert_attached(semaphores(backend))
    assert b.proc.poll() is None
    rc, out_b, err = b.finish(signal.SIGINT)
    assert rc == 0, err
    assert requests_of(out_a) >= PGBENCH_REQUESTS
    assert requests_of(out_b) >= PGBENCH_REQUESTS
    assert_detached(a.progs | b.progs, backend)


def test_lwlock_wait_events_agree_with_the_probes(
    cluster: TempCluster, src_bin: str, attaches: Callable[..., Attach], tmp_path: Path,
) -> None:
    """The same inserts traced twice at once: LWLock waits read from the wait event a
    backend publishes when it sleeps (the default) and timed by the lwlock__wait USDT
    probes (--lwlock-probes) name the same tranches and the same time, request by request.

    The probes' interval also holds the CPU time around the sleep (and their own traps),
    so the probe-timed total is the larger by a little; the sleeps are the same.
    """
    cluster.psql("create table if not exists lw_insert"
                 " (id bigint generated always as identity primary key, data int)")
    script = tmp_path / "insert.sql"
    script.write_text("insert into lw_insert(data) values (1);\n")
    we_path, usdt_path = tmp_path / "we.pgtrace", tmp_path / "usdt.pgtrace"
    a = attaches("-p", str(cluster.postmaster_pid), "-o", str(we_path))
    b = attaches("-p", str(cluster.postmaster_pid), "--lwlock-probes", "-o", str(usdt_path))
    a.wait_ready()
    b.wait_ready()
    exe = os.path.join(src_bin, "pgbench")
    clients, txns = 40, 250
    res = subprocess.run(
        [exe if os.access(exe, os.X_OK) else PGBENCH_DEFAULT, "-n", "-c", str(clients),
         "-j", "2", "-t", str(txns), "-f", str(script), *_conn_args(cluster)],
        capture_output=True, text=True, env=_env(), timeout=300, check=False,
    )
    assert res.returncode == 0, res.stderr
    for t in (a, b):
        rc, _out, err = t.finish(signal.SIGINT)
        assert rc == 0, err
    we, we_header = read_capture(we_path)
    usdt, usdt_header = read_capture(usdt_path)
    assert we_header["engine"]["lwlock_waits"] == "wait_event"
    assert usdt_header["engine"]["lwlock_waits"] == "usdt"

    both = we.merge(usdt, on=["pid", "seq"], suffixes=("_we", "_usdt"))
    inserts = both[both["server_ns_we"] > 0]
    assert len(inserts) >= clients * txns
    assert len(both) == len(we) == len(usdt), "the two traces saw different requests"
    # the same request in both: it started at the same recvfrom (two programs apart)
    assert (both["t_start_we"] - both["t_start_usdt"]).abs().max() < 1_000_000

    lw_we, lw_usdt = both["lwlock_we"].sum(), both["lwlock_usdt"].sum()
    walwrite = "lwlock:WALWrite"
    detail = (f"lwlock: wait events {lw_we / 1e6:.1f} ms, probes {lw_usdt / 1e6:.1f} ms; "
              f"WALWrite {we[walwrite].sum() / 1e6:.1f} vs {usdt[walwrite].sum() / 1e6:.1f} ms; "
              f"waits {int(we['n_lwlock'].sum())} vs {int(usdt['n_lwlock'].sum())}")
    print(detail)
    assert lw_usdt > 0, detail
    assert 0.9 * lw_usdt <= lw_we <= lw_usdt, detail
    assert we[walwrite].sum() >= 0.9 * usdt[walwrite].sum(), detail
    # per request too: the requests that waited long by one account did by the other
    waited = both[both["lwlock_usdt"] > 200_000]
    close = ((waited["lwlock_we"] - waited["lwlock_usdt"]).abs()
             <= 0.1 * waited["lwlock_usdt"] + 20_000)
    assert len(waited) > 0 and close.mean() >= 0.95, (
        f"{detail}; {close.mean():.3f} of {len(waited)} requests agree")


def test_interval_lines(pm: int, backend: int, attaches: Callable[..., Attach]) -> None:
    a = attaches("-p", str(pm), "1", "3")
    rc, out, err = a.finish(timeout=90)
    assert rc == 0, err
    assert_progress(err, banner=False)  # no "Tracing..." banner in interval mode
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "REQ/s", "MEAN", "P99", "TOP", "BUCKETS"]
    for line in lines[1:4]:
        assert re.match(r"\d\d:\d\d:\d\d +\d+ +\S+ \S+ +\S+ \S+", line), line
    requests_of(lines[4])  # then the report
    assert tracefs_pgtrace_events() == []
    assert semaphores(backend) == dict.fromkeys(USDT_PROBES, 0)


def test_ebpf_prints_the_program() -> None:
    res = run_cli("attach", "--ebpf", "-p", "1")
    assert res.returncode == 0, res.stderr
    assert "RAW_TRACEPOINT_PROBE(sched_switch)" in res.stdout
    first = res.stdout.splitlines()[0]
    assert first.startswith("// cflags: ")
    for flag in ("-DPOSTMASTER_PID=", "-DQUERY_LEN=128", "-DRINGBUF_PAGES=", "-DSTATE_RUNNING=",
                 "-DWAL_WRITE_IS_SYNC="):
        assert flag in first
    for name in ("pgtrace.h", "request.bpf.c", "sched.bpf.c", "waits.bpf.c"):
        assert f"// ---- {name}" in res.stdout
    assert res.stderr == ""
