"""Overhead of tracing: pgbench single-row inserts, untraced vs traced, side by side.

Runs alternating pairs (untraced, traced) on one private cluster and prints the
median throughput ratio traced/untraced and the p99 latency ratio. Target:
throughput ratio >= 0.97. Needs root:  sudo .venv/bin/python scripts/bench_overhead.py
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=40)
    args = ap.parse_args()
    with start_cluster() as c, tempfile.TemporaryDirectory() as tmp:
        c.psql(SETUP_SQL)
        script = os.path.join(tmp, "insert.sql")
        with open(script, "w") as f:
            f.write("insert into bench_insert(data) values (1);\n")
        os.chmod(tmp, 0o755)
        bench = (c.bin_dir, c.socket_dir, c.port, args.clients, args.seconds, script, tmp)
        run_pgbench(*bench[:4], 3, script, tmp)  # warm-up
        plain: list[tuple[float, float]] = []
        traced: list[tuple[float, float]] = []
        for i in range(args.pairs):
            plain.append(run_pgbench(*bench))
            opts = AttachOptions(pids=[c.postmaster_pid], duration=args.seconds + 30)
            res, measured = trace_during(opts, lambda _s: run_pgbench(*bench))
            traced.append(measured)
            print(f"pair {i + 1}: untraced {plain[-1][0]:8.0f} tps p99 {plain[-1][1]:6.2f} ms | "
                  f"traced {traced[-1][0]:8.0f} tps p99 {traced[-1][1]:6.2f} ms "
                  f"({res.summary['requests']} requests, lost {res.summary['lost']})")
        tps_ratio = statistics.median(t[0] for t in traced) / statistics.median(p[0] for p in plain)
        p99_ratio = statistics.median(t[1] for t in traced) / statistics.median(p[1] for p in plain)
        print(f"throughput ratio traced/untraced (median): {tps_ratio:.3f}  (target >= 0.97)")
        print(f"p99 latency ratio traced/untraced (median): {p99_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
