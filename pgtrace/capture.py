"""The capture file: one Parquet table of requests plus a JSON header, mode 0600."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Any, TypedDict, cast

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


def write_capture(path: str | Path, df: pd.DataFrame, header: Header) -> None:
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


class ClusterInfo(TypedDict, total=False):
    """The traced cluster."""

    data_dir: str
    port: int | None
    postmaster_pid: int
    binary: str


class Stacks(TypedDict, total=False):
    """Folded stacks (attach --stacks), one line per stack."""

    oncpu: list[str]
    offcpu: list[str]
    hz: int


class RunFigures(TypedDict, total=False):
    """What `pgtrace report` reads of a `pgtrace run` summary (header["run"]).

    The driver's figures (load_summary) and the engine's counters under the names
    the run summary gives them (server_requests, unmatched_waits); RUN_REQUIRED are
    in every run capture.
    """

    requests: int
    errors: int
    tps: float
    unmatched: int
    client_latency_ns: dict[str, Any]
    p99_shares: dict[str, float]
    duration_s: float
    client_ns: dict[str, float]
    server_requests: int
    unmatched_waits: int
    driver_exit: int


class Lifecycle(TypedDict, total=False):
    """When tracing started and stopped, each postmaster followed, why it ended early."""

    tracing_started_wall: float
    attach_s: float
    stopped_wall: float | None
    window_ns: list[int]
    requests_before_window: int
    requests_after_window: int
    conversion_s: float
    postmasters: list[dict[str, Any]]  # one per postmaster traced, in order
    ended: str


class Header(Lifecycle, total=False):
    """A capture's header: what the readers use of it, each field of one JSON type.

    attach.capture_header builds it, run.RunOutcome adds "run" and "cluster_note";
    read_capture checks it against these annotations (HEADER_TYPES) once, so every
    reporter takes it as typed.
    """

    format: int
    tool: str
    server_version: str
    kernel: str
    host: str
    cluster_note: str
    timeline_error: str
    started_wall: float
    duration_s: float
    lost: int
    unmatched: int
    cluster: ClusterInfo
    counters: dict[str, int]
    query_texts: dict[str, str]
    settings: dict[str, str]
    engine: dict[str, str]
    stacks: Stacks
    run: RunFigures
    lab: dict[str, Any]
    timeline: list[dict[str, Any]]  # sampler rows, each with "t" (CLOCK_MONOTONIC ns)
    checkpoints: list[dict[str, Any]]  # {"start": ns, "end": ns or null}
    pids: list[int]


_NUM = (int, float)
_JSON: dict[Any, tuple[type, ...]] = {str: (str,), int: (int,), float: _NUM}


def _json_types(annotation: Any) -> tuple[type, ...]:
    """The JSON type a field annotation stands for: a number, a string, an object, a list
    (X | None: that or null)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return (*_json_types(inner), type(None))
    if annotation in _JSON:
        return _JSON[annotation]
    origin = typing.get_origin(annotation)
    return (list,) if origin is list else (dict,)


def _value_types(annotation: Any) -> tuple[type, ...] | None:
    """What the values of a dict[str, X] field must be (None: anything)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and args[1] in _JSON:
        return _JSON[args[1]]
    return None


#: Header fields the readers use, and the JSON type each must have when present.
HEADER_TYPES: dict[str, tuple[type, ...]] = {
    k: _json_types(a) for k, a in typing.get_type_hints(Header).items() if k != "format"
}
#: What `pgtrace report` reads of a `pgtrace run` summary (header["run"]).
RUN_TYPES: dict[str, tuple[type, ...]] = {
    k: _json_types(a) for k, a in typing.get_type_hints(RunFigures).items()
}
#: The run figures every run capture has.
RUN_REQUIRED = ("requests", "errors", "tps", "unmatched", "client_latency_ns", "p99_shares")


def _type_name(types: tuple[type, ...]) -> str:
    return "a number" if types[:2] == _NUM else {int: "an integer", str: "a string",
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


def _bad_maps(fields: dict[str, Any], cls: Any) -> str | None:
    """The first dict[str, X] field holding a value that is not an X, as a phrase."""
    for key, annotation in typing.get_type_hints(cls).items():
        types = _value_types(annotation)
        if key in fields and types is not None and not _map_of(fields[key], types):
            return f"{key!r} holds a value that is not {_type_name(types)}"
    return None


def _bad_samples(header: dict[str, Any]) -> str | None:
    """Timeline samples and checkpoints that are not objects with a time, as a phrase."""
    for key, when in (("timeline", "t"), ("checkpoints", "start")):
        for item in header.get(key, []):
            if not isinstance(item, dict) or _bad_field(item, {when: _NUM}, required=True) or (
                    key == "checkpoints" and _bad_field(item, {"end": (*_NUM, type(None))})):
                return f"{key!r} holds {json.dumps(item)[:40]}, not an object with {when!r}"
    return None


def header_problem(header: dict[str, Any]) -> str | None:
    """Why a header (format checked) cannot be read, as a phrase; None when it can."""
    bad = _bad_field(header, HEADER_TYPES) or _bad_maps(header, Header)
    if bad is not None:
        return bad
    for key in ("lost", "unmatched", "duration_s"):
        if header.get(key, 0) < 0:
            return f"{key!r} is negative"
    stacks = header.get("stacks", {})
    for kind in ("oncpu", "offcpu"):
        lines = stacks.get(kind, [])
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            return f"'stacks.{kind}' is not a list of strings"
    if "run" in header:
        run = header["run"]
        bad = (_bad_field(run, {k: RUN_TYPES[k] for k in RUN_REQUIRED}, required=True)
               or _bad_field(run, RUN_TYPES) or _bad_maps(run, RunFigures))
        if bad is not None:
            return f"run: {bad}"
    return _bad_samples(header)


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


def read_capture(path: str | Path) -> tuple[pd.DataFrame, Header]:
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
    return df, cast(Header, header)
