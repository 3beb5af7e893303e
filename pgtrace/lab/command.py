"""`pgtrace lab list` and `pgtrace lab run NAME` (registered by the CLI with add_command)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from pgtrace.cliargs import SECONDS, errors_to_exit
from pgtrace.errors import OutputError
from pgtrace.outputs import check_outputs, write_private

LAB_EPILOG = """\b
Examples:
  pgtrace lab list
  sudo pgtrace lab run pk-types --quick
  sudo pgtrace lab run checkpoint-fpi --json ckpt.json -o captures/
  sudo pgtrace lab run commit-settings --dsn 'host=/var/run/postgresql dbname=lab'
  pgtrace report captures/pk-types-uuidv4-16.pgtrace
"""


@click.group(epilog=LAB_EPILOG)
def lab() -> None:
    """The seed experiments, one command each: set up, run, profile, restore, compare."""


@lab.command("list")
@errors_to_exit
def list_() -> None:
    """The experiments, with their seed and what they vary."""
    from pgtrace.lab.spec import load_experiments

    experiments = load_experiments()
    for exp in experiments.values():
        variants = ", ".join(v.name for v in exp.variants)
        click.echo(f"{exp.name:<20} seed {exp.seed:<8} {exp.title}")
        click.echo(f"{'':<20} variants: {variants}; runners "
                   f"{'/'.join(map(str, exp.scale('full').runners))} "
                   f"({'/'.join(map(str, exp.scale('quick').runners))} with --quick)")


@contextmanager
def _progress_bar() -> Iterator[Callable[[Any], None]]:
    """A rich progress bar on stderr, fed LabProgress updates."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        tasks: list[Any] = []

        def update(p: Any) -> None:
            if not tasks:  # shown from the first update, once the checks have passed
                tasks.append(bar.add_task(p.label, total=max(p.total_s, 1e-9)))
            bar.update(tasks[0], description=p.label, completed=p.done_s,
                       total=max(p.total_s, 1e-9))

        yield update


@lab.command("run", epilog=LAB_EPILOG)
@click.argument("name")
@click.option("--quick", is_flag=True, help="Fewer runner levels and shorter runs.")
@click.option("--dsn", default=None,
              help="An existing local server (libpq conninfo); it is put back as it was. "
              "Default: a private throwaway cluster.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write {experiment, rows, hypotheses} here (mode 0600).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False),
              help="Write one capture per variant and runner level here (for pgtrace report).")
@click.option("--duration", type=SECONDS,
              help=f"Seconds per run ({SECONDS.range_text()}), instead of the experiment's.")
@click.option("--smoke", is_flag=True, hidden=True,
              help="Tiny scale (one low runner level, small tables), for tests.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@errors_to_exit
def run(name: str, quick: bool, dsn: str | None, json_path: str | None,
        output_dir: str | None, duration: float | None, smoke: bool, no_progress: bool) -> None:
    """Run experiment NAME under the engine and check its hypotheses.

    Prints a markdown table (tps, index sizes, WAL and FPI per row, the largest
    server buckets, ...) and whether each hypothesis holds on this run.
    """
    from pgtrace.lab.engine import LabOptions, LabResult, check_lab, run_lab

    scale = "smoke" if smoke else "quick" if quick else "full"
    opts = LabOptions(name=name, scale=scale, dsn=dsn, out_dir=output_dir, duration=duration)
    result: LabResult
    check_outputs({"--json": json_path})
    if output_dir is not None and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputError(f"-o {output_dir} is not a directory")
    check_lab(opts)
    if no_progress:
        result = run_lab(opts)
    else:
        with _progress_bar() as update:
            result = run_lab(opts, update)
    _print_result(result, scale, json_path)  # a failed JSON write: the table is printed


def _print_result(result: Any, scale: str, json_path: str | None) -> None:
    """The table and hypotheses on stdout; the JSON document where asked."""
    from pgtrace.lab.results import document, markdown
    from pgtrace.model import E2E_BUCKETS

    exp = result.experiment
    click.echo(f"## {exp.name} (seed {exp.seed}): {exp.title}\n")
    description = exp.description
    for key, value in exp.scale(scale).params.items():
        description = description.replace("{" + key + "}", f"{value:,}")
    click.echo(description + "\n")
    for note in result.notes:
        click.echo(f"({note})")
    click.echo("")
    click.echo(markdown(result.rows, result.hypotheses, list(E2E_BUCKETS), exp.columns))
    for path in result.captures:
        click.echo(f"wrote {path}", err=True)
    if json_path:
        doc = document(exp.name, result.rows, result.hypotheses,
                       {"scale": scale, "notes": result.notes})
        write_private(json_path, json.dumps(doc, indent=2) + "\n")
