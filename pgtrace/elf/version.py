"""The PostgreSQL version a server binary names in its read-only data.

The binary is never run to learn it: when root profiles a cluster, the binary belongs to
whoever installed it.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

from pgtrace.elf.image import open_image
from pgtrace.errors import TargetError

# In the binary's read-only data: what `postgres --version` prints (PG_BACKEND_VERSIONSTR),
# and what SQL version() returns (PG_VERSION_STR); neither is ever executed to be read.
_NUMBER = rb"(\d+)([^\s\x00]*)"  # "15" ".18", "17" "beta1"
_BACKEND_VERSIONSTR_RE = re.compile(rb"postgres \(PostgreSQL\) " + _NUMBER)
_VERSION_STR_RE = re.compile(rb"PostgreSQL " + _NUMBER + rb"[^\x00]{0,200}? on [^\x00]{1,100}?, "
                             rb"compiled by ")


def parse_version(output: str) -> tuple[str, int]:
    """("15.18", 15) from `postgres --version` output (PG_BACKEND_VERSIONSTR)."""
    found = _found(_BACKEND_VERSIONSTR_RE, output.encode())
    if not found:
        raise ValueError(f"unrecognised version output: {output.strip()!r}")
    return found[0]


def _found(regex: re.Pattern[bytes], data: bytes) -> list[tuple[str, int]]:
    """(version, major) of each match of a version regex in `data`."""
    return [(m.group(1).decode() + m.group(2).decode("ascii", "replace"), int(m.group(1)))
            for m in regex.finditer(data)]


def binary_version(path: str) -> tuple[str, int]:
    """(version, major) of a postgres binary, read from its .rodata (cached per file).

    The binary is never run: when root profiles a cluster, the binary belongs to whoever
    installed it. Both version strings PostgreSQL compiles in must agree.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TargetError(f"cannot read {path}: {exc.strerror}") from None
    return _version_of(path, st.st_dev, st.st_ino, st.st_mtime_ns)


def versions_in(data: bytes) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """The versions named by PG_BACKEND_VERSIONSTR and by PG_VERSION_STR in `data`."""
    return set(_found(_BACKEND_VERSIONSTR_RE, data)), set(_found(_VERSION_STR_RE, data))


@lru_cache(maxsize=16)
def _version_of(path: str, dev: int, ino: int, mtime_ns: int) -> tuple[str, int]:
    del dev, ino, mtime_ns  # cache key only
    with open_image(path) as image:
        data = image.section_data(".rodata")
    backend, full = versions_in(data)
    if len(backend) != 1 or (full and full != backend):
        seen = sorted(v for v, _m in backend | full)
        what = f"names versions {', '.join(seen)}" if seen else "names no PostgreSQL version"
        raise TargetError(f"{path} {what} in its read-only data: not a PostgreSQL server binary")
    return next(iter(backend))
