"""Lab specs: every shipped spec parses, and malformed ones are refused with one clear line."""

from __future__ import annotations

import pytest

from pgtrace.driver.workloads import WORKLOADS
from pgtrace.errors import UsageError
from pgtrace.lab.spec import get_experiment, load_experiments, parse_spec

EXPECTED = ["pk-types", "key-locality", "checkpoint-fpi", "fsync-latency",
            "temp-catalog-bloat", "commit-settings"]

MINIMAL = """
name = "x"
title = "t"
runners = [4]
duration = 2
[[variants]]
name = "a"
sql = "select 1"
"""


def test_shipped_specs_parse_in_order() -> None:
    assert list(load_experiments()) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_spec_is_consistent(name: str) -> None:
    exp = get_experiment(name)
    assert exp.hypotheses, "every experiment states hypotheses"
    for v in exp.variants:
        assert v.workload is None or v.workload in WORKLOADS
    for scale in ("full", "quick", "smoke"):
        s = exp.scale(scale)
        # every {param} used in SQL has a value at every scale
        for v in exp.variants:
            for sql in (*v.setup, *v.teardown, v.sql or ""):
                sql.format(**s.params)
    assert exp.scale("smoke").duration <= 1


def test_quick_and_smoke_inherit_what_they_do_not_set() -> None:
    exp = parse_spec(MINIMAL + '[quick]\nduration = 1\n', "t.toml")
    assert exp.scale("quick").runners == (4,)
    assert exp.scale("quick").duration == 1.0
    assert exp.scale("smoke").duration == 2.0


@pytest.mark.parametrize("text, words", [
    (MINIMAL.replace('sql = "select 1"', ""), "exactly one of sql, workload"),
    (MINIMAL + '[quick]\nsetup = ["x"]\n', "takes runners, duration, params only"),
    ('measures = ["nope"]\n' + MINIMAL, "unknown measures"),
    (MINIMAL + 'gucs2 = {}\n', "variant a has unknown keys ['gucs2']"),
    (MINIMAL + '[[hypotheses]]\ntext = "h"\nmetric = "tps"\nover = "zz"\n', "unknown variants"),
    ("name = ", "bad experiment spec"),
])
def test_bad_spec_is_one_usage_error(text: str, words: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_spec(text, "bad.toml")
    assert words in err.value.line()
    assert err.value.line().startswith("pgtrace: bad.toml")


def test_unknown_experiment_lists_the_names() -> None:
    with pytest.raises(UsageError) as err:
        get_experiment("nope")
    assert "unknown experiment 'nope'" in err.value.line()
    assert "pk-types" in err.value.line()


def test_cli_unknown_experiment_is_one_line_and_exit_2() -> None:
    from click.testing import CliRunner

    from pgtrace.cli import cli

    res = CliRunner().invoke(cli, ["lab", "run", "nope"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgtrace: unknown experiment 'nope'")


def test_cli_list_names_every_experiment() -> None:
    from click.testing import CliRunner

    from pgtrace.cli import cli

    res = CliRunner().invoke(cli, ["lab", "list"])
    assert res.exit_code == 0
    assert [line.split()[0] for line in res.output.splitlines()
            if not line.startswith(" ")] == EXPECTED
