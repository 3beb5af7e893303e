"""The driver's options, once: the `LoadSpec` and the click options of `run` and `load`.

Light to import (click and the workload names, no libpq): cli.py declares `run` with it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pgtrace.cliargs import BATCH_ROWS, PAYLOAD, RATE, REQUESTS, RUNNERS, SECONDS, WORKERS
from pgtrace.driver.workloads import WORKLOADS

if TYPE_CHECKING:
    from pgtrace.driver.workloads import Workload

F = TypeVar("F", bound=Callable[..., Any])

#: `pgtrace load --runners` by default; `pgtrace run` drives 40 (RUN_RUNNERS).
LOAD_RUNNERS = 8
RUN_RUNNERS = 40
#: --duration when neither it nor --count is given.
DEFAULT_DURATION_S = 10.0


@dataclass(frozen=True)
class LoadSpec:
    """A driver load: the server, the workload, its concurrency and its length."""

    dsn: str | None = None  # None: libpq's environment (load), a private cluster (run)
    workload: str = "insert-bigint"
    runners: int = LOAD_RUNNERS
    connections: int | None = None
    duration: float | None = DEFAULT_DURATION_S
    count: int | None = None
    rate: float | None = None
    payload_bytes: int = 0
    progress: bool = True
    batch_rows: int = 1
    copy: bool = False
    sql_file: str | None = None
    workers: int = 1

    @property
    def conninfo(self) -> str:
        """The DSN to connect with ('': the PG* environment variables, as psql)."""
        return self.dsn or ""

    def build(self) -> Workload:
        """The workload this spec names, with its payload and rows per request."""
        if self.sql_file is not None:
            from pgtrace.driver.custom import load_sql_file

            return load_sql_file(self.sql_file)
        from pgtrace.driver.workloads import get_workload

        return get_workload(self.workload, self.payload_bytes, self.batch_rows, self.copy)

    def to_json(self) -> str:
        """The spec as JSON, for a worker process."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadSpec:
        """The spec `to_json` wrote."""
        return cls(**json.loads(text))


#: The option names the decorator turns into the LoadSpec's fields.
_FIELDS = {"dsn": "dsn", "workload": "workload", "runners": "runners",
           "connections": "connections", "duration": "duration", "count": "count",
           "rate": "rate", "payload_bytes": "payload_bytes", "batch_rows": "batch_rows",
           "use_copy": "copy", "sql_file": "sql_file", "workers": "workers"}


def driver_options(*, runners: int, dsn_help: str) -> Callable[[F], F]:
    """The driver's options (`run`, `load`); the command gets them as one `spec: LoadSpec`.

    `runners` is the command's documented default. A command's own `quiet` option, if any,
    turns the progress line off.
    """
    options = [
        click.option("--dsn", default=None, help=dsn_help),
        click.option("--workload", type=click.Choice(list(WORKLOADS)),
                     default="insert-bigint", show_default=True, help="Insert workload."),
        click.option("--runners", type=RUNNERS, default=runners, show_default=True,
                     help=f"Concurrent logical workers ({RUNNERS.range_text()})."),
        click.option("--connections", type=RUNNERS, default=None,
                     help="Connections shared by the runners [default: runners]."),
        click.option("-d", "--duration", type=SECONDS, default=None,
                     help=f"Seconds to run ({SECONDS.range_text()}) "
                     f"[default: {DEFAULT_DURATION_S:g}, unless --count]."),
        click.option("--count", type=REQUESTS, default=None,
                     help=f"Requests to issue ({REQUESTS.range_text()})."),
        click.option("--rate", type=RATE, default=None,
                     help=f"Open loop at this many requests/s in total ({RATE.range_text()}; "
                     "default: closed loop)."),
        click.option("--payload-bytes", type=PAYLOAD, default=0, show_default=True,
                     help=f"Text payload size per row ({PAYLOAD.range_text()}; 0: NULL)."),
        click.option("--batch-rows", type=BATCH_ROWS, default=1, show_default=True,
                     help="Rows per request: one multi-row INSERT (or one COPY with --copy)."),
        click.option("--copy", "use_copy", is_flag=True,
                     help="Each request is COPY ... FROM STDIN of --batch-rows rows."),
        click.option("--sql-file", type=click.Path(dir_okay=False, exists=True),
                     help="Run this statement instead of a workload: pgbench-style "
                     "'\\set name random(lo, hi)' lines, then one SQL statement using :name."),
        click.option("--workers", type=WORKERS, default=1, show_default=True,
                     help="Driver processes sharing the runners (when one cannot keep up)."),
    ]

    def decorate(func: F) -> F:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {field: kwargs.pop(opt) for opt, field in _FIELDS.items()}
            if values["duration"] is None and values["count"] is None:
                values["duration"] = DEFAULT_DURATION_S
            spec = LoadSpec(progress=not kwargs.get("quiet", False), **values)
            return func(*args, spec=spec, **kwargs)

        out: Any = wrapper
        for option in reversed(options):
            out = option(out)
        return out  # type: ignore[no-any-return]

    return decorate
