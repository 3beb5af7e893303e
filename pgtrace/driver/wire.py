"""One driver connection at the libpq level: a prepared request, one in flight, no event loop.

psycopg's Python-level execute costs more client CPU than the server spends on a
single-row insert; sending the prepared statement through psycopg's libpq binding
(``conn.pgconn``, nonblocking) keeps the driver within reach of pgbench.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq

from pgtrace.driver.workloads import Workload
from pgtrace.errors import ServerError

_STMT = b"pgtrace_load"
HANGUP = select.EPOLLERR | select.EPOLLHUP  # same bits as POLLERR | POLLHUP
_SESSION_ENDS = (b"FATAL", b"PANIC")  # severities after which the server closes the session
_BAD = pq.ConnStatus.BAD
# plain ints: the per-reply checks skip the enum lookups
_COMMAND_OK = int(pq.ExecStatus.COMMAND_OK)
_TUPLES_OK = int(pq.ExecStatus.TUPLES_OK)  # a custom statement that returns rows
_EMPTY_QUERY = int(pq.ExecStatus.EMPTY_QUERY)
_COPY_IN = int(pq.ExecStatus.COPY_IN)
_DONE_OK = frozenset((_COMMAND_OK, _TUPLES_OK, _EMPTY_QUERY))
_LOST = "connection to the server was lost"


def server_error_line(exc: BaseException | str) -> str:
    """A libpq/psycopg message folded into one line."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


class RequestError(Exception):
    """A request failed on the server or the connection; ``broken``: connection lost."""

    def __init__(self, message: str, broken: bool) -> None:
        super().__init__(message)
        self.broken = broken


class Wire:
    """A connection carrying one request at a time; the caller polls its socket.

    A request ends when its reply is complete (ReadyForQuery), at a FATAL or PANIC
    error (the server closes the session: no ReadyForQuery follows), or when the
    socket reports an error or hang-up before the reply is complete. ``readable``
    says whether it ended; ``failure`` then holds its error (None: it succeeded).
    The request in flight belongs to ``runner``, stamped ``t_enq`` and ``t_send``.
    """

    def __init__(self, conn: psycopg.Connection[Any], workload: Workload) -> None:
        self.conn = conn
        self.pg = conn.pgconn
        self.pid = conn.info.backend_pid
        self.formats = workload.param_formats
        self.fixed = workload.fixed_params()  # the same values every request: encoded once
        self.make: Callable[[], list[bytes | None] | bytes] = (
            workload.copy_data if workload.copy else workload.wire_params)
        self.busy = False  # a request is in flight
        self.dead = False
        self.error: RequestError | None = None  # of the reply being read
        self.failure: RequestError | None = None  # of the request that ended last
        self.runner = self.t_enq = self.t_send = 0
        self.sent = 0  # requests sent so far (the liveness check compares it)
        self.copy_sql = workload.copy_sql if workload.copy else None
        self.copy_data = b""
        if self.copy_sql is None:
            res = self.pg.prepare(_STMT, workload.prepared_sql, None)
            if res.status != pq.ExecStatus.COMMAND_OK:
                msg = res.error_message.decode("utf-8", "replace").strip()
                raise ServerError(f"cannot prepare the insert of {workload.name}: {msg}")
        self.pg.nonblocking = 1
        self.fd = self.pg.socket
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)

    def send(self) -> None:
        """Send the next request (a prepared insert, or a COPY of rows); RequestError if not."""
        pg = self.pg
        if self.dead:
            raise RequestError(_LOST, broken=True)
        params = self.fixed if self.fixed is not None else self.make()
        try:
            if isinstance(params, bytes):
                assert self.copy_sql is not None
                self.copy_data = params
                pg.send_query(self.copy_sql)
            else:
                pg.send_query_prepared(_STMT, params, self.formats)
            if pg.flush():
                self._flush()
        except psycopg.Error as exc:
            broken = pg.status == _BAD
            self.dead = self.dead or broken
            raise RequestError(server_error_line(exc), broken=broken) from None
        self.busy = True
        self.sent += 1

    def _flush(self) -> None:
        """Wait until libpq has sent everything (it reads input meanwhile: no deadlock)."""
        out = select.poll()
        out.register(self.fd, select.POLLIN | select.POLLOUT)
        while self.pg.flush():
            out.poll(1000)

    def readable(self, events: int) -> bool:
        """Read what the socket holds; True when the request in flight has ended."""
        pg = self.pg
        try:
            pg.consume_input()
            if not self.busy:
                # nothing asked: a notice, or the server ending the session
                if events & HANGUP or pg.status == _BAD:
                    pg.consume_input()  # past the last message: raises with libpq's reason
                    self._lost("")
                return False
            while not pg.is_busy():
                res = pg.get_result()
                if res is None:
                    self.busy = False
                    self.failure, self.error = self.error, None
                    return True
                if res.status not in _DONE_OK and self._unusual(res):
                    return True
            return bool(events & HANGUP) and self._drain()
        except psycopg.Error as exc:
            return self._lost(server_error_line(exc))

    def _drain(self) -> bool:
        """The socket is gone with the reply incomplete: read what is left, then end."""
        for _ in range(1000):
            if self.readable(0):  # reading past the end raises: the request ends as lost
                return True
        return self._lost("")

    def _unusual(self, res: pq.abc.PGresult) -> bool:
        """A result other than success: COPY's rows asked for, or an error (kept for the
        request's end). True when it ends the request: the session is over."""
        pg = self.pg
        if res.status == _COPY_IN:
            # the server waits for the rows: send them all and end the copy
            pg.put_copy_data(self.copy_data)
            pg.put_copy_end(None)
            self._flush()
            return False
        msg = server_error_line(res.error_message.decode("utf-8", "replace"))
        severity = res.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED)
        if severity in _SESSION_ENDS or pg.status == _BAD:
            return self._lost(msg)
        if self.error is None:
            self.error = RequestError(msg or "request failed", broken=False)
        return False

    def _lost(self, message: str) -> bool:
        """The connection is gone: fail the request in flight; True if there was one."""
        self.dead = True
        self.error = None
        ended, self.busy = self.busy, False
        if ended:
            self.failure = RequestError(message or _LOST, broken=True)
        return ended

    def check(self) -> bool:
        """Liveness of a request waiting long: read the socket if it is readable or hung up.

        True when that ended the request (see ``readable``).
        """
        if self.dead or not self.busy:
            return False
        if self.pg.status == _BAD:
            return self._lost("")
        events = self.poller.poll(0)
        return bool(events) and self.readable(events[0][1])
