"""A custom statement from a file, pgbench style: `\\set name random(lo, hi)` then `:name`.

The file holds `\\set` lines and one SQL statement. Each `:name` in the statement
becomes a parameter of a prepared statement; its value is computed per request
(`random(lo, hi)`, uniform, inclusive) or fixed (an integer or a quoted string).
`:runner` is not available: every request draws fresh values.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgtrace.driver.workloads import Workload
from pgtrace.errors import UsageError

_SET = re.compile(r"^\\set\s+(\w+)\s+(.+?)\s*$")
_RANDOM = re.compile(r"^random\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)$")
_VAR = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def _value(name: str, expr: str) -> Callable[[], str]:
    m = _RANDOM.match(expr)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise UsageError(f"\\set {name}: random({lo}, {hi}) has lo > hi")
        return lambda: str(random.randint(lo, hi))
    if re.fullmatch(r"-?\d+", expr):
        return lambda: expr
    if len(expr) >= 2 and expr[0] == expr[-1] == "'":
        text = expr[1:-1]
        return lambda: text
    raise UsageError(f"\\set {name} {expr}: use random(lo, hi), an integer or a 'string'")


@dataclass(frozen=True)
class CustomWorkload(Workload):
    """A statement from a file, prepared once, its :variables bound per request."""

    sql: str = ""
    variables: tuple[tuple[str, Callable[[], str]], ...] = field(default=(), compare=False)

    @property
    def prepared_sql(self) -> bytes:
        index = {name: i + 1 for i, (name, _v) in enumerate(self.variables)}
        return _VAR.sub(lambda m: f"${index[m.group(1)]}", self.sql).encode()

    @property
    def param_formats(self) -> list[int]:
        return [0] * len(self.variables)

    def wire_params(self) -> list[bytes | None]:
        return [make().encode() for _name, make in self.variables]

    def fixed_params(self) -> list[bytes | None] | None:
        return None if self.variables else []

    def setup(self, conn: psycopg.Connection[Any]) -> Workload:
        """Nothing to create: the statement's tables are the user's."""
        return self

    def teardown(self, conn: psycopg.Connection[Any]) -> None:
        """Nothing to drop."""


def load_sql_file(path: str) -> CustomWorkload:
    """Parse a custom workload file; one clear UsageError for what is wrong in it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read --sql-file {path}: {exc.strerror}") from None
    defs: dict[str, Callable[[], str]] = {}
    sql_lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("\\set"):
            m = _SET.match(stripped)
            if not m:
                raise UsageError(f"{path}: cannot read {stripped!r} (\\set name expression)")
            defs[m.group(1)] = _value(m.group(1), m.group(2))
        elif stripped.startswith("\\"):
            raise UsageError(f"{path}: only \\set is supported, not {stripped.split()[0]}")
        elif stripped and not stripped.startswith("--"):
            sql_lines.append(line)
    sql = "\n".join(sql_lines).strip().rstrip(";").strip()
    if not sql or ";" in sql:
        raise UsageError(f"{path}: give exactly one SQL statement")
    used = list(dict.fromkeys(_VAR.findall(sql)))
    missing = [v for v in used if v not in defs]
    if missing:
        raise UsageError(f"{path}: :{missing[0]} is used but not \\set")
    return CustomWorkload(
        name=f"custom:{Path(path).name}", table="", columns=(), create_sql="",
        insert_columns=(), description=f"statement from {path}", sql=sql,
        variables=tuple((v, defs[v]) for v in used),
    )
