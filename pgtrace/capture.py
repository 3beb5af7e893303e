"""The capture file: one Parquet table of requests plus a JSON header, mode 0600."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from pgtrace.errors import CaptureError
from pgtrace.model import LOCK_PREFIX, LWLOCK_PREFIX, REPORT_BUCKETS, RUNQUEUE_PREFIX

MAGIC_KEY = b"pgtrace.header"
FORMAT_VERSION = 1
#: Columns every capture has, even one without requests (aggregate.empty_frame).
REQUIRED_COLUMNS = ("pid", "t_start", "t_end", "server_ns", *REPORT_BUCKETS)
#: Other columns that hold integers (nanoseconds, counts) when present.
NUMERIC_PREFIXES = (LWLOCK_PREFIX, LOCK_PREFIX, RUNQUEUE_PREFIX, "n_")


def _reason(exc: BaseException) -> str:
    """An exception's text on one printable line (Arrow's can hold newlines and raw bytes)."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(exc))
    return " ".join(text.split())


def write_capture(path: str | Path, df: pd.DataFrame, header: dict[str, Any]) -> None:
    """Write requests and header atomically; the file is readable by its owner only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pgtrace.outputs import private_binary

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[MAGIC_KEY] = json.dumps({"format": FORMAT_VERSION, **header}).encode()
    table = table.replace_schema_metadata(meta)
    with private_binary(str(path)) as f:
        pq.write_table(table, f, compression="zstd", write_page_checksum=True)


# ---------------------------------------------------------------- the typed header

_NUM = (int, float)
#: Header fields the readers use, and the JSON type each must have when present.
HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "tool": (str,), "server_version": (str,), "kernel": (str,), "host": (str,),
    "cluster_note": (str,), "timeline_error": (str,),
    "started_wall": _NUM, "duration_s": _NUM, "lost": (int,), "unmatched": (int,),
    "cluster": (dict,), "counters": (dict,), "query_texts": (dict,), "settings": (dict,),
    "engine": (dict,), "stacks": (dict,), "run": (dict,), "lab": (dict,),
    "timeline": (list,), "checkpoints": (list,), "pids": (list,),
}
#: What `pgtrace report` reads of a `pgtrace run` summary (header["run"]).
RUN_TYPES: dict[str, tuple[type, ...]] = {
    "requests": (int,), "errors": (int,), "tps": _NUM, "unmatched": (int,),
    "client_latency_ns": (dict,), "p99_shares": (dict,),
}


def _type_name(types: tuple[type, ...]) -> str:
    return "a number" if types == _NUM else {int: "an integer", str: "a string",
                                              dict: "an object", list: "a list"}[types[0]]


def _bad_field(fields: dict[str, Any], types: dict[str, tuple[type, ...]],
               required: bool = False) -> str | None:
    """The first field of the wrong JSON type, as a phrase (None: all good)."""
    for key, want in types.items():
        if key not in fields:
            if required:
                return f"no {key!r}"
            continue
        value = fields[key]
        ok = isinstance(value, want) and not isinstance(value, bool)
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            return f"{key!r} is {json.dumps(value)[:40]}, not {_type_name(want)}"
    return None


def _map_of(value: dict[str, Any], types: tuple[type, ...]) -> bool:
    return all(isinstance(v, types) and not isinstance(v, bool) for v in value.values())


def header_problem(header: dict[str, Any]) -> str | None:
    """Why a header (format checked) cannot be read, as a phrase; None when it can."""
    bad = _bad_field(header, HEADER_TYPES)
    if bad is not None:
        return bad
    for key in ("lost", "unmatched", "duration_s"):
        if header.get(key, 0) < 0:
            return f"{key!r} is negative"
    for key, types in (("counters", (int,)), ("query_texts", (str,)), ("settings", (str,))):
        if key in header and not _map_of(header[key], types):
            return f"{key!r} holds a value that is not {_type_name(types)}"
    stacks = header.get("stacks", {})
    for kind in ("oncpu", "offcpu"):
        lines = stacks.get(kind, [])
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            return f"'stacks.{kind}' is not a list of strings"
    if "run" in header:
        bad = _bad_field(header["run"], RUN_TYPES, required=True)
        if bad is not None:
            return f"run: {bad}"
        if not _map_of(header["run"]["p99_shares"], _NUM):
            return "run: 'p99_shares' holds a value that is not a number"
    return None


def column_problem(df: pd.DataFrame) -> str | None:
    """Why the columns cannot be read (a required one missing, or not of integers)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        return f"no column {', '.join(missing)}"
    numeric = [c for c in df.columns if c in REQUIRED_COLUMNS or c.startswith(NUMERIC_PREFIXES)]
    for c in numeric:
        if not pd.api.types.is_integer_dtype(df[c].dtype):
            return f"column {c} is {df[c].dtype}, not integers"
    return None


def read_capture(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Requests and header of a capture; one clear CaptureError if it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        raise CaptureError(f"{path} is a directory, not a pgtrace capture")
    if not path.is_file():
        raise CaptureError(f"no capture at {path}")
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise CaptureError(
            f"{path} is not a readable pgtrace capture (corrupt or truncated: {_reason(exc)})"
        ) from exc
    raw = (table.schema.metadata or {}).get(MAGIC_KEY)
    if raw is None:
        raise CaptureError(f"{path} is a Parquet file but not a pgtrace capture (no header)")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CaptureError(f"{path} has a corrupt pgtrace header ({_reason(exc)})") from exc
    if not isinstance(header, dict):
        raise CaptureError(f"{path} has a corrupt pgtrace header (not a JSON object)")
    if header.get("format") != FORMAT_VERSION:
        raise CaptureError(
            f"{path} has capture format {header.get('format')!r}, expected {FORMAT_VERSION}"
        )
    try:
        df = table.to_pandas()
    except Exception as exc:  # pandas metadata can be damaged in any way
        raise CaptureError(
            f"{path} is not a readable pgtrace capture (corrupt: {_reason(exc)})"
        ) from exc
    problem = header_problem(header) or column_problem(df)
    if problem is not None:
        raise CaptureError(f"{path} is a damaged pgtrace capture ({problem})")
    return df, header
