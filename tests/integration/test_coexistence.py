"""pgtrace leaves the tracepoints it uses to other tracers too (perf sees its events)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pgtrace.attach import AttachOptions, trace_during

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def _perf_switches(tmp: Path) -> int:
    perf = shutil.which("perf")
    assert perf is not None, "perf is missing: scripts/setup.sh installs linux-perf"
    data = tmp / "perf.data"
    subprocess.run([perf, "record", "-q", "-e", "sched:sched_switch", "-a", "-o", str(data),
                    "--", "sleep", "1"], check=True, capture_output=True)
    out = subprocess.run([perf, "script", "-i", str(data)], check=True, capture_output=True,
                         text=True).stdout
    return sum(1 for line in out.splitlines() if "sched_switch" in line)


def test_perf_still_sees_sched_switch(pg_cluster: Any, tmp_path: Path) -> None:
    alone = _perf_switches(tmp_path)
    assert alone > 0
    _result, during = trace_during(AttachOptions(pids=[pg_cluster.postmaster_pid]),
                                  lambda _s: _perf_switches(tmp_path))
    assert during > alone * 0.2, (alone, during)
