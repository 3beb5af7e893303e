"""Experiment specs: the TOML files in lab/specs/, read into frozen dataclasses.

A spec names its variants (a statement or a driver workload, GUCs, setup and
teardown SQL), the runner levels and duration of each scale (full, quick, and
smoke for the tests), and the hypotheses to check on the measurements.
`{name}` in SQL is replaced by the scale's parameter of that name.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pgtrace.errors import UsageError

MEASURES = ("index", "buffers", "catalog", "vacuum", "trend")


@dataclass(frozen=True)
class Variant:
    """One configuration of an experiment, run at every runner level."""

    name: str
    label: str
    sql: str | None = None          # a custom statement (pgbench style), or
    workload: str | None = None     # a driver workload (pgtrace load --workload)
    batch_rows: int = 1
    table: str | None = None        # the table whose index and reads are measured
    gucs: dict[str, str] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    teardown: tuple[str, ...] = ()
    hold_horizon: bool = False      # keep a transaction with an xid open during the run


@dataclass(frozen=True)
class Scale:
    """Runner levels, seconds per run and SQL parameters of one scale."""

    runners: tuple[int, ...]
    duration: float
    params: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Hypothesis:
    """A bound on a metric, or on its ratio to another variant or runner level."""

    text: str
    metric: str
    variants: tuple[str, ...] = ()          # empty: every variant
    runners: tuple[int, ...] | str = ()     # levels, "min", "max"; empty: every level run
    over: str | None = None                 # divide by this variant's value (same runners)
    over_runners: int | str | None = None   # divide by this level's value (same variant)
    above: float | None = None
    below: float | None = None
    seed: str = ""                          # what the seed reported, for comparison


@dataclass(frozen=True)
class Experiment:
    """A whole spec."""

    name: str
    seed: str
    title: str
    description: str
    variants: tuple[Variant, ...]
    scales: dict[str, Scale]
    hypotheses: tuple[Hypothesis, ...]
    measures: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    teardown: tuple[str, ...] = ()
    cluster_settings: dict[str, str] = field(default_factory=dict)  # private cluster only
    wal_device: dict[str, int] = field(default_factory=dict)  # throttled pg_wal (private)
    columns: tuple[str, ...] = ()   # extra table columns: hypothesis metrics (share:..., ...)

    def scale(self, name: str) -> Scale:
        """The runner levels, duration and parameters of scale `name`."""
        return self.scales[name]


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: expected a string or a list of strings")
    return tuple(value)


_VARIANT_KEYS = {"name", "label", "sql", "workload", "batch_rows", "table", "gucs", "setup",
                 "teardown", "hold_horizon"}


def _variant(d: dict[str, Any], where: str) -> Variant:
    name = str(d["name"])
    extra = sorted(set(d) - _VARIANT_KEYS)
    if extra:
        raise UsageError(f"{where}: variant {name} has unknown keys {extra}")
    if ("sql" in d) == ("workload" in d):
        raise UsageError(f"{where}: variant {name} needs exactly one of sql, workload")
    return Variant(
        name=name, label=str(d.get("label", name)), sql=d.get("sql"),
        workload=d.get("workload"), batch_rows=int(d.get("batch_rows", 1)),
        table=d.get("table"), gucs={k: str(v) for k, v in d.get("gucs", {}).items()},
        setup=_strs(d.get("setup", []), where), teardown=_strs(d.get("teardown", []), where),
        hold_horizon=bool(d.get("hold_horizon", False)),
    )


def _scales(d: dict[str, Any], where: str) -> dict[str, Scale]:
    base = Scale(runners=tuple(int(r) for r in d["runners"]), duration=float(d["duration"]),
                 params={k: int(v) for k, v in d.get("params", {}).items()})
    out = {"full": base}
    for name in ("quick", "smoke"):
        o = d.get(name, {})
        if set(o) - {"runners", "duration", "params"}:
            raise UsageError(f"{where}: [{name}] takes runners, duration, params only, "
                             f"not {sorted(set(o) - {'runners', 'duration', 'params'})}")
        out[name] = Scale(
            runners=tuple(int(r) for r in o.get("runners", base.runners)),
            duration=float(o.get("duration", base.duration)),
            params={**base.params, **{k: int(v) for k, v in o.get("params", {}).items()}},
        )
    for name, s in out.items():
        if not s.runners or min(s.runners) < 1 or s.duration <= 0:
            raise UsageError(f"{where}: scale {name} needs runners >= 1 and duration > 0")
    return out


def _hypothesis(d: dict[str, Any]) -> Hypothesis:
    runners = d.get("runners", ())
    return Hypothesis(
        text=str(d["text"]), metric=str(d["metric"]),
        variants=tuple(d.get("variants", ())),
        runners=runners if isinstance(runners, str) else tuple(int(r) for r in runners),
        over=d.get("over"), over_runners=d.get("over_runners"),
        above=d.get("above"), below=d.get("below"), seed=str(d.get("seed", "")),
    )


def parse_spec(text: str, where: str) -> Experiment:
    """An Experiment from TOML text; UsageError naming `where` if it is malformed."""
    try:
        d = tomllib.loads(text)
        exp = Experiment(
            name=str(d["name"]), seed=str(d.get("seed", "")), title=str(d["title"]),
            description=str(d.get("description", "")).strip(),
            variants=tuple(_variant(v, where) for v in d["variants"]),
            scales=_scales(d, where),
            hypotheses=tuple(_hypothesis(h) for h in d.get("hypotheses", [])),
            measures=tuple(d.get("measures", ())),
            setup=_strs(d.get("setup", []), where), teardown=_strs(d.get("teardown", []), where),
            cluster_settings={k: str(v) for k, v in d.get("cluster_settings", {}).items()},
            wal_device={k: int(v) for k, v in d.get("wal_device", {}).items()},
            columns=_strs(d.get("columns", []), where),
        )
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{where}: bad experiment spec ({type(exc).__name__}: {exc})") from None
    unknown = [m for m in exp.measures if m not in MEASURES]
    names = {v.name for v in exp.variants}
    refs = {n for h in exp.hypotheses for n in (*h.variants, h.over) if n is not None}
    if unknown or refs - names or len(names) != len(exp.variants):
        raise UsageError(f"{where}: unknown measures {unknown}, unknown variants "
                         f"{sorted(refs - names)}, or duplicate variant names")
    return exp


def load_experiments() -> dict[str, Experiment]:
    """Every spec shipped in pgtrace/lab/specs, by name, in file order."""
    out: dict[str, Experiment] = {}
    folder = resources.files("pgtrace.lab").joinpath("specs")
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            exp = parse_spec(entry.read_text(encoding="utf-8"), entry.name)
            out[exp.name] = exp
    return out


def get_experiment(name: str) -> Experiment:
    """The experiment called `name`; UsageError listing the names otherwise."""
    experiments = load_experiments()
    if name not in experiments:
        raise UsageError(f"unknown experiment {name!r}",
                         "one of " + ", ".join(experiments) + "; see `pgtrace lab list`")
    return experiments[name]
