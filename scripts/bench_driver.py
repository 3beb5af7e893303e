"""Driver speed: `pgtrace load` against pgbench, same table and statement, untraced.

Both run the insert-bigint workload's single-row insert, as a prepared statement,
into the table `pgtrace load` creates (pgtrace_insert: bigint identity key, cache 1,
NULL payload), on one private cluster, alternating (the order flips every pair so that
the table's growth and any drift hit both alike), at 1 and 40 clients. Prints the tps
of every run and, per client count, the median ratio driver/pgbench over the pairs.
Target (issue 4): >= 0.9 at both.

    sudo .venv/bin/python scripts/bench_driver.py [--pairs 3] [--seconds 10] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from pgtrace.cluster import TempCluster, start_cluster
from pgtrace.driver.workloads import get_workload

WORKLOAD = "insert-bigint"


def pgbench_script(path: str) -> None:
    """The driver's insert with its NULL payload, as a pgbench script."""
    w = get_workload(WORKLOAD)
    assert w.insert_columns == ("payload",) and w.params() == (None,), "workload changed"
    sql = w.insert_sql.replace("%s", "NULL")
    with open(path, "w", encoding="utf-8") as f:
        f.write(sql + ";\n")


def run_pgbench(c: TempCluster, script: str, clients: int, seconds: int) -> float:
    jobs = min(clients, os.cpu_count() or 1)
    cmd = [os.path.join(c.bin_dir, "pgbench"), "-n", "-M", "prepared", "-h", c.socket_dir,
           "-p", str(c.port), "-U", "postgres", "-c", str(clients), "-j", str(jobs),
           "-T", str(seconds), "-f", script, "postgres"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                         timeout=seconds + 60)
    if res.returncode != 0:
        raise SystemExit(f"pgbench failed ({res.returncode}): {res.stdout}{res.stderr}")
    m = re.search(r"^tps = ([\d.]+)", res.stdout, re.MULTILINE)
    if m is None:
        raise SystemExit(f"no tps in pgbench's output: {res.stdout}")
    return float(m.group(1))


def run_driver(c: TempCluster, tmp: str, clients: int, seconds: int, workers: int) -> float:
    out = os.path.join(tmp, "load.json")
    cmd = [sys.executable, "-m", "pgtrace", "load", "--dsn", c.dsn, "--workload", WORKLOAD,
           "--runners", str(clients), "--duration", str(seconds), "--summary-json", out, "-q"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if res.returncode != 0:
        raise SystemExit(f"pgtrace load failed ({res.returncode}): {res.stdout}{res.stderr}")
    with open(out, encoding="utf-8") as f:
        summary = json.load(f)
    if summary["errors"]:
        raise SystemExit(f"pgtrace load: {summary['errors']} errors")
    return float(summary["tps"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="pairs per client count (>= 2)")
    ap.add_argument("--seconds", type=int, default=10, help="length of each run")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 40])
    ap.add_argument("--workers", type=int, default=1, help="pgtrace load --workers")
    args = ap.parse_args()
    if args.pairs < 2:
        ap.error("--pairs must be >= 2")
    with start_cluster() as c, tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "insert.sql")
        pgbench_script(script)
        # creates the table (the driver's own DDL) and warms both up
        run_driver(c, tmp, 4, 2, 1)
        run_pgbench(c, script, 4, 2)
        print(f"{WORKLOAD}: {args.pairs} pairs of {args.seconds} s, driver workers "
              f"{args.workers}, {os.cpu_count()} CPUs")
        results: dict[int, list[tuple[float, float]]] = {}
        for clients in args.clients:
            pairs: list[tuple[float, float]] = []
            for i in range(args.pairs):
                if i % 2 == 0:
                    bench = run_pgbench(c, script, clients, args.seconds)
                    drv = run_driver(c, tmp, clients, args.seconds, args.workers)
                else:
                    drv = run_driver(c, tmp, clients, args.seconds, args.workers)
                    bench = run_pgbench(c, script, clients, args.seconds)
                pairs.append((bench, drv))
                print(f"  {clients:3d} clients, pair {i + 1}: pgbench {bench:8.0f} tps   "
                      f"pgtrace load {drv:8.0f} tps   ratio {drv / bench:.3f}", flush=True)
            results[clients] = pairs
        print("median ratio driver/pgbench (target >= 0.9):")
        for clients, pairs in results.items():
            ratio = statistics.median(d / b for b, d in pairs)
            print(f"  {clients:3d} clients: pgbench {statistics.median(b for b, _ in pairs):8.0f}"
                  f" tps, pgtrace load {statistics.median(d for _, d in pairs):8.0f} tps, "
                  f"ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
