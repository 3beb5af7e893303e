"""The pgtrace command line: parse, call the library, map errors to exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from pgtrace import __version__
from pgtrace.errors import PgtraceError

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
