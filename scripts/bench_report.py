"""Report speed and memory on a big capture: 1,000,000 synthetic requests.

Writes a capture shaped like attach's (buckets summing to server time, LWLock and
lock columns, fingerprints, per-second spread), then times `pgtrace report` on it
in a child process per format and prints wall time and peak RSS.
Target: under 10 s and 2 GiB here.   .venv/bin/python scripts/bench_report.py
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

from pgtrace.capture import write_capture
from pgtrace.model import CONTEXTS, COUNTS, RUNQUEUE_PREFIX, SERVER_BUCKETS, UNEXPLAINED


def synthetic(n: int, seed: int = 1) -> pd.DataFrame:
    """n requests over a minute from 40 backends, buckets summing to server time."""
    rng = np.random.default_rng(seed)
    buckets = {b: rng.exponential(20_000, n).astype(np.int64) for b in SERVER_BUCKETS}
    server = sum(buckets.values())
    t_start = np.sort(rng.integers(0, 60_000_000_000, n)).astype(np.int64)
    cols: dict[str, object] = {
        "pid": rng.integers(1000, 1040, n), "seq": np.arange(n), "t_start": t_start,
        "t_end": t_start + server, "server_ns": server, "wakeup_ns": rng.integers(0, 9000, n),
        **buckets, UNEXPLAINED: np.zeros(n, dtype=np.int64),
        "lwlock:WALWrite": (buckets["lwlock"] * 0.9).astype(np.int64),
        "lock:relation": buckets["lock"],
        "fingerprint": rng.choice([f"{i:016x}" for i in range(20)], n),
    }
    cols["lwlock:BufferContent"] = buckets["lwlock"] - cols["lwlock:WALWrite"]  # type: ignore[operator]
    for ctx in CONTEXTS:
        cols[RUNQUEUE_PREFIX + ctx] = np.zeros(n, dtype=np.int64)
    cols[RUNQUEUE_PREFIX + "none"] = buckets["runqueue"]
    for c in COUNTS:
        cols[c] = rng.integers(0, 3, n)
    return pd.DataFrame(cols)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.pgtrace")
        t = time.monotonic()
        write_capture(path, synthetic(args.requests), {"duration_s": 60.0, "lost": 0})
        print(f"wrote {args.requests} requests ({os.path.getsize(path) / 2**20:.0f} MiB) "
              f"in {time.monotonic() - t:.1f} s")
        exe = os.path.join(os.path.dirname(sys.executable), "pgtrace")
        for fmt in ("text", "json"):
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            t = time.monotonic()
            subprocess.run([exe, "report", path, "--format", fmt], check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.monotonic() - t
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            print(f"report --format {fmt}: {wall:.1f} s, peak RSS {max(peak, before) / 2**20:.2f}"
                  f" GiB (target < 10 s, < 2 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
