"""A run across a timed checkpoint: the checkpoint, the FPI burst after it, and the HTML."""

from __future__ import annotations

import io
import json
import re

import pytest

from pgtrace.aggregate import summary
from pgtrace.cluster import start_cluster
from pgtrace.report.html import render_html
from pgtrace.run import RunOptions, run_profile

pytestmark = [pytest.mark.root, pytest.mark.bpf]

SEC = 1_000_000_000


def test_checkpoint_fpi_burst_in_timeline_and_html() -> None:
    with start_cluster(settings={"checkpoint_timeout": "30s", "max_wal_size": "4GB"}) as c:
        out = run_profile(RunOptions(dsn=c.dsn, workload="insert-uuidv4", runners=8,
                                     duration=40, progress=False))
    header = out.trace.header
    # a timed checkpoint spreads its writes (checkpoint_completion_target): it may still
    # run when the trace ends; its start is what the FPI burst follows
    timed = header["checkpoints"]
    assert timed, header["checkpoints"]
    start = timed[0]["start"]
    samples = [s for s in header["timeline"] if s.get("wal_fpi") is not None]

    def fpi_between(a: int, b: int) -> float:
        inside = [s for s in samples if a <= s["t"] <= b]
        assert len(inside) >= 2, (a, b, [s["t"] for s in samples])
        return float(inside[-1]["wal_fpi"] - inside[0]["wal_fpi"])

    before = fpi_between(start - 6 * SEC, start)
    after = fpi_between(start, start + 6 * SEC)
    assert after > 0 and after > 3 * before, (before, after)

    page = io.StringIO()
    render_html([("run.pgtrace", out.trace.frame, header)], page)
    html = page.getvalue()
    embedded = re.search(r'<script type="application/json" id="pgtrace-summary">(.*?)</script>',
                         html, re.S)
    assert embedded is not None
    s = summary(out.trace.frame, lost=header["lost"], unmatched=header["unmatched"],
                duration_s=header["duration_s"])
    assert json.loads(embedded.group(1)) == s
    assert "checkpoint" in html.lower() and "FPI" in html
