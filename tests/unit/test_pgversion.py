"""The version specs of the ``pg`` test marker."""

from __future__ import annotations

import pytest

from tests.pgversion import matches, parse_spec


@pytest.mark.parametrize(
    ("spec", "major", "expected"),
    [
        (">= 17", 17, True),
        (">= 17", 18, True),
        (">= 17", 15, False),
        ("> 17", 17, False),
        ("< 18", 17, True),
        ("< 18", 18, False),
        ("<= 15", 15, True),
        ("== 18", 18, True),
        ("18", 17, False),
        ("!= 17", 17, False),
        (">= 13, < 18", 15, True),
        (">= 13, < 18", 18, False),
        (">=17,<=18", 16, False),
    ],
)
def test_matches(spec: str, major: int, expected: bool) -> None:
    assert matches(spec, major) is expected


def test_parse_spec() -> None:
    assert parse_spec(">= 13, < 18") == [(">=", 13), ("<", 18)]
    assert parse_spec("17") == [("==", 17)]


@pytest.mark.parametrize("bad", ["", ">= ", "=> 17", ">= 17.2", "17,", "~17", ">= x"])
def test_bad_specs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="bad PostgreSQL version spec"):
        parse_spec(bad)
