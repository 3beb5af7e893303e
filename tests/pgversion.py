"""Server version specs for the ``pg`` marker: ``@pytest.mark.pg(">= 17")``.

A spec is one or more comma-separated clauses ``OP MAJOR`` (OP: ``>=``, ``>``, ``<=``,
``<``, ``==``, ``!=``), all of which must hold: ``">= 13, < 18"``. A bare number means ``==``.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

_OPS: dict[str, Callable[[int, int], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<)?\s*(\d+)\s*$")


def parse_spec(spec: str) -> list[tuple[str, int]]:
    """The clauses of a spec as (op, major); ValueError for anything else."""
    clauses = []
    for part in spec.split(","):
        m = _CLAUSE.match(part)
        if m is None:
            raise ValueError(f"bad PostgreSQL version spec {spec!r}: {part.strip()!r} is not "
                             "OP MAJOR (OP one of >= > <= < == !=)")
        clauses.append((m.group(1) or "==", int(m.group(2))))
    return clauses


def matches(spec: str, major: int) -> bool:
    """Whether a server of major version ``major`` satisfies every clause of ``spec``."""
    return all(_OPS[op](major, want) for op, want in parse_spec(spec))
