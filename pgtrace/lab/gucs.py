"""Server settings changed for a variant with ALTER SYSTEM, and put back as they were.

The driver's sessions are new connections, so a setting has to be in the server's
configuration, not a SET. What `postgresql.auto.conf` held before is restored
exactly: a name it had gets its old value back, a name it lacked is RESET.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from pgtrace.errors import ServerError, UsageError

RELOAD_TIMEOUT_S = 10.0
_RELOADABLE = ("sighup", "superuser", "user", "superuser-backend", "backend")


def _connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True, application_name="pgtrace lab")
    except psycopg.Error as exc:
        raise ServerError(f"cannot connect to PostgreSQL: {exc}".splitlines()[0]) from None


def auto_conf(dsn: str) -> dict[str, str]:
    """The settings postgresql.auto.conf holds now (name -> value as written)."""
    with _connect(dsn) as conn:
        rows = conn.execute(
            "select name, setting from pg_file_settings"
            " where sourcefile like '%/postgresql.auto.conf' order by seqno").fetchall()
    return {str(name): str(value) for name, value in rows}


def reload_and_wait(dsn: str) -> None:
    """pg_reload_conf(), then wait until a new session sees the reloaded configuration."""
    with _connect(dsn) as conn:
        row = conn.execute("select pg_conf_load_time()").fetchone()
        before = row[0] if row else None
        conn.execute("select pg_reload_conf()")
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while True:
        with _connect(dsn) as conn:
            row = conn.execute("select pg_conf_load_time()").fetchone()
        if row is not None and before is not None and row[0] > before:
            return
        if time.monotonic() > deadline:
            raise ServerError(f"the server did not reload its configuration in "
                              f"{RELOAD_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def check_reloadable(dsn: str, names: list[str]) -> None:
    """UsageError for a setting that needs a restart (or does not exist)."""
    if not names:
        return
    with _connect(dsn) as conn:
        rows = dict(conn.execute("select name, context from pg_settings where name = any(%s)",
                                 (names,)).fetchall())
    for name in names:
        if name not in rows:
            raise UsageError(f"unknown server setting {name!r} in the experiment spec")
        if rows[name] not in _RELOADABLE:
            raise UsageError(f"setting {name} needs a server restart ({rows[name]}); "
                             "the lab only changes settings a reload applies")


def remember(dsn: str, names: list[str]) -> dict[str, str | None]:
    """What auto.conf holds for each name now (None: absent), for `restore`."""
    check_reloadable(dsn, names)
    had = auto_conf(dsn)
    return {name: had.get(name) for name in names}


def apply(dsn: str, gucs: dict[str, str]) -> None:
    """ALTER SYSTEM SET each setting and reload (`remember` them first)."""
    if not gucs:
        return
    try:
        with _connect(dsn) as conn:
            for name, value in gucs.items():
                conn.execute(f"alter system set {_ident(name)} = {_literal(value)}")
    finally:
        reload_and_wait(dsn)


def restore(dsn: str, previous: dict[str, str | None]) -> None:
    """Put auto.conf back as `apply` found it, and reload."""
    if not previous:
        return
    with _connect(dsn) as conn:
        for name, value in previous.items():
            if value is None:
                conn.execute(f"alter system reset {_ident(name)}")
            else:
                conn.execute(f"alter system set {_ident(name)} = {_literal(value)}")
    reload_and_wait(dsn)


def _ident(name: str) -> str:
    if not name.replace("_", "").replace(".", "").isalnum():
        raise UsageError(f"not a setting name: {name!r}")
    return name


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
