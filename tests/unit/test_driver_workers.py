"""Splitting a load over driver worker processes (pure: command lines only)."""

from __future__ import annotations

import pytest

from pgtrace.driver.workers import LoadSpec, split, worker_commands, worker_count


@pytest.mark.parametrize(("total", "parts"), [(40, 1), (40, 3), (7, 2), (5, 5), (1, 1)])
def test_split_sums_and_balances(total: int, parts: int) -> None:
    shares = split(total, parts)
    assert sum(shares) == total and len(shares) == parts
    assert max(shares) - min(shares) <= 1


def _opt(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_commands_share_runners_connections_count_and_rate() -> None:
    spec = LoadSpec(dsn="host=/x", runners=40, connections=5, count=1001, rate=900.0,
                    duration=None)
    outs = ["a", "b", "c"]
    cmds = worker_commands(spec, outs)
    assert [_opt(c, "--frame-out") for c in cmds] == outs
    assert sum(int(_opt(c, "--runners") or 0) for c in cmds) == 40
    assert sum(int(_opt(c, "--connections") or 0) for c in cmds) == 5
    assert sum(int(_opt(c, "--count") or 0) for c in cmds) == 1001
    assert all(float(_opt(c, "--rate") or 0) == 300.0 for c in cmds)
    assert all(_opt(c, "--duration") is None for c in cmds)
    # only the first worker shows progress
    assert ["--quiet" in c for c in cmds] == [False, True, True]


def test_worker_count_never_exceeds_runners_or_connections() -> None:
    assert worker_count(LoadSpec(dsn="", runners=3), 8) == 3
    assert worker_count(LoadSpec(dsn="", runners=40, connections=2), 8) == 2
    assert worker_count(LoadSpec(dsn="", runners=40), 0) == 1
