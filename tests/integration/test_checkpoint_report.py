"""A run across a timed checkpoint: the checkpoint, the FPI burst after it, and the HTML."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from pgtrace.aggregate import summary
from pgtrace.cluster import start_cluster
from pgtrace.driver.options import LoadSpec
from pgtrace.report.html import render_html
from pgtrace.run import RunOptions, run_profile
from tests.integration.test_report_html_browser import (
    _artifacts,
    _check_in_browser,
    _chromium,
    _install_chromium,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf]

SEC = 1_000_000_000


def test_checkpoint_fpi_burst_in_timeline_and_html(tmp_path: Path) -> None:
    """The issue's check: a 60 s run with checkpoint_timeout=30s, its HTML in a browser."""
    with start_cluster(settings={"checkpoint_timeout": "30s", "max_wal_size": "4GB"}) as c:
        out = run_profile(RunOptions(load=LoadSpec(dsn=c.dsn, workload="insert-uuidv4",
                                                   runners=8, duration=60, progress=False)))
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

    buf = io.StringIO()
    render_html([("run.pgtrace", out.trace.frame, header)], buf)
    html = buf.getvalue()
    embedded = re.search(r'<script type="application/json" id="pgtrace-summary">(.*?)</script>',
                         html, re.S)
    assert embedded is not None
    s = summary(out.trace.frame, lost=header["lost"], unmatched=header["unmatched"],
                duration_s=header["duration_s"])
    assert json.loads(embedded.group(1)) == s
    assert "checkpoint" in html.lower() and "FPI" in html

    page = tmp_path / "checkpoint.html"
    page.write_text(html, encoding="utf-8")
    browser = _install_chromium()
    profile = tmp_path / "profile"
    profile.mkdir()
    result = _check_in_browser(browser, profile, page)
    timeline = next(f for f in result["figures"] if f["id"].endswith("timeline"))
    assert timeline["traces"] >= 4  # tps, p50, p99, WAL FPI/s (+ pressure)
    shot = _artifacts() / "report-checkpoint.png"
    shot.unlink(missing_ok=True)
    _chromium(browser, profile, "--virtual-time-budget=5000", "--window-size=1400,3000",
              f"--screenshot={shot}", page.as_uri())
    assert shot.stat().st_size > 100_000
