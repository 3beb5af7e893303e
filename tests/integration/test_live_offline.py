"""One capture, one set of numbers: what `attach` and `run` print and write when they end
is what `pgtrace report` gives from their capture, in text, JSON, CSV and HTML (issue 17).

The commands run as a user types them, in a subprocess, with one difference: the spool
(attach.SPOOL_RECORDS, 500,000 records) is made small, so that the records are turned
into frames in several batches while tracing, as on a long run; the wrapper counts the
batches. Both commands trace a private cluster with the timeline sampler on (`--dsn`),
whose own queries are requests of the traced cluster too: for `run` they are traced but
joined to no driver request, like each driver connection's set-up.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pgtrace.capture import read_capture
from pgtrace.cluster import TempCluster, start_cluster
from pgtrace.model import E2E_BUCKETS, REPORT_BUCKETS
from tests.integration.workload import wait_for

pytestmark = [pytest.mark.root, pytest.mark.bpf]

PGTRACE = str(Path(sys.executable).parent / "pgtrace")
READY = "Tracing... hit Ctrl-C to end."
SPOOL = 500  # records per batch (the product's default: 500,000)
MIN_BATCHES = 3  # conversions, the last one at the end of the trace included

#: The real command line, its spool made small and its conversions counted.
BATCHED = """
import atexit, os, sys
from pgtrace import attach
from pgtrace.cli import main
attach.SPOOL_RECORDS = int(os.environ["TEST_SPOOL"])
convert, calls = attach.records_frame, []
def counted(*args, **kw):
    calls.append(1)
    return convert(*args, **kw)
attach.records_frame = counted
def done():
    with open(os.environ["TEST_BATCHES"], "w") as f:
        f.write(str(len(calls)))
atexit.register(done)
sys.argv[0] = "pgtrace"
main()
"""

#: The JSON summary's sections computed from the requests (the rest are counters).
ROW_SECTIONS = ("server_ns", "buckets_ns", "lwlock_ns", "lock_ns", "per_backend")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGTRACE_"))}
    env["LC_ALL"] = "C.UTF-8"
    return env


def batched(args: list[str], tmp: Path) -> subprocess.Popen[str]:
    """`pgtrace ARGS` with the small spool; stdout and stderr go to files in tmp."""
    env = dict(_env(), TEST_SPOOL=str(SPOOL), TEST_BATCHES=str(tmp / "batches"))
    return subprocess.Popen([sys.executable, "-c", BATCHED, *args], env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=(tmp / "out").open("w"),
                            stderr=(tmp / "err").open("w"))


def finished(proc: subprocess.Popen[str], tmp: Path, timeout: float) -> tuple[str, int]:
    """(stdout, batches converted) of a successful run."""
    rc = proc.wait(timeout=timeout)
    err = (tmp / "err").read_text()
    assert rc == 0, err[-3000:]
    return (tmp / "out").read_text(), int((tmp / "batches").read_text())


def report(capture: Path, fmt: str) -> str:
    res = subprocess.run([PGTRACE, "report", str(capture), "--format", fmt],
                         capture_output=True, text=True, timeout=300, env=_env(),
                         stdin=subprocess.DEVNULL, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def embedded_summary(page: str) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="pgtrace-summary">(.*?)</script>',
                  page, re.S)
    assert m, "the page embeds no summary"
    value: dict[str, Any] = json.loads(m.group(1))
    return value


def check_offline(capture: Path, live: dict[str, Any], live_text: str) -> pd.DataFrame:
    """The capture's reports in every format give the live numbers; returns the rows."""
    df, _header = read_capture(capture)
    # JSON: the live summary, key for key (the report adds per-fingerprint, per-second)
    offline = json.loads(report(capture, "json"))
    differ = {k: (live[k], offline[k]) for k in live if k in offline and offline[k] != live[k]}
    assert not differ, f"live vs offline: {differ}"
    assert set(live) <= set(offline), f"the report lacks {sorted(set(live) - set(offline))}"
    # text: the same report, line for line
    assert report(capture, "text") == live_text
    # CSV: one row per request, its columns summing to the live totals
    rows = pd.read_csv(io.StringIO(report(capture, "csv")))
    assert len(rows) == len(df)
    assert {b: int(rows[b].sum()) for b in REPORT_BUCKETS} == live["buckets_ns"]
    assert int(rows["server_ns"].sum()) == live["server_ns"]["sum"]
    # HTML: the summary the page embeds
    page = embedded_summary(report(capture, "html"))
    assert {k: page[k] for k in ROW_SECTIONS} == {k: live[k] for k in ROW_SECTIONS}
    return rows


@pytest.fixture(scope="module")
def cluster(pg_bin: str | None) -> Iterator[TempCluster]:
    """A private cluster: everything traced on it is this module's."""
    c = start_cluster(bin_dir=pg_bin)
    try:
        yield c
    finally:
        c.stop()


def test_run_live_equals_offline(cluster: TempCluster, tmp_path: Path) -> None:
    capture, summary_path = tmp_path / "run.pgtrace", tmp_path / "run.json"
    proc = batched(["run", "--dsn", cluster.dsn, "--runners", "4", "--duration", "3",
                    "--summary-json", str(summary_path), "-o", str(capture)], tmp_path)
    out, batches = finished(proc, tmp_path, timeout=180)
    live = json.loads(summary_path.read_text())
    assert batches >= MIN_BATCHES, f"{batches} conversions of {live['server_requests']} records"
    # the engine traced requests that belong to no driver request (the sampler's queries,
    # the connections' set-up): they are not in the capture, so not in its numbers
    assert live["unmatched"] == 0 and live["errors"] == 0
    assert live["server_requests"] > live["requests"], live["server_requests"]
    note, text = out.split("\n", 1)
    assert note.startswith("(given server"), note
    rows = check_offline(capture, live, text)
    assert len(rows) == live["requests"]
    e2e = {b: int(rows["e2e_unexplained" if b == "unexplained" else b].sum())
           for b in E2E_BUCKETS}
    assert e2e == live["e2e_buckets_ns"]
    print(f"run: {live['requests']} requests ({live['server_requests']} traced), "
          f"{batches} batches")


def test_attach_live_equals_offline(cluster: TempCluster, tmp_path: Path) -> None:
    capture, summary_path = tmp_path / "attach.pgtrace", tmp_path / "attach.json"
    proc = batched(["attach", "-p", str(cluster.postmaster_pid), "--duration", "5",
                    "--dsn", cluster.dsn, "--summary-json", str(summary_path),
                    "-o", str(capture)], tmp_path)
    try:
        wait_for(lambda: READY in (tmp_path / "err").read_text() or proc.poll() is not None,
                 60, "the probes to be attached")
        assert proc.poll() is None, (tmp_path / "err").read_text()[-3000:]
        load = subprocess.run([PGTRACE, "load", "--dsn", cluster.dsn, "--runners", "4",
                               "--duration", "2.5", "-q"], capture_output=True, text=True,
                              timeout=60, env=_env(), stdin=subprocess.DEVNULL, check=False)
        assert load.returncode == 0, load.stderr[-2000:]
        assert proc.poll() is None, "the trace ended before the workload did"
    finally:
        if proc.poll() is None:
            proc.wait(timeout=60)
    out, batches = finished(proc, tmp_path, timeout=60)
    live = json.loads(summary_path.read_text())
    assert batches >= MIN_BATCHES, f"{batches} conversions of {live['requests']} records"
    rows = check_offline(capture, live, out)
    assert len(rows) == live["requests"]
    print(f"attach: {live['requests']} requests, {batches} batches")
