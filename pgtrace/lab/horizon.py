"""Hold the xmin horizon: a session with an open transaction that has an xid (seed 004)."""

from __future__ import annotations

from typing import Any

import psycopg

from pgtrace.errors import ServerError


class HorizonHolder:
    """An open transaction with an xid: VACUUM cannot remove rows that died after it."""

    def __init__(self, dsn: str) -> None:
        try:
            self._conn: psycopg.Connection[Any] | None = psycopg.connect(
                dsn, autocommit=False, application_name="pgtrace lab horizon")
        except psycopg.Error as exc:
            raise ServerError(f"cannot connect to PostgreSQL: {exc}".splitlines()[0]) from None
        self._conn.execute("select txid_current()")  # an xid: the horizon is held from here

    def release(self) -> None:
        """Roll the transaction back and close the session; safe to call twice."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.rollback()
            finally:
                conn.close()
