"""Overhead of tracing: pgbench single-row inserts, untraced vs traced, side by side.

Runs rounds of untraced and traced runs (every other round in reverse order) on
one private cluster and prints the median over rounds of the throughput ratio
traced/untraced, and of the p99 latency ratio. Target: throughput ratio >= 0.97.
Needs root:  sudo .venv/bin/python scripts/bench_overhead.py [--pairs N] [--seconds S]

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
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from pgtrace.attach import AttachOptions, trace_during
from pgtrace.cluster import start_cluster
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


def run_pgbench(bin_dir: str, host: str, port: int, clients: int, seconds: int,
                script: str, logdir: str) -> tuple[float, float]:
    """(tps, p99 latency in ms) of one pgbench run, from its per-transaction log."""
    for old in glob.glob(os.path.join(logdir, "pgbench_log*")):
        os.unlink(old)
    cmd = [os.path.join(bin_dir, "pgbench"), "-n", "-h", host, "-p", str(port), "-U", "postgres",
           "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", script, "-l",
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
    return tps, p99, (meter.ns() - before) / 1000 / max(tps * seconds, 1)


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
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="a third run per round: empty programs on pgtrace's tracepoints")
    args = ap.parse_args()
    meter = CpuMeter()
    try:
        return bench(args, meter)
    finally:
        meter.close()


def bench(args: argparse.Namespace, meter: CpuMeter) -> int:
    """The pairs, then the ratios."""
    with start_cluster(settings=QUIET, preload=[]) as c, tempfile.TemporaryDirectory() as tmp:
        c.psql(SETUP_SQL)
        c.psql("alter table bench_insert set (autovacuum_enabled = off)")
        script = os.path.join(tmp, "insert.sql")
        with open(script, "w") as f:
            f.write("insert into bench_insert(data) values (1);\n")
        os.chmod(tmp, 0o755)
        bench = (c.bin_dir, c.socket_dir, c.port, args.clients, args.seconds, script, tmp)
        run_pgbench(*bench[:4], 3, script, tmp)  # warm-up
        plain: Runs = []
        traced: Runs = []
        floor: Runs = []

        def one() -> Run:
            return measured(meter, lambda: run_pgbench(*bench), args.seconds)

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
            line = (f"round {i + 1}: untraced {plain[-1][0]:8.0f} tps p99 {plain[-1][1]:6.2f} ms"
                    f" cpu {plain[-1][2]:5.1f} us | traced {traced[-1][0]:8.0f} tps p99 "
                    f"{traced[-1][1]:6.2f} ms cpu {traced[-1][2]:5.1f} us ({requests[-1]})")
            if args.floor:
                line += f" | floor {floor[-1][0]:8.0f} tps cpu {floor[-1][2]:5.1f} us"
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
