"""Workloads and independent measurements for the engine accuracy tests.

`traced()` runs a workload while `run_attach` traces the cluster: the trace runs in the
test's main thread (its signal handlers need it), the workload in a helper thread that
starts only once the probes are attached (`on_ready`); the trace ends when the workload
does (`stop_when`). Everything else here is an independent source to compare the trace
with: pgbench's own counts and latency log, /proc/<pid>/schedstat, libpq's protocol trace;
and CPU hogs, to make the run queue long.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import psycopg
from psycopg import pq

from pgtrace.attach import AttachOptions, AttachResult, run_attach
from pgtrace.collect.session import TraceSession

T = TypeVar("T")

PGBENCH_DEFAULT = "/usr/lib/postgresql/15/bin/pgbench"

Conn = psycopg.Connection[tuple[Any, ...]]


class ClusterLike(Protocol):
    bin_dir: str
    socket_dir: str
    port: int
    postmaster_pid: int

    @property
    def dsn(self) -> str: ...


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `cond()` until it is true; fail with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


# --- tracing a workload ---------------------------------------------------------------------


@dataclass
class Traced(Generic[T]):
    """The trace of one workload run, and what the workload returned."""

    run: AttachResult
    value: T


def traced(
    postmaster_pid: int,
    work: Callable[[TraceSession], T],
    *,
    limit: float = 120.0,
    settle: float = 0.3,
    query_text: bool = False,
) -> Traced[T]:
    """Trace the cluster while `work(session)` runs; stop `settle` seconds after it returns.

    `work` starts once the probes are attached (on_ready) and may read the session's
    kernel counters. `limit` is only the safety net (the attach's duration): the trace
    normally ends when the workload does (run_attach's stop_when). The workload's
    exception, if any, is re-raised here, after the probes are detached.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("run_attach installs signal handlers: call traced() from the main "
                           "thread")
    ready = threading.Event()
    cancel = threading.Event()
    done = threading.Event()
    box: dict[str, Any] = {}

    def on_ready(session: TraceSession) -> None:
        box["session"] = session
        ready.set()

    def runner() -> None:
        try:
            while not ready.wait(0.05):
                if cancel.is_set():
                    return
            box["value"] = work(box["session"])
            time.sleep(settle)  # the last records reach the ring buffer and get read
        except BaseException as exc:  # re-raised in the main thread
            box["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=runner, name="workload", daemon=True)
    thread.start()
    try:
        result = run_attach(
            AttachOptions(pids=[postmaster_pid], duration=limit, query_text=query_text),
            on_ready=on_ready,
            stop_when=done.is_set,
        )
    finally:
        cancel.set()
        thread.join(limit)
    if "error" in box:
        raise box["error"]
    if thread.is_alive() or "value" not in box:
        raise AssertionError(f"the workload did not finish within the {limit}s trace")
    return Traced(result, box["value"])


# --- pgbench --------------------------------------------------------------------------------


@dataclass
class Pgbench:
    processed: int
    failed: int
    output: str
    log_lines: list[str] = field(default_factory=list)


def pgbench_path(cluster: ClusterLike) -> str:
    own = os.path.join(cluster.bin_dir or "", "pgbench")
    return own if cluster.bin_dir and os.access(own, os.X_OK) else PGBENCH_DEFAULT


def pgbench_cmd(cluster: ClusterLike, path: str, *, clients: int, mode: str = "simple",
                extra: list[str] | None = None) -> list[str]:
    """pgbench running the script at `path` against `cluster` (no vacuum, -j up to 2)."""
    return [
        pgbench_path(cluster), "-n", "-h", cluster.socket_dir, "-p", str(cluster.port),
        "-U", "postgres", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2)),
        "-f", path, *(extra or []), "postgres",
    ]


PGBENCH_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def pgbench_result(returncode: int, out: str, lines: list[str] | None = None) -> Pgbench:
    """pgbench's own count of processed (and failed) transactions, from its output."""
    if returncode != 0:
        raise AssertionError(f"pgbench failed ({returncode}): {out}")
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    if m is None:
        raise AssertionError(f"no transaction count in pgbench's output: {out}")
    fm = re.search(r"number of failed transactions: (\d+)", out)
    return Pgbench(int(m.group(1)), int(fm.group(1)) if fm else 0, out, lines or [])


def pgbench(
    cluster: ClusterLike,
    script: str,
    *,
    clients: int,
    seconds: int | None = None,
    transactions: int | None = None,
    mode: str = "simple",
    log: bool = False,
) -> Pgbench:
    """Run pgbench with a custom script; its own count of processed transactions."""
    with tempfile.TemporaryDirectory(prefix="pgtrace-bench-") as tmp:
        path = os.path.join(tmp, "script.sql")
        with open(path, "w", encoding="utf-8") as f:
            f.write(script.strip() + "\n")
        extra: list[str] = []
        if seconds is not None:
            extra += ["-T", str(seconds)]
        if transactions is not None:
            extra += ["-t", str(transactions)]
        if log:
            extra += ["-l", "--log-prefix", os.path.join(tmp, "log")]
        cmd = pgbench_cmd(cluster, path, clients=clients, mode=mode, extra=extra)
        res = subprocess.run(cmd, capture_output=True, text=True, env=PGBENCH_ENV,
                             check=False, timeout=120)
        out = res.stdout + res.stderr
        lines: list[str] = []
        if log and res.returncode == 0:
            for name in sorted(os.listdir(tmp)):
                if name.startswith("log"):
                    with open(os.path.join(tmp, name), encoding="utf-8") as f:
                        lines += f.read().splitlines()
    return pgbench_result(res.returncode, out, lines)


class PausedPgbench:
    """pgbench in the background, that can be stopped (SIGSTOP) at a quiet point: once
    every one of its backends has answered its last request and sleeps reading its socket,
    nothing any of them does is in flight, and /proc/<pid>/schedstat of each is still.

    `quiet()` stops pgbench and waits for that; `resume()` lets it go on."""

    def __init__(self, conn: Conn, cluster: ClusterLike, script: str, *, clients: int,
                 seconds: int) -> None:
        self._conn = conn
        self._tmp = tempfile.TemporaryDirectory(prefix="pgtrace-bench-")
        path = os.path.join(self._tmp.name, "script.sql")
        with open(path, "w", encoding="utf-8") as f:
            f.write(script.strip() + "\n")
        self._out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in finish)
        self.proc = subprocess.Popen(
            pgbench_cmd(cluster, path, clients=clients, extra=["-T", str(seconds)]),
            stdout=self._out, stderr=subprocess.STDOUT, env=PGBENCH_ENV)
        self.clients = clients
        self.pids: list[int] = []

    def connected(self, timeout: float = 30.0) -> list[int]:
        """Wait until all its clients are connected; their backends' pids."""
        q = ("select pid from pg_stat_activity where application_name = 'pgbench'"
             " and backend_type = 'client backend' order by pid")

        def all_there() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"pgbench ended early: {self.finish().output}")
            self.pids = [int(r[0]) for r in self._conn.execute(q).fetchall()]
            return len(self.pids) == self.clients

        wait_for(all_there, timeout, f"{self.clients} pgbench connections")
        return self.pids

    def quiet(self, timeout: float = 10.0) -> None:
        """Stop pgbench; wait until each backend is idle and asleep."""
        self.proc.send_signal(signal.SIGSTOP)
        q = ("select count(*) from pg_stat_activity where pid = any(%s)"
             " and state = 'idle'")

        def idle() -> bool:
            row = self._conn.execute(q, (self.pids,)).fetchone()
            return (row is not None and int(row[0]) == len(self.pids)
                    and all(proc_state(p) == "S" for p in self.pids))

        wait_for(idle, timeout, "the pgbench backends to go idle")

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def finish(self, timeout: float = 120.0) -> Pgbench:
        """Let it run to its end (continued first); its own counts."""
        self.proc.send_signal(signal.SIGCONT)
        rc = self.proc.wait(timeout)
        self._out.seek(0)
        out = self._out.read()
        self._out.close()
        self._tmp.cleanup()
        return pgbench_result(rc, out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


# --- /proc ------------------------------------------------------------------------------------


def schedstat(pid: int) -> tuple[int, int]:
    """(on-CPU ns, run-queue wait ns) of a task, from /proc/<pid>/schedstat."""
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
        run, wait, _slices = f.read().split()
    return int(run), int(wait)


class SchedstatMonitor:
    """/proc/<pid>/schedstat of every child of some processes (a postmaster, this test
    process: a driver it starts), read every `period` seconds
    from a thread while the `with` block runs: per pid, the first and the last reading
    (CLOCK_MONOTONIC ns, on-CPU ns, run-queue ns), and every reading between. Backends
    that come and go inside the block are caught while they live; what a backend does
    before its first reading or after its last is outside its window."""

    MAX_READ_NS = 100_000

    def __init__(self, parents: list[int], period: float = 0.02) -> None:
        self._parents = parents
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="schedstat", daemon=True)
        self.readings: dict[int, list[tuple[int, int, int]]] = {}

    def _children(self) -> list[int]:
        out: list[int] = []
        for parent in self._parents:
            for task in os.listdir(f"/proc/{parent}/task"):
                try:
                    with open(f"/proc/{parent}/task/{task}/children", encoding="ascii") as f:
                        out += [int(p) for p in f.read().split()]
                except OSError:
                    continue  # a thread that ended
        return out

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            for pid in self._children():
                before = time.monotonic_ns()
                try:
                    run, wait = schedstat(pid)
                except (OSError, ValueError):
                    continue  # gone
                after = time.monotonic_ns()
                # a reading this thread was held up in (the GIL, a CPU) has no exact time
                if after - before <= self.MAX_READ_NS:
                    self.readings.setdefault(pid, []).append(((before + after) // 2, run, wait))

    def __enter__(self) -> SchedstatMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def window(self, pid: int, after: int = 0) -> tuple[int, int, int, int]:
        """(t0, t1, on-CPU ns, run-queue ns) of `pid` from its first reading at or after
        `after` (CLOCK_MONOTONIC ns) to its last."""
        got = self.readings[pid]
        t0, r0, w0 = next((r for r in got if r[0] >= after), got[-1])
        t1, r1, w1 = got[-1]
        return t0, t1, r1 - r0, w1 - w0


def proc_state(pid: int) -> str:
    """The one-letter state of a task (R, S, D, ...)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_idle(pid: int, timeout: float = 10.0) -> None:
    """Wait until a backend sleeps (blocked reading its socket after ReadyForQuery)."""
    wait_for(lambda: proc_state(pid) == "S", timeout, f"backend {pid} to go idle")


@contextlib.contextmanager
def cpu_hogs(cpus: list[int]) -> Iterator[list[int]]:
    """One busy-looping process pinned to each CPU in `cpus`; killed (by pid) on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cpu in cpus:
            p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            procs.append(p)
            os.sched_setaffinity(p.pid, {cpu})
        wait_for(lambda: all(proc_state(p.pid) == "R" for p in procs), 10, "the CPU hogs")
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(10)


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache (root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3\n")


# --- libpq protocol trace -----------------------------------------------------------------------


class ProtocolTrace:
    """libpq's own record of the messages a connection sent (PQtrace)."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self._file = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 (closed in __exit__)
        self._text = ""

    def __enter__(self) -> ProtocolTrace:
        pgconn = self._conn.pgconn
        # libpq fdopen()s the fd and never closes its FILE: give it a duplicate.
        pgconn.trace(os.dup(self._file.fileno()))
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.pgconn.untrace()  # flushes the FILE
        self._file.seek(0)
        self._text = self._file.read().decode("utf-8", "replace")
        self._file.close()

    def sent(self, message: str) -> int:
        """How many frontend messages of this type (Query, Parse, Sync, ...) were sent."""
        n = 0
        for line in self._text.splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[0] == "F" and parts[2].split(" ")[0] == message:
                n += 1
        return n

    @property
    def text(self) -> str:
        return self._text
