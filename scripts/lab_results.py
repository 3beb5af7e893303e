#!/usr/bin/env python3
"""Write docs/lab-results.md from `pgtrace lab run NAME --quick` runs of every experiment.

    sudo .venv/bin/python scripts/lab_results.py [--only NAME ...] [-o docs/lab-results.md]

Each experiment runs through the real CLI (a private throwaway cluster each, real
BPF); its markdown table and hypotheses are kept as printed, with the command and how
long it took, in docs/lab-results/NAME.md (and NAME.json); the page is assembled from
every section there, so `--only NAME` refreshes one experiment and keeps the others.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PGTRACE = os.path.join(os.path.dirname(sys.executable), "pgtrace")


def experiment_names() -> list[str]:
    sys.path.insert(0, str(REPO))
    from pgtrace.lab.spec import load_experiments

    return list(load_experiments())


def machine() -> str:
    """CPUs, memory, kernel and the PostgreSQL the private clusters run."""
    from pgtrace.cluster import find_pg_bin, server_major

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} vCPUs, {mem_gb:.0f} GiB RAM, Linux {platform.release()}, "
            f"PostgreSQL {server_major(find_pg_bin())}")


def run_one(name: str, json_dir: Path) -> tuple[str, str, float, int]:
    """(command, stdout, seconds, exit code) of one quick run."""
    json_path = json_dir / f"{name}.json"
    cmd = [PGTRACE, "lab", "run", name, "--quick", "--no-progress", "--json", str(json_path)]
    shown = f"sudo .venv/bin/pgtrace lab run {name} --quick --json docs/lab-results/{name}.json"
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    took = time.monotonic() - t0
    out = res.stdout
    if res.returncode != 0:
        out += "\n```\n" + res.stderr[-2000:] + "\n```\n"
    return shown, out, took, res.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="Run only this experiment (repeatable).")
    ap.add_argument("-o", "--output", default=str(REPO / "docs" / "lab-results.md"))
    ap.add_argument("--no-run", action="store_true",
                    help="Only assemble the page from the sections already written.")
    args = ap.parse_args()
    names = [] if args.no_run else args.only or experiment_names()
    output = Path(args.output)
    json_dir = output.parent / "lab-results"
    json_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Lab results (`--quick`)\n\n",
        "Made by `sudo .venv/bin/python scripts/lab_results.py` "
        "on this project's development machine "
        f"({machine()}), shared with other work while it ran: absolute figures move from "
        "run to run, the hypotheses compare ratios. Each experiment ran on a private "
        "throwaway cluster; the JSON documents are in `docs/lab-results/`.\n",
    ]
    failed = 0
    for name in names:
        print(f"lab_results: {name} ...", file=sys.stderr, flush=True)
        shown, out, took, code = run_one(name, json_dir)
        failed += code != 0
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        (json_dir / f"{name}.md").write_text(
            f"`{shown}` ({stamp}, {took:.0f} s, exit {code})\n\n{out}")
    for name in experiment_names():
        section = json_dir / f"{name}.md"
        if section.exists():
            parts.append("\n---\n\n" + section.read_text())
    output.write_text("".join(parts))
    print(f"lab_results: wrote {output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
