"""Overhead of tracing: pgbench single-row inserts, untraced vs traced, side by side.

Runs alternating pairs (untraced, traced) on one private cluster and prints the
median throughput ratio traced/untraced and the p99 latency ratio. Target:
throughput ratio >= 0.97. Needs root:  sudo .venv/bin/python scripts/bench_overhead.py

It also prints the CPU time per transaction of the benchmark's own processes
(server, pgbench, pgtrace: a cgroup of their own), which other load on a shared
machine disturbs far less than throughput: the traced/untraced ratio of that is
the overhead's cost in CPU.
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

SETUP_SQL = (
    "create table bench_insert (id bigint generated always as identity primary key, data int)"
)


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
             seconds: int) -> tuple[float, float, float]:
    """(tps, p99 ms, CPU us per transaction) of one pgbench run."""
    before = meter.ns()
    tps, p99 = run()
    return tps, p99, (meter.ns() - before) / 1000 / max(tps * seconds, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=40)
    args = ap.parse_args()
    meter = CpuMeter()
    try:
        return bench(args, meter)
    finally:
        meter.close()


def bench(args: argparse.Namespace, meter: CpuMeter) -> int:
    """The pairs, then the ratios."""
    with start_cluster() as c, tempfile.TemporaryDirectory() as tmp:
        c.psql(SETUP_SQL)
        script = os.path.join(tmp, "insert.sql")
        with open(script, "w") as f:
            f.write("insert into bench_insert(data) values (1);\n")
        os.chmod(tmp, 0o755)
        bench = (c.bin_dir, c.socket_dir, c.port, args.clients, args.seconds, script, tmp)
        run_pgbench(*bench[:4], 3, script, tmp)  # warm-up
        plain: list[tuple[float, float, float]] = []
        traced: list[tuple[float, float, float]] = []
        for i in range(args.pairs):
            plain.append(measured(meter, lambda: run_pgbench(*bench), args.seconds))
            opts = AttachOptions(pids=[c.postmaster_pid], duration=args.seconds + 30)
            res, out = trace_during(
                opts, lambda _s: measured(meter, lambda: run_pgbench(*bench), args.seconds))
            traced.append(out)
            print(f"pair {i + 1}: untraced {plain[-1][0]:8.0f} tps p99 {plain[-1][1]:6.2f} ms "
                  f"cpu {plain[-1][2]:5.1f} us | traced {traced[-1][0]:8.0f} tps p99 "
                  f"{traced[-1][1]:6.2f} ms cpu {traced[-1][2]:5.1f} us "
                  f"({res.summary['requests']} requests, lost {res.summary['lost']})")

        def ratio(k: int) -> float:
            return statistics.median(t[k] for t in traced) / statistics.median(p[k] for p in plain)

        print(f"throughput ratio traced/untraced (median): {ratio(0):.3f}  (target >= 0.97)")
        print(f"p99 latency ratio traced/untraced (median): {ratio(1):.3f}")
        if meter.path:
            print(f"CPU per transaction traced/untraced (median): {ratio(2):.3f} "
                  f"({statistics.median(p[2] for p in plain):.1f} -> "
                  f"{statistics.median(t[2] for t in traced):.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
