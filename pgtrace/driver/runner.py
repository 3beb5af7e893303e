"""Load runner: N logical runners over M autocommit psycopg connections on one event loop.

Closed loop by default (each runner issues its next request when the previous one
returns); open loop at a fixed total ``rate`` where request k is due at
``t0 + k / rate`` and latency counts from that intended start (no coordinated
omission). Every request gets CLOCK_MONOTONIC ns stamps: ``t_enqueue`` (intended or
actual start), ``t_send`` (connection acquired, just before execute), ``t_recv``
(reply or error received), plus the connection's backend pid.
"""

from __future__ import annotations

import asyncio
import collections
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import uvloop
from psycopg import pq

from pgtrace.driver.workloads import Workload
from pgtrace.errors import ServerError, UsageError

COLUMNS = ("t_enqueue", "t_send", "t_recv", "pid", "ok", "runner")


@dataclass
class Progress:
    """Counts since the start of the run, reported about once a second."""

    elapsed_s: float
    requests: int
    errors: int
    tps: float  # over the last interval
    p50_ms: float
    p99_ms: float


@dataclass
class LoadResult:
    """Per-request frame, wall duration, and the error that stopped the run (if any)."""

    frame: pd.DataFrame
    duration_s: float
    fatal: str | None = None
    first_errors: list[str] = field(default_factory=list)


def intended_start_ns(t0_ns: int, rate: float, k: int) -> int:
    """Open-loop schedule: request k is due at t0 + k / rate seconds."""
    return t0_ns + round(k * 1e9 / rate)


def server_error_line(exc: BaseException | str) -> str:
    """A libpq/psycopg message folded into one line."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


@dataclass
class _Rec:
    t_enqueue: list[int] = field(default_factory=list)
    t_send: list[int] = field(default_factory=list)
    t_recv: list[int] = field(default_factory=list)
    pid: list[int] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    runner: list[int] = field(default_factory=list)


class RequestError(Exception):
    """A request failed on the server or the connection; ``broken``: connection lost."""

    def __init__(self, message: str, broken: bool) -> None:
        super().__init__(message)
        self.broken = broken


_STMT = b"pgtrace_load"
# a request still waiting for its reply after one to two periods gets its socket checked
LIVENESS_S = 0.5
_HANGUP = select.POLLERR | select.POLLHUP
_SESSION_ENDS = (b"FATAL", b"PANIC")  # severities after which the server closes the session
# plain ints: the per-reply checks skip the enum lookups
_COMMAND_OK = int(pq.ExecStatus.COMMAND_OK)
_TUPLES_OK = int(pq.ExecStatus.TUPLES_OK)  # a custom statement that returns rows
_EMPTY_QUERY = int(pq.ExecStatus.EMPTY_QUERY)
_COPY_IN = int(pq.ExecStatus.COPY_IN)
_DONE_OK = frozenset((_COMMAND_OK, _TUPLES_OK, _EMPTY_QUERY))


class _Wire:
    """One connection driven at the libpq level: prepared insert, one request in flight.

    psycopg's Python-level execute costs more client CPU than the server spends on a
    single-row insert; sending the prepared statement through psycopg's libpq binding
    (``conn.pgconn``) keeps the driver within reach of pgbench.

    A request ends when the reply is complete or the connection is lost. The loop's
    reader callback normally sees both, but an event loop may drop it: on a socket
    error (POLLERR, e.g. the backend exited with our next request unread) uvloop runs
    the reader once and then closes its watcher for good. So a FATAL error ends the
    request at once (no ReadyForQuery follows), and ``check``, called by the run's
    watchdog for requests waiting longer than LIVENESS_S, looks at the socket itself.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any], workload: Workload,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.pg = conn.pgconn
        self.pid = conn.info.backend_pid
        self.loop = loop
        self.formats = workload.param_formats
        self.fut: asyncio.Future[None] | None = None
        self.error: RequestError | None = None
        self.dead = False
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
        loop.add_reader(self.fd, self._readable)

    def close(self) -> None:
        """Stop watching the socket."""
        self.loop.remove_reader(self.fd)

    def _finish(self, error: RequestError | None) -> None:
        fut, self.fut = self.fut, None
        if fut is None or fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    def _lost(self, message: str) -> None:
        """The connection is gone: stop watching it and fail the request in flight."""
        if not self.dead:
            self.dead = True
            self.loop.remove_reader(self.fd)
        self.error = None
        self._finish(RequestError(message or "connection to the server was lost", broken=True))

    def _readable(self) -> None:
        pg = self.pg
        try:
            pg.consume_input()
            if self.fut is None:
                # nothing asked: a notice, or the server ending the session
                if self._hung_up():
                    pg.consume_input()  # past the last message: raises with libpq's reason
                    self._lost("")
                return
            while not pg.is_busy():
                res = pg.get_result()
                if res is None:
                    error, self.error = self.error, None
                    self._finish(error)
                    return
                status = res.status
                if status in _DONE_OK:
                    continue
                if status == _COPY_IN:
                    # the server waits for the rows: send them all and end the copy
                    pg.put_copy_data(self.copy_data)
                    pg.put_copy_end(None)
                    while pg.flush():
                        pass
                    continue
                msg = server_error_line(res.error_message.decode("utf-8", "replace"))
                severity = res.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED)
                if severity in _SESSION_ENDS or pg.status == pq.ConnStatus.BAD:
                    self._lost(msg)
                    return
                if self.error is None:
                    self.error = RequestError(msg or "request failed", broken=False)
        except psycopg.Error as exc:
            self._lost(server_error_line(exc))

    def _hung_up(self) -> bool:
        events = self.poller.poll(0)
        return bool(events and events[0][1] & _HANGUP) or self.pg.status == pq.ConnStatus.BAD

    def check(self) -> None:
        """Liveness of a request waiting long: end it if the connection is gone.

        Reads whatever the socket holds (as the reader callback would) when it is readable
        or hung up, so a lost reader callback costs at most a watchdog period.
        """
        if self.dead or self.fut is None:
            return
        if self.pg.status == pq.ConnStatus.BAD:
            self._lost("")
        elif self.poller.poll(0):
            self._readable()

    async def execute(self, params: list[bytes | None] | bytes) -> None:
        """Send one request (a prepared insert, or a COPY of rows) and wait for its reply."""
        pg = self.pg
        if self.dead:
            raise RequestError("connection to the server was lost", broken=True)
        try:
            if isinstance(params, bytes):
                assert self.copy_sql is not None
                self.copy_data = params
                pg.send_query(self.copy_sql)
            else:
                pg.send_query_prepared(_STMT, params, self.formats)
            while pg.flush():
                await asyncio.sleep(0)
        except psycopg.Error as exc:
            broken = pg.status == pq.ConnStatus.BAD
            if broken and not self.dead:
                self.dead = True
                self.loop.remove_reader(self.fd)
            raise RequestError(server_error_line(exc), broken=broken) from None
        self.fut = self.loop.create_future()
        await self.fut


async def _watch(wires: list[_Wire], period_s: float) -> None:
    """Every period, check the wires whose request has been waiting since the last one."""
    seen: list[asyncio.Future[None] | None] = [None] * len(wires)
    while True:
        await asyncio.sleep(period_s)
        for i, w in enumerate(wires):
            fut = w.fut
            if fut is not None and fut is seen[i]:
                w.check()
            seen[i] = fut


class _FairPool:
    """Connections handed to waiting runners strictly first come, first served."""

    def __init__(self, items: list[_Wire]) -> None:
        self.free: collections.deque[_Wire] = collections.deque(items)
        self.waiters: collections.deque[asyncio.Future[_Wire]] = collections.deque()

    async def acquire(self) -> _Wire:
        """The next free connection; queue behind earlier waiters."""
        if self.free and not self.waiters:
            return self.free.popleft()
        fut: asyncio.Future[_Wire] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return await fut

    def release(self, item: _Wire) -> None:
        """Hand the connection to the oldest waiter, or keep it free."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(item)
                return
        self.free.append(item)


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
    except psycopg.Error as exc:
        raise ServerError(f"cannot connect to PostgreSQL: {server_error_line(exc)}") from None


async def run_load_async(
    dsn: str,
    workload: Workload,
    *,
    runners: int = 8,
    connections: int | None = None,
    duration_s: float | None = 10.0,
    count: int | None = None,
    rate: float | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> LoadResult:
    """Run the workload; the table must already exist (see Workload.setup)."""
    m = runners if connections is None else connections
    if runners < 1 or m < 1:
        raise UsageError("--runners and --connections must be >= 1")
    if rate is not None and rate <= 0:
        raise UsageError("--rate must be > 0")
    if count is None and duration_s is None:
        raise UsageError("give --duration or --count")
    m = min(m, runners)
    conns = list(await asyncio.gather(*(_connect(dsn) for _ in range(m)),
                                      return_exceptions=True))
    failed = [c for c in conns if isinstance(c, BaseException)]
    good = [c for c in conns if isinstance(c, psycopg.AsyncConnection)]
    if failed:
        for c in good:
            await c.close()
        raise failed[0]
    loop = asyncio.get_running_loop()
    wires: list[_Wire] = []
    watchdog: asyncio.Task[None] | None = None
    try:
        for c in good:
            wires.append(_Wire(c, workload, loop))
        watchdog = asyncio.create_task(_watch(wires, LIVENESS_S))
        return await _drive(wires, workload, runners, duration_s, count, rate, on_progress)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for w in wires:
            w.close()
        for c in good:
            await c.close()


async def _drive(
    conns: list[_Wire],
    workload: Workload,
    runners: int,
    duration_s: float | None,
    count: int | None,
    rate: float | None,
    on_progress: Callable[[Progress], None] | None,
) -> LoadResult:
    params: Callable[[], list[bytes | None] | bytes] = (
        workload.copy_data if workload.copy else workload.wire_params
    )
    rec = _Rec()
    shared = len(conns) < runners
    pool = _FairPool(conns)
    state = {"next": 0, "stop": False}
    fatal: list[str] = []
    first_errors: list[str] = []
    now = time.monotonic_ns
    t0 = now()
    deadline = t0 + round(duration_s * 1e9) if duration_s is not None else None
    limit = count

    async def runner(idx: int) -> None:
        own = None if shared else conns[idx]
        while not state["stop"]:
            k = state["next"]
            if limit is not None and k >= limit:
                return
            state["next"] = k + 1
            if rate is not None:
                t_enq = intended_start_ns(t0, rate, k)
                if deadline is not None and t_enq >= deadline:
                    return
                delay = t_enq - now()
                if delay > 0:
                    await asyncio.sleep(delay / 1e9)
            else:
                t_enq = now()
                if deadline is not None and t_enq >= deadline:
                    return
            conn = own if own is not None else await pool.acquire()
            t_send = now()
            ok = True
            try:
                await conn.execute(params())
            except RequestError as exc:
                ok = False
                if len(first_errors) < 5:
                    first_errors.append(str(exc))
                if exc.broken:
                    state["stop"] = True
                    if not fatal:
                        fatal.append(str(exc))
            t_recv = now()
            if own is None:
                pool.release(conn)
            rec.t_enqueue.append(t_enq)
            rec.t_send.append(t_send)
            rec.t_recv.append(t_recv)
            rec.pid.append(conn.pid)
            rec.ok.append(ok)
            rec.runner.append(idx)

    async def progress() -> None:
        assert on_progress is not None
        seen = 0
        while True:
            await asyncio.sleep(1.0)
            n = len(rec.t_recv)
            lat = np.asarray(rec.t_recv[seen:n], dtype=np.int64) - np.asarray(
                rec.t_enqueue[seen:n], dtype=np.int64)
            p50, p99 = (np.percentile(lat, [50, 99]) / 1e6) if len(lat) else (0.0, 0.0)
            on_progress(Progress((now() - t0) / 1e9, n, rec.ok.count(False), n - seen,
                                 float(p50), float(p99)))
            seen = n

    ticker = asyncio.create_task(progress()) if on_progress is not None else None
    try:
        await asyncio.gather(*(runner(i) for i in range(runners)))
    finally:
        if ticker is not None:
            ticker.cancel()
    elapsed = (now() - t0) / 1e9
    frame = pd.DataFrame({
        "t_enqueue": np.asarray(rec.t_enqueue, dtype=np.int64),
        "t_send": np.asarray(rec.t_send, dtype=np.int64),
        "t_recv": np.asarray(rec.t_recv, dtype=np.int64),
        "pid": np.asarray(rec.pid, dtype=np.int32),
        "ok": np.asarray(rec.ok, dtype=bool),
        "runner": np.asarray(rec.runner, dtype=np.int32),
    })
    return LoadResult(frame, elapsed, fatal[0] if fatal else None, first_errors)


def run_load(dsn: str, workload: Workload, **kwargs: Any) -> LoadResult:
    """Synchronous wrapper around run_load_async (its own uvloop event loop).

    uvloop costs the driver less CPU per request than asyncio's loop (issue 4's speed
    target); the run does not depend on its reader callbacks firing after a socket error.
    """
    return uvloop.run(run_load_async(dsn, workload, **kwargs))
