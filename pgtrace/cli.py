"""The pgtrace command line: parse, call the library, map errors to exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from pgtrace import __version__
from pgtrace.errors import PgtraceError, ServerError

F = TypeVar("F", bound=Callable[..., Any])


def _errors_to_exit(func: F) -> F:
    """Turn PgtraceError into one line on stderr and its exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PgtraceError as exc:
            click.echo(exc.line(), err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgtrace")
def cli() -> None:
    """Split every PostgreSQL request's latency into exact buckets with eBPF.

    \b
    Start with:
      sudo pgtrace doctor --pid $(head -1 $PGDATA/postmaster.pid)
      sudo pgtrace attach --pid <postmaster pid> 5
    """


PROBES_EPILOG = """\b
Examples:
  pgtrace probes --binary /usr/lib/postgresql/15/bin/postgres
  pgtrace probes --pid 1234 --json      # the binary a running server uses
"""


@cli.command(epilog=PROBES_EPILOG)
@click.option("-p", "--pid", type=int, help="Any pid of a running cluster.")
@click.option("--binary", type=click.Path(dir_okay=False), help="A postgres binary.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors_to_exit
def probes(pid: int | None, binary: str | None, as_json: bool) -> None:
    """List the USDT probes (and key uprobe symbols) of a postgres binary."""
    from pgtrace.elf.usdt import read_probes
    from pgtrace.report.probes import render_probes

    path = _resolve_binary(pid, binary)
    render_probes(path, read_probes(path), sys.stdout, as_json=as_json)


DOCTOR_EPILOG = """\b
Examples:
  sudo pgtrace doctor
  sudo pgtrace doctor --pid $(head -1 /var/lib/postgresql/15/main/postmaster.pid)
  pgtrace doctor --json
"""


@cli.command(epilog=DOCTOR_EPILOG)
@click.option("-p", "--pid", type=int, help="Any pid of the cluster to check.")
@click.option("--binary", type=click.Path(dir_okay=False), help="A postgres binary to check.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors_to_exit
def doctor(pid: int | None, binary: str | None, as_json: bool) -> None:
    """Check that this machine and server can be traced; print the fix for each failure."""
    from pgtrace.doctor import render_checks, run_checks

    checks = run_checks(pid=pid, binary=binary)
    render_checks(checks, sys.stdout, as_json=as_json)
    if any(not c.ok for c in checks):
        sys.exit(1)


ATTACH_EPILOG = """\b
Examples:
  sudo pgtrace attach -p 1234                 # the postmaster: all client backends
  sudo pgtrace attach -p 1234 5               # a line every 5 s, until Ctrl-C
  sudo pgtrace attach -p 1234 1 10            # 10 lines, one per second
  sudo pgtrace attach -p 4321 -p 4322 --duration 30 -o run.pgtrace
  sudo pgtrace attach -p 1234 --duration 60 --summary-json summary.json
  pgtrace report run.pgtrace                  # the same analysis, offline
"""


@cli.command(epilog=ATTACH_EPILOG)
@click.option("-p", "--pid", "pids", type=int, multiple=True, required=True,
              help="The postmaster (trace every client backend, present and future) "
              "or a backend pid (repeatable).")
@click.option("-d", "--duration", type=float, help="Stop after this many seconds.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the capture (one row per request, mode 0600) here.")
@click.option("--summary-json", type=click.Path(dir_okay=False),
              help="Write the summary as JSON here.")
@click.option("--query-text", is_flag=True,
              help="Keep query text in the capture (default: fingerprints only).")
@click.option("--dsn", default=None,
              help="Connect here once a second for the timeline (pg_stat_wal, checkpointer "
              "counters); without it only PSI is sampled.")
@click.option("--sample-interval", type=click.FloatRange(min=0.05), default=1.0,
              show_default=True, help="Seconds between timeline samples.")
@click.option("--stacks", is_flag=True,
              help="Sample on-CPU stacks (99 Hz) and record off-CPU stacks per bucket; "
              "written as folded stacks next to -o (CAPTURE.oncpu.folded, .offcpu.folded).")
@click.option("--lwlock-probes", is_flag=True,
              help="Time LWLock waits with the lwlock__wait USDT probes (two uprobe traps "
              "per wait) instead of the wait event read when a backend sleeps (the default "
              "where the server version's tranche ids are known).")
@click.option("--ebpf", is_flag=True, hidden=True, help="Print the BPF program and exit.")
@click.argument("interval", type=float, required=False)
@click.argument("count", type=int, required=False)
@_errors_to_exit
def attach(pids: tuple[int, ...], duration: float | None, output: str | None,
           summary_json: str | None, query_text: bool, dsn: str | None,
           sample_interval: float, stacks: bool, lwlock_probes: bool, ebpf: bool,
           interval: float | None, count: int | None) -> None:
    """Trace a running cluster and split every request's server time into buckets.

    Buckets: cpu, runqueue, fsync, wal_write, lwlock:<tranche>, lock:<type>,
    io_read, io_write, other_wait, and the unexplained remainder; they sum to
    each request's server time. Prints INTERVAL-second lines (COUNT of them)
    if asked, and a report when it stops (Ctrl-C, SIGTERM, --duration).
    """
    if ebpf:
        from pgtrace.collect.loader import ProgramConfig, iter_sources

        click.echo("// cflags: " + " ".join(ProgramConfig().cflags()))
        for name, text in iter_sources():
            click.echo(f"// ---- {name}\n{text}")
        return
    from pgtrace.attach import AttachOptions, run_attach
    from pgtrace.report.live import interval_printer
    from pgtrace.report.text import render_text

    opts = AttachOptions(pids=list(pids), duration=duration, interval=interval,
                         count=count, query_text=query_text, dsn=dsn, stacks=stacks,
                         sample_interval=sample_interval, lwlock_probes=lwlock_probes)
    printer = interval_printer(sys.stdout) if interval else None

    def ready(_session: Any) -> None:
        # only once every probe is attached: before that, an error is the one line printed
        if interval is None:
            click.echo("Tracing... hit Ctrl-C to end.", err=True)

    result = run_attach(opts, on_interval=printer, on_ready=ready)
    _write_outputs(result.frame, result.summary, result.header, output, summary_json)
    if stacks and output:
        _write_folded(result.header.get("stacks", {}), output)
    render_text(result.frame, result.summary, sys.stdout)


def _write_outputs(frame: Any, summary: dict[str, Any], header: dict[str, Any],
                   output: str | None, summary_json: str | None) -> None:
    """Write the capture and the summary JSON where asked."""
    import json

    if output:
        from pgtrace.capture import write_capture

        write_capture(output, frame, header)
    if summary_json:
        with open(summary_json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")


def _write_folded(stacks: dict[str, Any], base: str) -> None:
    """CAPTURE.oncpu.folded and CAPTURE.offcpu.folded, for flamegraph.pl or speedscope."""
    import os

    for kind in ("oncpu", "offcpu"):
        path = f"{base}.{kind}.folded"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when the file was there before, with another mode
        with os.fdopen(fd, "w") as f:
            f.writelines(line + "\n" for line in stacks.get(kind, []))
        click.echo(f"wrote {path}", err=True)


REPORT_EPILOG = """\b
Examples:
  pgtrace report run.pgtrace
  pgtrace report run.pgtrace --format json > report.json   # + per fingerprint, per second
  pgtrace report run.pgtrace --format csv > requests.csv    # one row per request
  pgtrace report bigint.pgtrace uuidv4.pgtrace              # side by side, bucket by bucket
  pgtrace report run.pgtrace --format html -o report.html --png figures/
"""


@cli.command(epilog=REPORT_EPILOG)
@click.argument("captures", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv", "html"]),
              default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write here instead of standard output.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False),
              help="With --format html: also export each figure as PNG into this directory.")
@_errors_to_exit
def report(captures: tuple[str, ...], fmt: str, output: str | None, png_dir: str | None) -> None:
    """Re-run the analysis of one or more captures offline (no root, no server).

    html is one self-contained page (no network needed to view it): buckets,
    percentiles, the per-second timeline with checkpoints, WAL FPI and CPU
    pressure, fingerprints, waits, flame graphs and run metadata.
    """
    from pgtrace.report.offline import render_report

    if output is None:
        render_report(list(captures), fmt, sys.stdout, png_dir)
        return
    with open(output, "w", encoding="utf-8") as f:
        render_report(list(captures), fmt, f, png_dir)


RUN_EPILOG = """\b
Examples:
  sudo pgtrace run                                  # 40 runners, 10 s, throwaway cluster
  sudo pgtrace run --workload insert-uuidv4 --runners 40 --connections 4
  sudo pgtrace run --dsn 'host=/var/run/postgresql dbname=test' --duration 30 -o run.pgtrace
  sudo pgtrace run --rate 5000 --summary-json run.json
"""


@cli.command(epilog=RUN_EPILOG)
@click.option("--dsn", default=None,
              help="A local server (libpq conninfo). Default: a private throwaway cluster.")
@click.option("--workload", default="insert-bigint", show_default=True,
              type=click.Choice(["insert-bigint", "insert-bigint-cache50", "insert-uuidv4",
                                 "insert-uuidv7", "insert-ulid"]))
@click.option("--runners", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--connections", type=click.IntRange(min=1), default=None,
              help="Connections the runners share [default: runners].")
@click.option("-d", "--duration", type=float, default=None, help="Seconds [default: 10].")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Requests to issue.")
@click.option("--rate", type=float, default=None, help="Open loop at this many requests/s.")
@click.option("--payload-bytes", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-rows", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows per request: one multi-row INSERT (or one COPY with --copy).")
@click.option("--copy", "use_copy", is_flag=True,
              help="Each request is COPY ... FROM STDIN of --batch-rows rows.")
@click.option("--sql-file", type=click.Path(dir_okay=False),
              help="Drive this statement instead of a workload (see `pgtrace load --help`).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Driver processes sharing the runners (when one cannot keep up).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the capture (server and client columns, mode 0600) here.")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="Write the summary here.")
@click.option("--query-text", is_flag=True, help="Keep query text in the capture.")
@_errors_to_exit
def run(dsn: str | None, workload: str, runners: int, connections: int | None,
        duration: float | None, count: int | None, rate: float | None, payload_bytes: int,
        batch_rows: int, use_copy: bool, sql_file: str | None, workers: int,
        output: str | None, summary_json: str | None, query_text: bool) -> None:
    """Run the built-in insert driver under the engine; split every client request end to end.

    Buckets: client_queue (waiting for a free connection in the driver),
    request_transit and server_wakeup (the backend waiting for a CPU after the
    request arrived), the server buckets, response_transit and client_wakeup
    (the driver waiting for a CPU after the answer arrived), unexplained.
    """
    from pgtrace.report.text import render_e2e, render_text
    from pgtrace.run import RunOptions, run_profile

    if duration is None and count is None:
        duration = 10.0
    out = run_profile(RunOptions(dsn=dsn, workload=workload, runners=runners,
                                 connections=connections, duration=duration, count=count,
                                 rate=rate, payload_bytes=payload_bytes, query_text=query_text,
                                 workers=workers, batch_rows=batch_rows, copy=use_copy,
                                 sql_file=sql_file))
    header = dict(out.trace.header, run=out.summary, cluster_note=out.cluster_note)
    _write_outputs(out.frame, out.summary, header, output, summary_json)
    click.echo(f"({out.cluster_note})")
    render_e2e(out.frame, out.summary, sys.stdout)
    render_text(out.trace.frame, out.trace.summary, sys.stdout)
    if out.driver_exit:
        raise ServerError(
            f"the driver stopped with exit {out.driver_exit} (see its message above); "
            "the results so far are written"
        )


def _register_driver() -> None:
    """`pgtrace load` lives with the driver."""
    from pgtrace.driver.command import load

    cli.add_command(load)


_register_driver()
cli.add_command(__import__("pgtrace.lab.command", fromlist=["lab"]).lab)  # `pgtrace lab`


def _resolve_binary(pid: int | None, binary: str | None) -> str:
    """The postgres binary named by --binary or used by --pid."""
    from pgtrace.errors import UsageError

    if (pid is None) == (binary is None):
        raise UsageError("give exactly one of --pid or --binary")
    if binary is not None:
        return binary
    from pgtrace.target import find_target

    assert pid is not None
    return find_target(pid).binary


def main() -> None:
    """Console-script entry point."""
    cli()
