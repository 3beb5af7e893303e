"""The README's main job: profile single-row inserts on a private throwaway cluster.

Starts a cluster of its own (removed at the end), checks the machine with
`pgtrace doctor`, then traces pgbench single-row inserts at 1 and 40 clients
and prints where the server time went. Run it through `sudo bash scripts/main.sh`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from pgtrace.attach import AttachOptions, trace_during
from pgtrace.cluster import start_cluster
from pgtrace.doctor import render_checks, run_checks
from pgtrace.report.text import render_text

SETUP_SQL = (
    "create table demo_insert (id bigint generated always as identity primary key, data int)"
)
INSERT_SQL = "insert into demo_insert(data) values (1);\n"


def pgbench(bin_dir: str, cluster_dsn: dict[str, str], clients: int, seconds: int,
            script: str) -> str:
    """Run pgbench; return its tps line."""
    cmd = [
        os.path.join(bin_dir, "pgbench"), "-n",
        "-h", cluster_dsn["host"], "-p", cluster_dsn["port"],
        "-U", "postgres", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
        "-f", script, "postgres",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return next((ln for ln in out.splitlines() if ln.startswith("tps")), out.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=10, help="pgbench time per run")
    ap.add_argument("--clients", default="1,40", help="comma-separated client counts")
    args = ap.parse_args()
    with start_cluster() as cluster:
        print(f"== private cluster: {cluster.data_dir} (port {cluster.port})")
        checks = run_checks(pid=cluster.postmaster_pid)
        render_checks(checks, sys.stdout, as_json=False)
        if not all(c.ok for c in checks):
            return 1
        cluster.psql(SETUP_SQL)
        script = os.path.join(cluster.base_dir, "insert.sql")
        with open(script, "w") as f:
            f.write(INSERT_SQL)
        os.chmod(script, 0o644)
        dsn = {"host": cluster.socket_dir, "port": str(cluster.port)}
        for clients in (int(c) for c in args.clients.split(",")):
            print(f"\n== pgbench single-row insert, {clients} clients, {args.seconds} s")
            opts = AttachOptions(pids=[cluster.postmaster_pid], duration=args.seconds + 30)
            result, tps = trace_during(
                opts, lambda _s: pgbench(cluster.bin_dir, dsn, clients, args.seconds, script)
            )
            print(f"pgbench: {tps}")
            render_text(result.frame, result.summary, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
