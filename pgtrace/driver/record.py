"""Per-request stamps, six ints a request in one flat list; the live progress line."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

WIDTH = 6  # t_enqueue, t_send, t_recv, pid, ok, runner


@dataclass
class Progress:
    """Counts since the start of the run, reported about once a second."""

    elapsed_s: float
    requests: int
    errors: int
    tps: float  # over the last interval
    p50_ms: float
    p99_ms: float


class Record:
    """Ended requests: ``add((t_enqueue, t_send, t_recv, pid, ok, runner))`` each.

    One ``list.extend`` per request is the cheapest way to keep them from Python.
    """

    def __init__(self) -> None:
        self.flat: list[int] = []
        self.add = self.flat.extend
        self.errors = 0  # among the rows before `seen`, for the progress line
        self.seen = 0

    def __len__(self) -> int:
        return len(self.flat) // WIDTH

    def _rows(self, start: int, stop: int) -> np.ndarray:
        rows = np.asarray(self.flat[start * WIDTH:stop * WIDTH], dtype=np.int64)
        return rows.reshape(-1, WIDTH)

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame (columns as runner.COLUMNS)."""
        a = self._rows(0, len(self))
        return pd.DataFrame({
            "t_enqueue": a[:, 0].copy(),
            "t_send": a[:, 1].copy(),
            "t_recv": a[:, 2].copy(),
            "pid": a[:, 3].astype(np.int32),
            "ok": a[:, 4].astype(bool),
            "runner": a[:, 5].astype(np.int32),
        })

    def progress(self, elapsed_s: float) -> Progress:
        """Progress now, with tps and percentiles over the rows since the previous call."""
        n = len(self)
        new = self._rows(self.seen, n)
        lat = new[:, 2] - new[:, 0]
        p50, p99 = (np.percentile(lat, [50, 99]) / 1e6) if len(lat) else (0.0, 0.0)
        self.errors += int(len(new) - new[:, 4].sum())
        tps, self.seen = n - self.seen, n
        return Progress(elapsed_s, n, self.errors, tps, float(p50), float(p99))
