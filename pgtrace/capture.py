"""The capture file: one Parquet table of requests plus a JSON header, mode 0600."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from pgtrace.errors import CaptureError
from pgtrace.model import REPORT_BUCKETS

MAGIC_KEY = b"pgtrace.header"
FORMAT_VERSION = 1
#: Columns every capture has, even one without requests (aggregate.empty_frame).
REQUIRED_COLUMNS = ("pid", "t_start", "t_end", "server_ns", *REPORT_BUCKETS)


def _reason(exc: BaseException) -> str:
    """An exception's text on one printable line (Arrow's can hold newlines and raw bytes)."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(exc))
    return " ".join(text.split())


def write_capture(path: str | Path, df: pd.DataFrame, header: dict[str, Any]) -> None:
    """Write requests and header atomically; the file is readable by its owner only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[MAGIC_KEY] = json.dumps({"format": FORMAT_VERSION, **header}).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, compression="zstd", write_page_checksum=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CaptureError(f"{path} is a damaged pgtrace capture (no column {', '.join(missing)})")
    return df, header
