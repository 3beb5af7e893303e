"""The capture file: round trip, permissions, one clear CaptureError for every bad file."""

from __future__ import annotations

import io
import json
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from pgtrace.aggregate import empty_frame, summary
from pgtrace.capture import FORMAT_VERSION, MAGIC_KEY, read_capture, write_capture
from pgtrace.cli import cli
from pgtrace.errors import CaptureError
from pgtrace.model import SERVER_BUCKETS

HEADER: dict[str, Any] = {
    "tool": "pgtrace test",
    "cluster": {"data_dir": "/x", "port": 5432, "postmaster_pid": 1, "binary": "/bin/pg"},
    "duration_s": 2.5,
    "lost": 3,
    "unmatched": 1,
    "counters": {"requests": 500},
    "query_texts": {},
}


def requests_frame(n: int = 500, seed: int = 7) -> pd.DataFrame:
    """A frame shaped like attach's: buckets that sum to server_ns, wait columns, text."""
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {
        "pid": rng.integers(100, 104, n),
        "seq": np.arange(n),
        "t_start": np.arange(n) * 1_000_000,
    }
    parts = rng.integers(0, 50_000, (n, len(SERVER_BUCKETS)))
    for i, b in enumerate(SERVER_BUCKETS):
        cols[b] = parts[:, i]
    cols["unexplained"] = rng.integers(0, 3, n)
    cols["server_ns"] = parts.sum(axis=1) + cols["unexplained"]
    cols["t_end"] = cols["t_start"] + cols["server_ns"]
    cols["lwlock:WALWrite"] = cols["lwlock"] // 2
    cols["lwlock:BufferContent"] = cols["lwlock"] - cols["lwlock:WALWrite"]
    cols["lock:transactionid"] = cols["lock"]
    cols["n_lwlock"] = rng.integers(0, 5, n)
    cols["fingerprint"] = [f"{i % 7:016x}" for i in range(n)]
    df = pd.DataFrame(cols)
    ints = [c for c in df.columns if c != "fingerprint"]
    df[ints] = df[ints].astype("int64")
    return df


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    path = tmp_path / "run.pgtrace"
    df = requests_frame()
    write_capture(path, df, HEADER)
    return path, df


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --- round trip -------------------------------------------------------------------------------


def test_round_trip(good: tuple[Path, pd.DataFrame]) -> None:
    path, df = good
    back, header = read_capture(path)
    pd.testing.assert_frame_equal(back, df)
    assert header == {"format": FORMAT_VERSION, **HEADER}


def test_round_trip_of_an_empty_frame(tmp_path: Path) -> None:
    path = tmp_path / "empty.pgtrace"
    write_capture(path, empty_frame(), {"lost": 0})
    back, header = read_capture(path)
    assert len(back) == 0
    assert list(back.columns) == list(empty_frame().columns)
    assert header == {"format": FORMAT_VERSION, "lost": 0}
    assert summary(back)["requests"] == 0


def test_mode_0600_with_a_permissive_umask(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "run.pgtrace"
    write_capture(path, requests_frame(10), HEADER)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # overwriting a world-readable file leaves it owner-only too
    path.chmod(0o644)
    write_capture(path, requests_frame(10), HEADER)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # and no temporary file is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pgtrace"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.pgtrace"
    bad = pd.DataFrame({"x": [object()]})  # arrow cannot convert this
    with pytest.raises(Exception):  # noqa: B017 - whatever arrow raises
        write_capture(path, bad, HEADER)
    assert list(tmp_path.iterdir()) == []


# --- bad files: one clear CaptureError each ---------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _parquet(path: Path, meta: dict[bytes, bytes] | None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(requests_frame(20), preserve_index=False)
    if meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    pq.write_table(table, path)
    return path


def _header(**extra: Any) -> dict[bytes, bytes]:
    return {MAGIC_KEY: json.dumps({**HEADER, **extra}).encode()}


def bad_files(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase its error must contain)."""
    data = good.read_bytes()
    (tmp / "adir").mkdir()
    return {
        "missing": (tmp / "nope.pgtrace", "no capture at"),
        "directory": (tmp / "adir", "is a directory"),
        "empty": (_write(tmp / "empty", b""), "not a readable pgtrace capture"),
        "first half": (_write(tmp / "half1", data[: len(data) // 2]), "corrupt or truncated"),
        "second half": (_write(tmp / "half2", data[len(data) // 2 :]), "corrupt or truncated"),
        "cut footer": (_write(tmp / "cut", data[:-1]), "corrupt or truncated"),
        "random bytes": (
            _write(tmp / "random", random.Random(3).randbytes(4096)), "not a readable"
        ),
        "text": (_write(tmp / "text", b"pid,server_ns\n1,2\n"), "not a readable"),
        "parquet without header": (_parquet(tmp / "plain.parquet", None), "no header"),
        "wrong format version": (
            _parquet(tmp / "v2", _header(format=2)), "capture format 2, expected 1"
        ),
        "no format": (_parquet(tmp / "v0", _header()), "capture format None, expected 1"),
        "header not json": (
            _parquet(tmp / "hj", {MAGIC_KEY: b"{not json"}), "corrupt pgtrace header"
        ),
        "header not an object": (
            _parquet(tmp / "ho", {MAGIC_KEY: b"[1, 2]"}), "corrupt pgtrace header"
        ),
    }


BAD_NAMES = [
    "missing", "directory", "empty", "first half", "second half", "cut footer",
    "random bytes", "text", "parquet without header", "wrong format version", "no format",
    "header not json", "header not an object",
]


def _one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("pgtrace: "), text
    assert lines[0].isprintable(), text
    return lines[0]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_file_raises_one_capture_error(
    tmp_path: Path, good: tuple[Path, pd.DataFrame], name: str
) -> None:
    path, phrase = bad_files(tmp_path, good[0])[name]
    with pytest.raises(CaptureError) as info:
        read_capture(path)
    line = _one_line(info.value.line())
    assert phrase in line
    assert str(path) in line


def test_bad_names_cover_all_cases(tmp_path: Path, good: tuple[Path, pd.DataFrame]) -> None:
    assert sorted(bad_files(tmp_path, good[0])) == sorted(BAD_NAMES)


def test_missing_required_column(tmp_path: Path) -> None:
    path = tmp_path / "nocol"
    write_capture(path, requests_frame(5).drop(columns=["server_ns"]), HEADER)
    with pytest.raises(CaptureError, match="no column server_ns"):
        read_capture(path)


def _with_pandas_meta(path: Path, pandas_meta: bytes) -> Path:
    """A capture with a valid pgtrace header whose pandas metadata is damaged."""
    return _parquet(path, {**_header(format=FORMAT_VERSION), b"pandas": pandas_meta})


@pytest.mark.parametrize(
    "pandas_meta",
    [
        b"{broken",  # not JSON
        b"\xff\xfe",  # not UTF-8
        b'{"columns": [{"name": "pid"}], "index_columns": []}',  # JSON, wrong shape
    ],
    ids=["not json", "not utf-8", "wrong shape"],
)
def test_damaged_pandas_metadata(tmp_path: Path, pandas_meta: bytes) -> None:
    path = _with_pandas_meta(tmp_path / "meta.pgtrace", pandas_meta)
    with pytest.raises(CaptureError) as info:
        read_capture(path)
    assert "not a readable pgtrace capture" in _one_line(info.value.line())
    res = _report(str(path), "--format", "json")
    assert res.exit_code == CaptureError.exit_code
    _one_line(res.stderr)


def test_arrow_messages_become_one_line(
    tmp_path: Path, good: tuple[Path, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrow's errors can hold newlines and raw bytes (damaged thrift footers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def damaged(*_a: object, **_k: object) -> None:
        raise pa.ArrowInvalid("Couldn't deserialize thrift: don't know what type: \x0f\n")

    monkeypatch.setattr(pq, "read_table", damaged)
    with pytest.raises(CaptureError) as info:
        read_capture(good[0])
    line = _one_line(info.value.line())
    assert line.endswith("don't know what type:)")


def test_damaged_files_never_escape_as_other_errors(
    tmp_path: Path, good: tuple[Path, pd.DataFrame]
) -> None:
    """Overwrite a few bytes here and there (footer included): a capture or a CaptureError."""
    data = good[0].read_bytes()
    footer = int.from_bytes(data[-8:-4], "little")
    rnd = random.Random(11)
    target = tmp_path / "damaged"
    errors = 0
    for i in range(300):
        buf = bytearray(data)
        lo = 4 if i % 2 else len(buf) - 8 - footer  # half the time in the footer
        pos = rnd.randrange(lo, len(buf) - 8)
        for k in range(rnd.choice((1, 2, 4))):
            buf[pos + k] = rnd.randrange(256)
        target.write_bytes(bytes(buf))
        try:
            read_capture(target)
        except CaptureError as exc:
            _one_line(exc.line())
            errors += 1
    assert errors > 100  # most damage is detected (page checksums, footer)


# --- through the CLI --------------------------------------------------------------------------


def _report(*args: str) -> Result:
    return CliRunner().invoke(cli, ["report", *args])


@pytest.mark.parametrize("name", BAD_NAMES)
def test_cli_report_bad_file(
    tmp_path: Path, good: tuple[Path, pd.DataFrame], name: str
) -> None:
    path, phrase = bad_files(tmp_path, good[0])[name]
    for fmt in ("text", "json"):
        res = _report(str(path), "--format", fmt)
        assert res.exit_code == CaptureError.exit_code, res.output
        assert phrase in _one_line(res.stderr)
        assert res.stdout == ""
        assert not isinstance(res.exception, CaptureError)  # handled, not a traceback


def test_cli_report_json_equals_the_summary(good: tuple[Path, pd.DataFrame]) -> None:
    path, df = good
    res = _report(str(path), "--format", "json")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    got = json.loads(res.stdout)
    want = summary(df, lost=3, unmatched=1, duration_s=2.5)
    assert {k: got[k] for k in want} == want
    assert got["requests"] == 500
    assert sum(got["buckets_ns"].values()) == got["server_ns"]["sum"] == int(df["server_ns"].sum())


def test_cli_report_text(good: tuple[Path, pd.DataFrame]) -> None:
    res = _report(str(good[0]))
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("500 requests in 2.5 s (200/s)\nserver time: mean ")
    assert "Where the server time went" in res.stdout
    assert "WALWrite" in res.stdout
    assert "transactionid" in res.stdout


def test_cli_report_csv_one_row_per_request(good: tuple[Path, pd.DataFrame]) -> None:
    res = _report(str(good[0]), "--format", "csv")
    assert res.exit_code == 0, res.output
    back = pd.read_csv(io.StringIO(res.stdout))
    assert len(back) == len(good[1])
    assert (back["server_ns"].to_numpy() == good[1]["server_ns"].to_numpy()).all()


def test_cli_report_json_sections(good: tuple[Path, pd.DataFrame]) -> None:
    got = json.loads(_report(str(good[0]), "--format", "json").stdout)
    assert sum(r["requests"] for r in got["per_fingerprint"]) == got["requests"]
    assert sum(r["requests"] for r in got["per_second"]) == got["requests"]


def test_cli_report_side_by_side(tmp_path: Path, good: tuple[Path, pd.DataFrame]) -> None:
    other = tmp_path / "other.pgtrace"
    write_capture(other, requests_frame(200, seed=9), HEADER)
    res = _report(str(good[0]), str(other))
    assert res.exit_code == 0, res.output
    assert "Side by side" in res.stdout and "#2" in res.stdout
    assert all(len(line) <= 100 for line in res.stdout.splitlines())
    both = json.loads(_report(str(good[0]), str(other), "--format", "json").stdout)
    assert [r["requests"] for r in both] == [500, 200]
    res = _report(str(good[0]), str(other), "--format", "csv")
    assert res.exit_code == 2
    _one_line(res.stderr)
