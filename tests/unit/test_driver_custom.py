"""Custom statement files: \\set lines, :variables, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgtrace.driver.custom import load_sql_file
from pgtrace.errors import UsageError


def _file(tmp_path: Path, text: str) -> str:
    p = tmp_path / "w.sql"
    p.write_text(text)
    return str(p)


def test_variables_become_parameters(tmp_path: Path) -> None:
    w = load_sql_file(_file(tmp_path, "\\set aid random(1, 10)\n\\set tag 'x'\n"
                                      "-- a comment\nselect :aid, :tag, :aid::text;\n"))
    assert w.prepared_sql == b"select $1, $2, $1::text"
    assert w.param_formats == [0, 0]
    for _ in range(100):
        aid, tag = w.wire_params()
        assert aid is not None and 1 <= int(aid) <= 10 and tag == b"x"


@pytest.mark.parametrize(("text", "phrase"), [
    ("select :x", ":x is used but not \\set"),
    ("\\set x random(5, 1)\nselect :x", "lo > hi"),
    ("\\set x now()\nselect :x", "use random(lo, hi)"),
    ("\\sleep 1\nselect 1", "only \\set"),
    ("select 1; select 2", "exactly one SQL statement"),
    ("", "exactly one SQL statement"),
])
def test_errors(tmp_path: Path, text: str, phrase: str) -> None:
    with pytest.raises(UsageError, match=None) as err:
        load_sql_file(_file(tmp_path, text))
    assert phrase in err.value.message


def test_missing_file() -> None:
    with pytest.raises(UsageError) as err:
        load_sql_file("/nonexistent/w.sql")
    assert "cannot read --sql-file" in err.value.message
