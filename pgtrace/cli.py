"""The pgtrace command line: parse, call the library, map errors to exit codes."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from pgtrace import __version__
from pgtrace.cliargs import INTERVAL, LINES, SAMPLE_INTERVAL, SECONDS
from pgtrace.cliargs import errors_to_exit as _errors_to_exit
from pgtrace.driver.options import RUN_RUNNERS, LoadSpec, driver_options
from pgtrace.errors import OutputError, ServerError

if TYPE_CHECKING:
    from pgtrace.capture import Header

INTERRUPTED_EXIT = 130


#: Commands defined elsewhere, imported when used: importing this module stays light (click),
#: so a Ctrl-C while the heavy modules load is already handled by _Cli.main.
LAZY_COMMANDS = {"load": "pgtrace.driver.command", "lab": "pgtrace.lab.command"}


class _Cli(click.Group):
    """The command group: click's own errors and Ctrl-C also end in one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            import importlib

            cmd: click.Command = getattr(importlib.import_module(LAZY_COMMANDS[cmd_name]),
                                         cmd_name)
            return cmd
        return super().get_command(ctx, cmd_name)

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `pgtrace` alone: the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(_click_error_line(exc), err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C outside a tracing session: nothing to detach
            click.echo("pgtrace: interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT)
        sys.exit(rv if isinstance(rv, int) else 0)


def _click_error_line(exc: click.ClickException) -> str:
    """`pgtrace attach: invalid value for '-d' / '--duration': ... (see pgtrace attach -h)`."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "pgtrace"
    msg = exc.format_message()
    msg = msg[:1].lower() + msg[1:]
    line = f"{where}: {' '.join(msg.split())}"
    if isinstance(exc, click.UsageError):
        line += f" (see {where} --help)"
    return line


@click.group(name="pgtrace", cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
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
    """Check that this machine and server can be traced; print the fix for each failure.

    The first checks (privileges to headers) are the ones attach, run and lab run stop
    at, in the same order; then bcc (imported, a test program compiled), PSI, and with
    --pid or --binary the server, its binary and the USDT probes attach requires.
    """
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

\b
Before anything is attached, pgtrace checks every value (a bad one: one line, exit 2)
and every output path (its directory exists and is writable, it is no input: exit 9).
Outputs are written mode 0600, atomically, after the report is printed. Ctrl-C before
tracing has started detaches everything and exits 130 without a report.
"""


@cli.command(epilog=ATTACH_EPILOG)
@click.option("-p", "--pid", "pids", type=int, multiple=True, required=True,
              help="The postmaster (trace every client backend, present and future) "
              "or a backend pid (repeatable).")
@click.option("-d", "--duration", type=SECONDS,
              help=f"Stop after this many seconds ({SECONDS.range_text()}, a week).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the capture (one row per request, mode 0600) here.")
@click.option("--summary-json", type=click.Path(dir_okay=False),
              help="Write the summary as JSON here (mode 0600).")
@click.option("--query-text", is_flag=True,
              help="Keep query text in the capture (default: fingerprints only).")
@click.option("--dsn", default=None,
              help="Connect here once a second for the timeline (pg_stat_wal, checkpointer "
              "counters); without it only PSI is sampled. Checked at start (5 s timeout): "
              "if it cannot connect, one warning line and no timeline.")
@click.option("--sample-interval", type=SAMPLE_INTERVAL, default=1.0, show_default=True,
              help=f"Seconds between timeline samples ({SAMPLE_INTERVAL.range_text()}).")
@click.option("--stacks", is_flag=True,
              help="Sample on-CPU stacks (99 Hz) and record off-CPU stacks per bucket; "
              "written as folded stacks next to -o (CAPTURE.oncpu.folded, .offcpu.folded).")
@click.option("--lwlock-probes", is_flag=True,
              help="Time LWLock waits with the lwlock__wait USDT probes (two uprobe traps "
              "per wait) instead of the wait event read when a backend sleeps (the default "
              "where the server version's tranche ids are known).")
@click.option("--ebpf", is_flag=True, hidden=True, help="Print the BPF program and exit.")
@click.argument("interval", type=INTERVAL, required=False, metavar="[INTERVAL]")
@click.argument("count", type=LINES, required=False, metavar="[COUNT]")
@_errors_to_exit
def attach(pids: tuple[int, ...], duration: float | None, output: str | None,
           summary_json: str | None, query_text: bool, dsn: str | None,
           sample_interval: float, stacks: bool, lwlock_probes: bool, ebpf: bool,
           interval: float | None, count: int | None) -> None:
    """Trace a running cluster and split every request's server time into buckets.

    Buckets: cpu, runqueue, fsync, wal_write, lwlock:<tranche>, lock:<type>,
    io_read, io_write, other_wait, and the unexplained remainder; they sum to
    each request's server time. Prints INTERVAL-second lines (0.1 to 86400) if
    asked, COUNT of them (1 to 1000000), and a report when it stops (Ctrl-C,
    SIGTERM, --duration).
    """
    if ebpf:
        from pgtrace.collect.loader import ProgramConfig, iter_sources

        click.echo("// cflags: " + " ".join(ProgramConfig().cflags()))
        for name, text in iter_sources():
            click.echo(f"// ---- {name}\n{text}")
        return
    outputs = _outputs(output, summary_json, stacks)
    from pgtrace.outputs import check_outputs

    check_outputs(outputs)
    timeline_error = _check_dsn(dsn)
    from pgtrace.attach import AttachOptions, run_attach
    from pgtrace.report.live import interval_printer
    from pgtrace.report.text import render_text

    opts = AttachOptions(pids=list(pids), duration=duration, interval=interval,
                         count=count, query_text=query_text,
                         dsn=None if timeline_error else dsn, stacks=stacks,
                         sample_interval=sample_interval, lwlock_probes=lwlock_probes)
    printer = interval_printer(sys.stdout) if interval else None

    def ready(_session: Any) -> None:
        if interval is None:
            click.echo("Tracing... hit Ctrl-C to end.", err=True)

    def status(line: str) -> None:  # compiling, attached, postmaster restarts
        click.echo(line, err=True)

    result = run_attach(opts, on_interval=printer, on_ready=ready, on_status=status)
    if timeline_error:
        result.header["timeline_error"] = timeline_error
    render_text(result.frame, result.summary, sys.stdout, result.header)
    sys.stdout.flush()
    try:
        _write_outputs(outputs, result.frame, result.summary, result.header)
    finally:
        click.echo(f"traced {result.summary['duration_s']:.1f} s; after it, converting the "
                   f"records took {result.conversion_s:.2f} s and the whole report "
                   f"{result.since_window_end():.2f} s", err=True)
    if result.ended:
        raise ServerError(result.ended)


def _outputs(output: str | None, summary_json: str | None,
             stacks: bool = False) -> dict[str, str | None]:
    """Every file a tracing command will write, by the option that names it."""
    out: dict[str, str | None] = {"-o": output, "--summary-json": summary_json}
    if stacks and output:
        for kind in ("oncpu", "offcpu"):
            out[f"-o (--stacks, {kind})"] = f"{output}.{kind}.folded"
    return out


def _check_dsn(dsn: str | None) -> str | None:
    """Why the timeline's --dsn does not work (warned on one line), or None."""
    if dsn is None:
        return None
    from pgtrace.sampler import dsn_problem

    problem = dsn_problem(dsn)
    if problem is not None:
        click.echo(f"pgtrace: warning: no timeline (server counters): cannot use --dsn: "
                   f"{problem}", err=True)
    return problem


def _write_outputs(outputs: dict[str, str | None], frame: Any, summary: dict[str, Any],
                   header: Header) -> None:
    """Write each output asked for (mode 0600, atomically); one OutputError for failures."""
    import json

    from pgtrace.capture import write_capture
    from pgtrace.outputs import write_private

    failed: list[str] = []
    for opt, path in outputs.items():
        if path is None:
            continue
        try:
            if opt == "-o":
                write_capture(path, frame, header)
            elif opt == "--summary-json":
                write_private(path, json.dumps(summary, indent=2) + "\n")
            else:  # folded stacks, for flamegraph.pl or speedscope
                stacks = header.get("stacks", {})
                lines = stacks.get("oncpu", []) if "oncpu" in opt else stacks.get("offcpu", [])
                write_private(path, "".join(line + "\n" for line in lines))
                click.echo(f"wrote {path}", err=True)
        except OutputError as exc:
            failed.append(exc.message)
    if failed:
        raise OutputError("; ".join(failed) + " (the report above is complete)")


REPORT_EPILOG = """\b
Examples:
  pgtrace report run.pgtrace
  pgtrace report run.pgtrace --format json > report.json   # + per fingerprint, per second
  pgtrace report run.pgtrace --format csv > requests.csv    # one row per request
  pgtrace report bigint.pgtrace uuidv4.pgtrace              # side by side, bucket by bucket
  pgtrace report run.pgtrace --format html -o report.html --png figures/

\b
-o is written mode 0600 and only once the report is complete (a temporary file renamed
over it): a failure leaves an existing file as it was. -o naming one of the captures
is refused (exit 9).
"""


@cli.command(epilog=REPORT_EPILOG)
@click.argument("captures", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv", "html"]),
              default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write here (mode 0600) instead of standard output.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False),
              help="With --format html: also export each figure as PNG (mode 0600) into "
              "this directory.")
@_errors_to_exit
def report(captures: tuple[str, ...], fmt: str, output: str | None, png_dir: str | None) -> None:
    """Re-run the analysis of one or more captures offline (no root, no server).

    html is one self-contained page (no network needed to view it): buckets,
    percentiles, the per-second timeline with checkpoints, WAL FPI and CPU
    pressure, fingerprints, waits, flame graphs and run metadata.
    """
    from pgtrace.outputs import check_outputs, private_text
    from pgtrace.report.offline import render_report

    check_outputs({"-o": output}, inputs=captures)
    if output is None:
        render_report(list(captures), fmt, sys.stdout, png_dir)
        return
    with private_text(output) as f:
        render_report(list(captures), fmt, f, png_dir)


RUN_EPILOG = """\b
Examples:
  sudo pgtrace run                                  # 40 runners, 10 s, throwaway cluster
  sudo pgtrace run --workload insert-uuidv4 --runners 40 --connections 4
  sudo pgtrace run --dsn 'host=/var/run/postgresql dbname=test' --duration 30 -o run.pgtrace
  sudo pgtrace run --rate 5000 --summary-json run.json

\b
Values and output paths are checked before the cluster starts (exit 2 and 9); outputs
are written mode 0600 after the report is printed.
"""


@cli.command(epilog=RUN_EPILOG)
@driver_options(runners=RUN_RUNNERS, dsn_help="A local server (libpq conninfo). Default: a "
                "private throwaway cluster.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the capture (server and client columns, mode 0600) here.")
@click.option("--summary-json", type=click.Path(dir_okay=False),
              help="Write the summary here (mode 0600).")
@click.option("--query-text", is_flag=True, help="Keep query text in the capture.")
@_errors_to_exit
def run(spec: LoadSpec, output: str | None, summary_json: str | None, query_text: bool) -> None:
    """Run the built-in insert driver under the engine; split every client request end to end.

    Buckets: client_queue (waiting for a free connection in the driver),
    request_transit and server_wakeup (the backend waiting for a CPU after the
    request arrived), the server buckets, response_transit and client_wakeup
    (the driver waiting for a CPU after the answer arrived), unexplained.
    """
    from pgtrace.outputs import check_outputs

    outputs = _outputs(output, summary_json)
    check_outputs(outputs, inputs=[spec.sql_file] if spec.sql_file else [])
    from pgtrace.report.offline import text_report
    from pgtrace.run import RunOptions, run_profile

    out = run_profile(RunOptions(load=spec, query_text=query_text))
    header = out.header
    click.echo(f"({out.cluster_note})")
    text_report(out.frame, header, sys.stdout)  # as `pgtrace report` prints the capture
    _write_outputs(outputs, out.frame, out.summary, header)
    if out.driver_exit:
        raise ServerError(
            f"the driver stopped with exit {out.driver_exit} (see its message above); "
            "the results so far are written"
        )


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
