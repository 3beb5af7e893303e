"""uuid7 / ULID bit layout and ordering."""

from __future__ import annotations

import time
import uuid
from itertools import pairwise

import pytest

from pgtrace.driver import ids
from pgtrace.driver.ids import ulid, ulid_text, uuid7


@pytest.fixture(autouse=True)
def fresh_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generators are monotonic per process: each test starts from a fresh one."""
    monkeypatch.setattr(ids, "_v7", ids._Monotonic(74))
    monkeypatch.setattr(ids, "_ulid", ids._Monotonic(80))


def test_uuid7_layout() -> None:
    ms = 0x0123456789AB
    u = uuid7(now_ms=ms)
    n = u.int
    assert n >> 80 == ms
    assert (n >> 76) & 0xF == 7
    assert u.version == 7
    assert (n >> 62) & 0b11 == 0b10
    assert u.variant == uuid.RFC_4122


def test_uuid7_timestamp_is_now() -> None:
    before = time.time_ns() // 1_000_000
    u = uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= u.int >> 80 <= after + 1


def test_uuid7_strictly_increasing_within_a_millisecond() -> None:
    ms = time.time_ns() // 1_000_000 + 5_000
    ids = [uuid7(now_ms=ms) for _ in range(5000)]
    assert all(a < b for a, b in pairwise(ids))
    assert all(str(a) < str(b) for a, b in pairwise(ids))  # text order too
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert len({u.int & ((1 << 62) - 1) for u in ids}) == len(ids)


def test_uuid7_clock_going_back_keeps_order() -> None:
    ms = time.time_ns() // 1_000_000 + 10_000
    a = uuid7(now_ms=ms)
    b = uuid7(now_ms=ms - 100)
    assert b > a


def test_uuid7_orders_across_milliseconds() -> None:
    base = time.time_ns() // 1_000_000 + 20_000
    a, b = uuid7(now_ms=base), uuid7(now_ms=base + 1)
    assert a < b and b.int >> 80 == base + 1


def test_ulid_layout_order_and_text() -> None:
    ms = time.time_ns() // 1_000_000 + 30_000
    ids = [ulid(now_ms=ms) for _ in range(1000)]
    assert all(u.int >> 80 == ms for u in ids)
    assert all(a < b for a, b in pairwise(ids))
    text = [ulid_text(u) for u in ids]
    assert all(len(t) == 26 and t[0] in "01234567" for t in text)
    assert text == sorted(text)
    assert ulid_text(uuid.UUID(int=0)) == "0" * 26
    assert ulid_text(uuid.UUID(int=(1 << 128) - 1)) == "7" + "Z" * 25
