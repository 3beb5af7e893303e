"""Safe by default (issue 13), the pure parts: values and output paths refused before any
work with one line, private and atomic outputs, typed capture headers, the --dsn check.

The parts that need root, a cluster or BPF are in tests/integration/test_safety.py.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner, Result

from pgtrace.capture import read_capture, write_capture
from pgtrace.cli import cli
from pgtrace.errors import CaptureError, OutputError
from pgtrace.outputs import check_outputs, private_text, write_private
from pgtrace.sampler import dsn_problem
from tests.unit.test_capture import HEADER, requests_frame, umask0  # noqa: F401 - a fixture


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def one_line(res: Result, prefix: str = "pgtrace") -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(prefix), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    path = tmp_path / "run.pgtrace"
    write_capture(path, requests_frame(50), HEADER)
    return path


# --- 6. every numeric option: finite, in range, refused by the parser ----------------------

BAD_VALUES = [
    ("attach", ["-p", "1", "--duration", "0"], "--duration"),
    ("attach", ["-p", "1", "--duration", "-1"], "--duration"),
    ("attach", ["-p", "1", "--duration", "nan"], "--duration"),
    ("attach", ["-p", "1", "--duration", "inf"], "--duration"),
    ("attach", ["-p", "1", "--duration", "1e9"], "--duration"),
    ("attach", ["-p", "1", "0", "1"], "INTERVAL"),
    ("attach", ["-p", "1", "nan"], "INTERVAL"),
    ("attach", ["-p", "1", "1", "0"], "COUNT"),
    ("attach", ["-p", "1", "1", "1.5"], "COUNT"),
    ("attach", ["-p", "1", "--sample-interval", "nan"], "--sample-interval"),
    ("attach", ["-p", "1", "--sample-interval", "0"], "--sample-interval"),
    ("run", ["--duration", "-1"], "--duration"),
    ("run", ["--duration", "0"], "--duration"),
    ("run", ["--duration", "nan"], "--duration"),
    ("run", ["--rate", "nan"], "--rate"),
    ("run", ["--rate", "0"], "--rate"),
    ("run", ["--count", "0"], "--count"),
    ("run", ["--runners", "0"], "--runners"),
    ("run", ["--runners", "100000"], "--runners"),
    ("run", ["--connections", "-3"], "--connections"),
    ("run", ["--payload-bytes", "-1"], "--payload-bytes"),
    ("run", ["--batch-rows", "0"], "--batch-rows"),
    ("run", ["--workers", "0"], "--workers"),
    ("load", ["--duration", "nan"], "--duration"),
    ("load", ["--rate", "inf"], "--rate"),
    ("lab", ["run", "pk-types", "--duration", "nan"], "--duration"),
]


@pytest.mark.parametrize(("command", "args", "option"), BAD_VALUES,
                         ids=[f"{c} {' '.join(a)}" for c, a, _o in BAD_VALUES])
def test_bad_numbers_are_one_usage_line(command: str, args: list[str], option: str) -> None:
    """Refused by the parser (exit 2): the command's body, which would trace, never runs."""
    started = time.monotonic()
    res = invoke(command, *args)
    assert res.exit_code == 2, res.output
    line = one_line(res, f"pgtrace {command}")
    assert "invalid value for" in line and option in line, line
    assert line.endswith("--help)"), line
    assert res.stdout == ""
    assert time.monotonic() - started < 5


def test_click_errors_are_one_line() -> None:
    res = invoke("attach", "-p", "1", "--bogus")
    assert res.exit_code == 2
    assert "no such option" in one_line(res, "pgtrace attach")


# --- 4/5. output paths: checked before any work; private, atomic writes ---------------------


def test_check_outputs(tmp_path: Path, capture: Path) -> None:
    check_outputs({"-o": str(tmp_path / "new.pgtrace"), "--summary-json": None})
    cases: list[tuple[dict[str, str | None], list[str], str]] = [
        ({"-o": str(tmp_path / "nodir" / "x")}, [], "no directory"),
        ({"-o": str(tmp_path)}, [], "is a directory"),
        ({"-o": str(capture)}, [str(capture)], "is also an input"),
        ({"-o": str(tmp_path / "a"), "--summary-json": str(tmp_path / "a")}, [],
         "are the same file"),
        ({"-o": ""}, [], "an empty path"),
    ]
    for outputs, inputs, phrase in cases:
        with pytest.raises(OutputError, match=phrase) as info:
            check_outputs(outputs, inputs)
        assert info.value.exit_code == 9
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root may write anywhere
        with pytest.raises(OutputError, match="cannot create files"):
            check_outputs({"-o": str(ro / "x")})


def test_a_failing_write_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "old.txt"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), private_text(str(path)) as f:
        f.write("half")
        raise RuntimeError("render failed")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]  # no temporary left


@pytest.mark.usefixtures("umask0")
def test_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("{}")
    path.chmod(0o666)
    write_private(str(path), "{}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_private(str(tmp_path / "b.bin"), b"\0")
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o600


def test_a_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    link = tmp_path / "out.txt"
    link.symlink_to(victim)
    write_private(str(link), "report\n")
    assert victim.read_text() == "keep\n"
    assert not link.is_symlink() and link.read_text() == "report\n"


def test_a_device_is_written_in_place() -> None:
    write_private("/dev/null", "nothing\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_report_onto_its_own_capture_is_refused(capture: Path) -> None:
    before = capture.read_bytes()
    res = invoke("report", str(capture), "-o", str(capture))
    assert res.exit_code == 9
    assert "is also an input" in one_line(res)
    assert capture.read_bytes() == before
    read_capture(capture)


def test_report_of_a_bad_capture_keeps_the_old_output(tmp_path: Path, capture: Path) -> None:
    old = tmp_path / "old.txt"
    old.write_text("old\n")
    bad = tmp_path / "bad.pgtrace"
    bad.write_bytes(b"not a capture")
    res = invoke("report", str(bad), "-o", str(old))
    assert res.exit_code == CaptureError.exit_code
    one_line(res)
    assert old.read_text() == "old\n"
    # a render that fails after reading (csv takes one capture) leaves it too
    res = invoke("report", str(capture), str(capture), "--format", "csv", "-o", str(old))
    assert res.exit_code == 2
    assert old.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pgtrace", "old.txt",
                                                          "run.pgtrace"]


@pytest.mark.usefixtures("umask0")
@pytest.mark.parametrize("fmt", ["text", "json", "csv", "html"])
def test_report_outputs_are_private(tmp_path: Path, capture: Path, fmt: str) -> None:
    out = tmp_path / f"r.{fmt}"
    res = invoke("report", str(capture), "--format", fmt, "-o", str(out))
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.stat().st_size > 0


def test_attach_output_checked_before_anything(tmp_path: Path) -> None:
    """pid 1 is no postgres: reaching it would be exit 3; the output is refused first."""
    for opt in ("-o", "--summary-json"):
        res = invoke("attach", "-p", "1", "--duration", "30", opt,
                     str(tmp_path / "nodir" / "x"))
        assert res.exit_code == 9, res.output
        assert "no directory" in one_line(res)
    res = invoke("attach", "-p", "1", "--stacks", "-o", str(tmp_path / "x"),
                 "--summary-json", str(tmp_path / "x.oncpu.folded"))
    assert res.exit_code == 9 and "same file" in one_line(res)


def test_run_output_checked_before_the_cluster(tmp_path: Path) -> None:
    sql = tmp_path / "q.sql"
    sql.write_text("select 1\n")
    res = invoke("run", "--sql-file", str(sql), "-o", str(sql))
    assert res.exit_code == 9 and "is also an input" in one_line(res)
    assert sql.read_text() == "select 1\n"


# --- 8. typed capture headers and columns ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"lost": "abc"}, "'lost' is \"abc\", not an integer"),
        ({"duration_s": "2.5"}, "'duration_s' is \"2.5\", not a number"),
        ({"duration_s": -1}, "'duration_s' is negative"),
        ({"unmatched": True}, "'unmatched' is true, not an integer"),
        ({"counters": {"requests": "x"}}, "'counters' holds a value that is not an integer"),
        ({"query_texts": []}, "'query_texts' is [], not an object"),
        ({"stacks": {"oncpu": [1, 2]}}, "'stacks.oncpu' is not a list of strings"),
        ({"run": {"requests": 1}}, "run: no 'errors'"),
        ({"timeline": {}}, "'timeline' is {}, not a list"),
        ({"timeline": [{"t": 1}, {"wal_fpi": 3}]},
         "'timeline' holds {\"wal_fpi\": 3}, not an object with 't'"),
        ({"checkpoints": [{"start": 5, "end": "later"}]},
         "'checkpoints' holds {\"start\": 5, \"end\": \"later\"}, not an object with 'start'"),
        ({"window_ns": "0-9"}, "'window_ns' is \"0-9\", not a list"),
        ({"stopped_wall": "now"}, "'stopped_wall' is \"now\", not a number"),
        ({"engine": {"lwlock_waits": 1}}, "'engine' holds a value that is not a string"),
        ({"run": {"requests": 1, "errors": 0, "tps": 1.0, "unmatched": 0,
                  "client_latency_ns": {}, "p99_shares": {"cpu": "x"}}},
         "run: 'p99_shares' holds a value that is not a number"),
        ({"run": {"requests": 1, "errors": 0, "tps": 1.0, "unmatched": 0,
                  "client_latency_ns": {}, "p99_shares": {}, "driver_exit": "1"}},
         "run: 'driver_exit' is \"1\", not an integer"),
    ],
)
def test_wrong_header_types(tmp_path: Path, change: dict[str, Any], phrase: str) -> None:
    path = tmp_path / "h.pgtrace"
    write_capture(path, requests_frame(5), {**HEADER, **change})
    with pytest.raises(CaptureError) as info:
        read_capture(path)
    assert phrase in info.value.line()
    res = invoke("report", str(path))
    assert res.exit_code == 6
    assert phrase in one_line(res)


def test_header_checks_come_from_the_typed_header() -> None:
    """Every field of the Header TypedDict is checked, as the type it is declared."""
    from typing import get_type_hints

    from pgtrace.capture import HEADER_TYPES, RUN_REQUIRED, RUN_TYPES, Header, RunFigures

    assert set(HEADER_TYPES) == set(get_type_hints(Header)) - {"format"}
    assert set(RUN_TYPES) == set(get_type_hints(RunFigures)) >= set(RUN_REQUIRED)
    assert HEADER_TYPES["lost"] == (int,) and HEADER_TYPES["duration_s"] == (int, float)
    assert HEADER_TYPES["stopped_wall"] == (int, float, type(None))


def test_a_run_capture_with_no_stop_time_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok.pgtrace"
    write_capture(path, requests_frame(5), {**HEADER, "stopped_wall": None,
                                            "checkpoints": [{"start": 5, "end": None}]})
    _df, header = read_capture(path)
    assert header["stopped_wall"] is None and header["checkpoints"][0]["end"] is None


def test_wrong_column_types(tmp_path: Path) -> None:
    for col, values in (("server_ns", "text"), ("lwlock:WALWrite", 1.5), ("n_lwlock", "x")):
        df = requests_frame(5)
        df[col] = values
        path = tmp_path / f"{col}.pgtrace"
        write_capture(path, df, HEADER)
        res = invoke("report", str(path), "--format", "json")
        assert res.exit_code == 6, res.output
        assert f"column {col} is" in one_line(res)


def test_extra_columns_of_any_type_are_fine(tmp_path: Path) -> None:
    df = requests_frame(5).assign(query="select 1", fingerprint="ab")
    path = tmp_path / "ok.pgtrace"
    write_capture(path, df, HEADER)
    back, _h = read_capture(path)
    pd.testing.assert_frame_equal(back, df)


# --- 7. --dsn: one clear reason, within a timeout ------------------------------------------


def test_dsn_problem_garbage_and_refused() -> None:
    assert "missing \"=\"" in (dsn_problem("this is not a dsn") or "")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    problem = dsn_problem(f"host=127.0.0.1 port={port} user=x dbname=x")
    assert problem is not None and "refused" in problem, problem
    assert "\n" not in problem


def test_dsn_problem_gives_up_on_a_silent_server() -> None:
    """A server that accepts the connection and never answers: the 5 s connect timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)  # the kernel completes handshakes; nobody ever reads
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        started = time.monotonic()
        problem = dsn_problem(f"host=127.0.0.1 port={port} user=x dbname=x")
        took = time.monotonic() - started
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()
    assert problem is not None and "timeout" in problem.lower(), problem
    assert 4 <= took < 15, took


def test_json_types_in_the_header_survive_a_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ok.pgtrace"
    header = {**HEADER, "timeline": [{"t": 1, "wal_fpi": None}], "checkpoints": [],
              "stacks": {"oncpu": ["a;b 1"], "offcpu": [], "hz": 99}, "settings": {"ssl": "off"}}
    write_capture(path, requests_frame(5), header)
    _df, back = read_capture(path)
    assert json.loads(json.dumps(back))["stacks"]["oncpu"] == ["a;b 1"]


def test_no_command_still_shows_the_help() -> None:
    for args in ([], ["lab"]):
        res = invoke(*args)
        assert res.exit_code == 2
        assert "Usage: pgtrace" in res.output and "Commands:" in res.output
