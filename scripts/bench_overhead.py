"""Overhead of tracing: pgbench at 40 clients, untraced vs traced, side by side.

Runs rounds of untraced and traced runs (every other round in reverse order) on
one private cluster and prints the median over rounds of the throughput ratio
traced/untraced, and of the p99 latency ratio. Target: throughput ratio >= 0.97.
Needs root:  sudo .venv/bin/python scripts/bench_overhead.py [--pairs N] [--seconds S]

Workloads (--workload):
- insert (default): single-row inserts, each commit a WAL flush.
- read: the worst case for a tracer of every context switch and system call:
  pgbench -S (select-only) on a data set several times shared_buffers but in
  the page cache, so that many transactions read a block from the kernel (a
  pread each, timed as io_read) and 40 clients on few CPUs switch all the time.
  It prints the blocks read from the page cache per transaction of each run.

With --floor (the default) each round has a third run: the tracepoints pgtrace
uses (every context switch, wake-up and system call), each with a BPF program
that returns at once. That is the price any tool seeing those events pays before
doing any work, the floor under pgtrace's ratio on this machine.

It also prints the CPU time per transaction of the benchmark's own processes
(server, pgbench, pgtrace: a cgroup of their own): the traced/untraced ratio of
that is the overhead's cost in CPU. On a shared machine both figures swing with
the neighbours' load from one minute to the next; the ratios within a round
swing far less.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from pgtrace.attach import AttachOptions, trace_during
from pgtrace.cluster import TempCluster, start_cluster
from pgtrace.collect.loader import import_bcc
from pgtrace.doctor import TRACEPOINTS

SETUP_SQL = (
    "create table bench_insert (id bigint generated always as identity primary key, data int)"
)


Run = tuple[float, float, float]  # tps, p99 ms, CPU us per transaction
Runs = list[Run]

#: No checkpoint or autovacuum during the runs (a run writes tens of MB of WAL): either
#: would land in one arm at random and move its throughput by more than the overhead.
QUIET = {"checkpoint_timeout": "1h", "max_wal_size": "20GB"}


#: The read workload: shared_buffers small, the data set SCALE_RATIO times as large (it
#: stays in the page cache: the machine's memory is far larger).
READ_SHARED_BUFFERS_MB = 32
SCALE_RATIO = 8
PGBENCH_MB_PER_SCALE = 15  # pgbench_accounts and its index per unit of scale (~15 MB)


def read_scale(shared_buffers_mb: int, ratio: float = SCALE_RATIO) -> int:
    """The pgbench scale whose data set is about `ratio` times shared_buffers."""
    return max(1, math.ceil(ratio * shared_buffers_mb / PGBENCH_MB_PER_SCALE))


def per_txn(delta: float, tps: float, seconds: int) -> float:
    """A counter's growth over a run, per transaction of that run."""
    return delta / max(tps * seconds, 1)


def run_pgbench(bin_dir: str, host: str, port: int, clients: int, seconds: int,
                script: list[str], logdir: str) -> tuple[float, float]:
    """(tps, p99 latency in ms) of one pgbench run, from its per-transaction log.
    `script`: pgbench's arguments naming what to run (-f FILE, or -S)."""
    for old in glob.glob(os.path.join(logdir, "pgbench_log*")):
        os.unlink(old)
    cmd = [os.path.join(bin_dir, "pgbench"), "-n", "-h", host, "-p", str(port), "-U", "postgres",
           "-c", str(clients), "-j", "2", "-T", str(seconds), *script, "-l",
           "--log-prefix", os.path.join(logdir, "pgbench_log"), "postgres"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    tps = float(next(ln for ln in out.splitlines() if ln.startswith("tps")).split()[2])
    lat: list[int] = []
    for path in glob.glob(os.path.join(logdir, "pgbench_log*")):
        with open(path) as f:
            lat.extend(int(line.split()[2]) for line in f)
    lat.sort()
    p99 = lat[int(0.99 * (len(lat) - 1))] / 1000 if lat else 0.0
    return tps, p99


class CpuMeter:
    """CPU time of this process and its descendants, from a cgroup they alone are in."""

    def __init__(self) -> None:
        self.path = ""
        with open("/proc/mounts") as f:
            v2 = next((ln.split()[1] for ln in f if ln.split()[2] == "cgroup2"), "")
        for root, stat in ((v2, "cpu.stat"), ("/sys/fs/cgroup/cpuacct", "cpuacct.usage")):
            if not root or not os.path.isdir(root):
                continue
            path = os.path.join(root, f"pgtrace-bench-{os.getpid()}")
            try:
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            except OSError:
                continue
            self.root, self.path, self.stat = root, path, os.path.join(path, stat)
            return

    def ns(self) -> int:
        """CPU ns used so far (0 without a cgroup)."""
        if not self.path:
            return 0
        with open(self.stat) as f:
            text = f.read()
        if self.stat.endswith("cpu.stat"):
            return int(text.split("usage_usec")[1].split()[0]) * 1000
        return int(text)

    def close(self) -> None:
        """Leave the cgroup and remove it (its other members have exited)."""
        if not self.path:
            return
        with open(os.path.join(self.root, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(self.path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.1)


def measured(meter: CpuMeter, run: Callable[[], tuple[float, float]],
             seconds: int) -> Run:
    """(tps, p99 ms, CPU us per transaction) of one pgbench run."""
    before = meter.ns()
    tps, p99 = run()
    return tps, p99, per_txn((meter.ns() - before) / 1000, tps, seconds)


def floor_program() -> str:
    """A program per tracepoint pgtrace attaches to, each returning at once."""
    names = sorted({tp.split(":", 1)[1] for tp in TRACEPOINTS})
    return "\n".join(f"RAW_TRACEPOINT_PROBE({name}) {{ return 0; }}" for name in names)


def with_floor(run: Callable[[], Run]) -> Run:
    """`run()` while the floor programs are attached (compiled before, detached after)."""
    bpf = import_bcc().BPF(text=floor_program())
    try:
        return run()
    finally:
        bpf.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=40)
    ap.add_argument("--workload", choices=("insert", "read"), default="insert",
                    help="insert: single-row inserts; read: pgbench -S on a data set larger "
                    "than shared_buffers, in the page cache (the worst case)")
    ap.add_argument("--scale-ratio", type=float, default=SCALE_RATIO,
                    help="read: the data set over shared_buffers (default %(default)s)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="a third run per round: empty programs on pgtrace's tracepoints")
    args = ap.parse_args()
    meter = CpuMeter()
    try:
        return bench(args, meter)
    finally:
        meter.close()


def setup_workload(c: TempCluster, args: argparse.Namespace, tmp: str) -> list[str]:
    """Create the workload's tables; pgbench's arguments naming its script."""
    if args.workload == "read":
        scale = read_scale(READ_SHARED_BUFFERS_MB, args.scale_ratio)
        subprocess.run([os.path.join(c.bin_dir, "pgbench"), "-i", "-q", "-s", str(scale),
                        "-h", c.socket_dir, "-p", str(c.port), "-U", "postgres", "postgres"],
                       capture_output=True, text=True, check=True)
        size = int(c.psql("select pg_database_size('postgres') / 1048576"))
        print(f"read: pgbench -S, scale {scale}: {size} MB of data, shared_buffers "
              f"{READ_SHARED_BUFFERS_MB} MB", flush=True)
        return ["-S"]
    c.psql(SETUP_SQL)
    c.psql("alter table bench_insert set (autovacuum_enabled = off)")
    script = os.path.join(tmp, "insert.sql")
    with open(script, "w") as f:
        f.write("insert into bench_insert(data) values (1);\n")
    return ["-f", script]


BLOCKS_READ = "select blks_read from pg_stat_database where datname = 'postgres'"


def bench(args: argparse.Namespace, meter: CpuMeter) -> int:
    """The pairs, then the ratios."""
    settings = dict(QUIET)
    if args.workload == "read":
        settings["shared_buffers"] = f"{READ_SHARED_BUFFERS_MB}MB"
    with start_cluster(settings=settings, preload=[]) as c, \
            tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        script = setup_workload(c, args, tmp)
        bench = (c.bin_dir, c.socket_dir, c.port, args.clients, args.seconds, script, tmp)
        # warm-up: for the read workload, this also brings the data set into the page cache
        run_pgbench(*bench[:4], 3 if args.workload == "insert" else 10, script, tmp)
        plain: Runs = []
        traced: Runs = []
        floor: Runs = []
        reads: dict[int, float] = {}  # blocks read per transaction, by id of the arm's runs

        def one() -> Run:
            blocks = int(c.psql(BLOCKS_READ))
            out = measured(meter, lambda: run_pgbench(*bench), args.seconds)
            reads[-1] = per_txn(int(c.psql(BLOCKS_READ)) - blocks, out[0], args.seconds)
            return out

        requests: list[str] = []

        def run_traced() -> Run:
            opts = AttachOptions(pids=[c.postmaster_pid], duration=args.seconds + 30)
            res, out = trace_during(opts, lambda _s: one())
            requests.append(f"{res.summary['requests']} requests, lost {res.summary['lost']}")
            return out

        arms: list[tuple[Runs, Callable[[], Run]]] = [
            (plain, one), (traced, run_traced)]
        if args.floor:
            arms.append((floor, lambda: with_floor(one)))
        for i in range(args.pairs):
            # every other round backwards: a drift of the machine's speed favours no arm
            for runs, run in arms if i % 2 == 0 else arms[::-1]:
                runs.append(run())
                reads[id(runs)] = reads.pop(-1)
            line = (f"round {i + 1}: untraced {plain[-1][0]:8.0f} tps p99 {plain[-1][1]:6.2f} ms"
                    f" cpu {plain[-1][2]:5.1f} us | traced {traced[-1][0]:8.0f} tps p99 "
                    f"{traced[-1][1]:6.2f} ms cpu {traced[-1][2]:5.1f} us ({requests[-1]})")
            if args.floor:
                line += f" | floor {floor[-1][0]:8.0f} tps cpu {floor[-1][2]:5.1f} us"
            if args.workload == "read":
                line += (" | blocks read per transaction "
                         + " ".join(f"{reads[id(runs)]:.2f}" for runs, _ in arms))
            print(line, flush=True)
        report(plain, traced, floor, bool(meter.path))
    return 0


def report(plain: Runs, traced: Runs, floor: Runs, with_cpu: bool) -> None:
    """Medians of the ratios to the untraced run of the same round.

    A round's runs follow each other within a minute, so the ratio of each
    round cancels most of the drift of a shared machine's speed, which swings
    by more than the overhead measured here between minutes.
    """
    def ratio(runs: Runs, k: int) -> float:
        return statistics.median(t[k] / p[k] for t, p in zip(runs, plain, strict=True))

    def cpu(runs: Runs) -> float:
        return statistics.median(t[2] for t in runs)

    print(f"throughput ratio traced/untraced (median of {len(traced)} rounds): "
          f"{ratio(traced, 0):.3f}  (target >= 0.97)")
    print(f"p99 latency ratio traced/untraced (median): {ratio(traced, 1):.3f}")
    if with_cpu:
        print(f"CPU per transaction traced/untraced (median): {ratio(traced, 2):.3f} "
              f"({cpu(plain):.1f} -> {cpu(traced):.1f} us)")
    if floor:
        print(f"floor (empty programs on the same tracepoints): throughput ratio "
              f"{ratio(floor, 0):.3f}" + (f", CPU per transaction {ratio(floor, 2):.3f} "
                                          f"({cpu(floor):.1f} us)" if with_cpu else ""))


if __name__ == "__main__":
    sys.exit(main())
