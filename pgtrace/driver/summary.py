"""The `load` summary: request and error counts, tps, client latency percentiles."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def load_summary(df: pd.DataFrame, duration_s: float) -> dict[str, Any]:
    """Summary of a load frame.

    ``requests`` counts successful requests (one row each), ``errors`` the failed
    ones; ``tps`` = requests / duration_s; ``client_ns`` is over successful requests,
    latency = t_recv - t_enqueue (from the intended start in open loop).
    """
    ok = df["ok"].to_numpy(dtype=bool)
    lat = (df["t_recv"].to_numpy(dtype=np.int64) - df["t_enqueue"].to_numpy(dtype=np.int64))[ok]
    n = int(ok.sum())
    errors = int(len(ok) - n)
    if n:
        p50, p99, p999 = np.percentile(lat, [50, 99, 99.9])
        client = {"mean": float(lat.mean()), "p50": float(p50), "p99": float(p99),
                  "p999": float(p999), "max": float(lat.max())}
    else:
        client = {"mean": 0.0, "p50": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
    return {
        "requests": n,
        "errors": errors,
        "duration_s": float(duration_s),
        "tps": n / duration_s if duration_s > 0 else 0.0,
        "client_ns": client,
    }
