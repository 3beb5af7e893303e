"""Splitting a load over driver worker processes, and the driver's options (pure)."""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import pytest

from pgtrace.cli import cli
from pgtrace.driver.command import load
from pgtrace.driver.options import LoadSpec, driver_options
from pgtrace.driver.workers import split, worker_count, worker_specs
from pgtrace.driver.workloads import WORKLOADS


@pytest.mark.parametrize(("total", "parts"), [(40, 1), (40, 3), (7, 2), (5, 5), (1, 1)])
def test_split_sums_and_balances(total: int, parts: int) -> None:
    shares = split(total, parts)
    assert sum(shares) == total and len(shares) == parts
    assert max(shares) - min(shares) <= 1


def test_specs_share_runners_connections_count_and_rate() -> None:
    spec = LoadSpec(dsn="host=/x password=secret", runners=40, connections=5, count=1001,
                    rate=900.0, duration=None, workers=3, sql_file="q.sql")
    specs = worker_specs(spec)
    assert len(specs) == 3
    assert sum(s.runners for s in specs) == 40
    assert sum(s.connections or 0 for s in specs) == 5
    assert sum(s.count or 0 for s in specs) == 1001
    assert all(s.rate == 300.0 and s.duration is None for s in specs)
    assert all(s.workers == 1 and s.dsn == spec.dsn for s in specs)
    assert all(s.sql_file is not None and s.sql_file.startswith("/") for s in specs)
    # only the first worker shows progress
    assert [s.progress for s in specs] == [True, False, False]


def test_spec_round_trips_as_json() -> None:
    spec = LoadSpec(dsn="host=/x", workload="insert-ulid", runners=7, connections=3,
                    duration=2.5, rate=10.0, payload_bytes=9, progress=False, batch_rows=4,
                    copy=True, sql_file="/q.sql", workers=2)
    assert LoadSpec.from_json(spec.to_json()) == spec
    # every field travels: a new field cannot be forgotten on the way to a worker
    assert set(LoadSpec.from_json(spec.to_json()).__dict__) == {
        f.name for f in dataclasses.fields(LoadSpec)}


def test_worker_count_never_exceeds_runners_or_connections() -> None:
    assert worker_count(LoadSpec(runners=3, workers=8)) == 3
    assert worker_count(LoadSpec(runners=40, connections=2, workers=8)) == 2
    assert worker_count(LoadSpec(runners=40, workers=0)) == 1


def _params(cmd: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in cmd.params if p.name}


def test_run_and_load_share_the_driver_options_with_their_own_runner_defaults() -> None:
    run = cli.get_command(click.Context(cli), "run")
    assert run is not None
    r, ld = _params(run), _params(load)
    shared = {"dsn", "workload", "runners", "connections", "duration", "count", "rate",
              "payload_bytes", "batch_rows", "use_copy", "sql_file", "workers"}
    assert shared <= set(r) and shared <= set(ld)
    for name in shared:
        a, b = r[name], ld[name]
        assert (a.opts, a.type.to_info_dict()) == (b.opts, b.type.to_info_dict()), name
    assert r["runners"].default == 40 and ld["runners"].default == 8
    choice = r["workload"].type
    assert isinstance(choice, click.Choice) and list(choice.choices) == list(WORKLOADS)


def _spec_of(args: list[str]) -> LoadSpec:
    got: dict[str, Any] = {}

    @click.command()
    @driver_options(runners=5, dsn_help="")
    @click.option("--quiet", is_flag=True)
    def cmd(spec: LoadSpec, quiet: bool) -> None:
        got["spec"] = spec

    cmd.main(args, standalone_mode=False)
    spec: LoadSpec = got["spec"]
    return spec


def test_the_decorator_builds_the_spec() -> None:
    assert _spec_of([]) == LoadSpec(runners=5, duration=10.0)
    assert _spec_of(["--count", "3", "--quiet"]) == LoadSpec(runners=5, duration=None,
                                                             count=3, progress=False)
    assert _spec_of(["-d", "2", "--copy", "--dsn", "x"]).copy


def test_the_cli_imports_no_heavy_module() -> None:
    """The shared driver options keep `pgtrace` light to start: a Ctrl-C while the heavy
    modules load is already the CLI's (one line, exit 130)."""
    import subprocess
    import sys

    code = ("import sys, pgtrace.cli; "
            "print(','.join(m for m in ('psycopg', 'pandas', 'numpy', 'bcc') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert res.stdout.strip() == ""
