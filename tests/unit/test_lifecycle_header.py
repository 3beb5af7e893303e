"""The attach lifecycle's header keys: written, read back, shown; the restart lookup."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from pgtrace.aggregate import empty_frame, summary
from pgtrace.attach import lifecycle_header, new_postmaster
from pgtrace.capture import read_capture, write_capture
from pgtrace.cli import cli
from pgtrace.report.text import render_text, window_lines

SEGMENTS: list[dict[str, Any]] = [
    {"postmaster_pid": 100, "attach_s": 3.25, "start_wall": 1_800_000_000.0,
     "end_wall": 1_800_000_010.0, "start_ns": 5_000, "end_ns": 9_000, "seeded_pids": [101, 102],
     "rescanned_backends": 1, "requests_before_window": 4, "requests_after_window": 1},
    {"postmaster_pid": 200, "attach_s": 2.5, "start_wall": 1_800_000_012.5,
     "end_wall": 1_800_000_020.0, "start_ns": 11_000, "end_ns": 20_000, "seeded_pids": [201],
     "rescanned_backends": 0, "requests_before_window": 2, "requests_after_window": 0},
]


def test_header_keys_round_trip_and_show(tmp_path: Path) -> None:
    ended = "postmaster 200 of /d exited and no new one came up: tracing ended early"
    lc = lifecycle_header(SEGMENTS, ended, 0.4321)
    assert lc["window_ns"] == [5_000, 20_000]  # the first window's start, the last's end
    assert lc["attach_s"] == 3.25 and lc["conversion_s"] == 0.432
    assert lc["requests_before_window"] == 6 and lc["requests_after_window"] == 1
    assert lc["tracing_started_wall"] == 1_800_000_000.0
    assert lc["stopped_wall"] == 1_800_000_020.0
    header = {"tool": "t", "duration_s": 15.0, "lost": 0, "unmatched": 0, "counters": {},
              "query_texts": {}, **lc}
    path = tmp_path / "c.pgtrace"
    write_capture(path, empty_frame(), header)
    _df, back = read_capture(path)
    assert {k: back[k] for k in lc} == json.loads(json.dumps(lc))

    lines = window_lines(back)
    assert lines[0].startswith("requests counted from ")
    assert lines[0].endswith("once every probe was attached (3.2 s after the command started)")
    assert lines[1:] == ["postmaster restarts followed: 1", f"ended early: {ended}"]
    out = io.StringIO()
    render_text(empty_frame(), summary(empty_frame(), lost=0, unmatched=0, duration_s=15.0),
                out, back)
    assert "\n".join(lines) in out.getvalue()
    # and offline, from the capture alone
    res = CliRunner().invoke(cli, ["report", str(path)])
    assert res.exit_code == 0, res.output
    assert "\n".join(lines) in res.output


def test_no_lifecycle_keys_no_lines() -> None:
    """Captures written before these keys existed show what they showed before."""
    assert window_lines({"duration_s": 1.0}) == []
    ended_only = lifecycle_header(SEGMENTS[:1], None, 0.0)
    assert "ended" not in ended_only
    assert window_lines(ended_only)[1:] == []


def _pidfile(data: Path, pid: int, status: str) -> None:
    lines = [str(pid), str(data), "1800000000", "5432", "/tmp", "localhost",
             "  5432001         0", status]
    (data / "postmaster.pid").write_text("\n".join(lines) + "\n")


def test_new_postmaster(tmp_path: Path) -> None:
    me = os.getpid()  # a live pid stands in for the new postmaster
    assert new_postmaster(str(tmp_path), 1) is None  # no postmaster.pid
    _pidfile(tmp_path, me, "starting")
    assert new_postmaster(str(tmp_path), 1) is None  # not ready yet
    _pidfile(tmp_path, me, "ready   ")
    assert new_postmaster(str(tmp_path), 1) == me
    assert new_postmaster(str(tmp_path), me) is None  # the old one, still named
    _pidfile(tmp_path, 2**22 + 12345, "ready")  # beyond pid_max: gone
    assert new_postmaster(str(tmp_path), 1) is None
