"""`pgtrace load`: the click command (registered by the CLI with cli.add_command(load))."""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import click
import psycopg

from pgtrace.cliargs import errors_to_exit
from pgtrace.driver.options import LOAD_RUNNERS, LoadSpec, driver_options
from pgtrace.driver.runner import Progress, run_load
from pgtrace.driver.summary import load_summary
from pgtrace.driver.wire import server_error_line
from pgtrace.driver.workers import join_workers, start_workers
from pgtrace.errors import PgtraceError, ServerError
from pgtrace.outputs import check_outputs, private_binary, write_private

LOAD_EPILOG = """\b
Examples:
  pgtrace load --workload insert-bigint --runners 40 --duration 10
  pgtrace load --dsn 'host=/tmp port=5432 dbname=postgres' --workload insert-uuidv7 \\
      --runners 40 --connections 4 --summary-json load.json
  pgtrace load --workload insert-ulid --rate 500 --duration 30 --payload-bytes 200 --drop
"""


def _connect_sync(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        raise ServerError(f"cannot connect to PostgreSQL: {server_error_line(exc)}") from None


def _print_progress(p: Progress) -> None:
    click.echo(f"  {p.elapsed_s:5.1f}s  {p.requests:>9} req  {p.errors} err  "
               f"{p.tps:8.0f} tps  p50 {p.p50_ms:.2f} ms  p99 {p.p99_ms:.2f} ms", err=True)


@click.command(epilog=LOAD_EPILOG)
@driver_options(runners=LOAD_RUNNERS, dsn_help="libpq conninfo or URI; default (or empty): "
                "the PG* environment variables, as psql.")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="Write the summary as JSON here (mode 0600).")
@click.option("--drop", is_flag=True, help="Drop the workload's table at the end.")
@click.option("--quiet", "-q", is_flag=True, help="No live progress line.")
@click.option("--frame-out", hidden=True, type=click.Path(dir_okay=False),
              help="Write the per-request frame (Parquet) here, for `pgtrace run`.")
@click.option("--spec-stdin", is_flag=True, hidden=True,
              help="A worker of `run`/`load --workers`: the LoadSpec as JSON on stdin.")
@errors_to_exit
def load(spec: LoadSpec, summary_json: str | None, drop: bool, quiet: bool,
         frame_out: str | None, spec_stdin: bool) -> None:
    """Run an insert workload and time every request on the client.

    Single-row INSERTs by default; --batch-rows N makes each request one N-row INSERT
    (or one COPY with --copy), the batching advice of write-heavy checklists.
    """
    if spec_stdin:
        spec = LoadSpec.from_json(sys.stdin.read())
    check_outputs({"--summary-json": summary_json, "--frame-out": frame_out},
                  inputs=[spec.sql_file] if spec.sql_file else [])
    if spec.workers > 1:
        _load_workers(spec, summary_json)
        return
    _load(spec, summary_json, drop, frame_out)


def _load_workers(spec: LoadSpec, summary_json: str | None) -> None:
    """The load split over worker processes; one summary over all of them."""
    workload = spec.build()
    with _connect_sync(spec.conninfo) as conn:
        workload = workload.setup(conn)  # uuidv7: the server's own where it has one
    with tempfile.TemporaryDirectory() as tmp:
        frame, duration, code = join_workers(start_workers(spec, tmp))
    if frame.empty:
        raise ServerError(f"the driver workers failed (exit {code}) before writing results")
    summary = load_summary(frame, duration)
    _write_summary(summary, summary_json)
    _result_line(workload.name, summary)
    if code:
        raise ServerError(f"a driver worker stopped with exit {code}; the results so far are "
                          "written")


def _write_summary(summary: dict[str, Any], path: str | None) -> None:
    if path:
        write_private(path, json.dumps(summary, indent=2) + "\n")


def _result_line(name: str, summary: dict[str, Any]) -> None:
    c = summary["client_ns"]
    click.echo(f"{name}: {summary['requests']} requests, {summary['errors']} errors, "
               f"{summary['tps']:.0f} tps, p50 {c['p50'] / 1e6:.3f} ms, "
               f"p99 {c['p99'] / 1e6:.3f} ms ({summary['duration_s']:.1f} s)")


def _load(spec: LoadSpec, summary_json: str | None, drop: bool, frame_out: str | None) -> None:
    workload = spec.build()
    with _connect_sync(spec.conninfo) as conn:
        workload = workload.setup(conn)  # uuidv7: the server's own where it has one
    try:
        result = run_load(spec.conninfo, workload, runners=spec.runners,
                          connections=spec.connections, duration_s=spec.duration,
                          count=spec.count, rate=spec.rate,
                          on_progress=_print_progress if spec.progress else None)
    finally:
        if drop:
            try:
                with _connect_sync(spec.conninfo) as conn:
                    workload.teardown(conn)
            except (PgtraceError, psycopg.Error):
                click.echo(f"pgtrace: could not drop {workload.table}", err=True)
    summary = load_summary(result.frame, result.duration_s)
    if frame_out:
        with private_binary(frame_out) as f:
            result.frame.assign(duration_s=result.duration_s).to_parquet(f, index=False)
    _write_summary(summary, summary_json)
    _result_line(workload.name, summary)
    for line in result.first_errors[1:]:
        click.echo(f"  error: {line}", err=True)
    if result.fatal:
        raise ServerError(f"run stopped early: {result.fatal}")
    if summary["errors"]:
        first = result.first_errors[0] if result.first_errors else "unknown error"
        raise ServerError(f"{summary['errors']} requests failed (first: {first})")
