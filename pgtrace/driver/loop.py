"""The request loop: runners over connections on one epoll, on the calling thread.

A runner owns one request at a time. Closed loop: it takes its next request as soon as
the previous one has ended; open loop: request k is due at ``t0 + k / rate``. With
fewer connections than runners, a request waits for a free connection, first come
first served; otherwise runner i always uses connection i. epoll is level-triggered, so
a socket with something to read is never missed; the liveness check still reads the
sockets of requests that have waited for one to two periods of LIVENESS_S.

Per request the driver's time is on the request's path (issue 4: within 10% of pgbench
at one client), so the common case, closed loop on an own connection, is written out
in the loop itself: the next request is sent before the previous one is recorded.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pgtrace.driver.record import Progress, Record
from pgtrace.driver.wire import RequestError, Wire

LIVENESS_S = 0.5
_LIVENESS_NS = round(LIVENESS_S * 1e9)
_FOREVER = sys.maxsize


@dataclass
class Outcome:
    """What the loop leaves: the rows, the error that stopped it, the first errors."""

    rec: Record
    elapsed_s: float
    fatal: str | None = None
    first_errors: list[str] = field(default_factory=list)


def drive(wires: list[Wire], runners: int, duration_s: float | None, count: int | None,
          rate: float | None, on_progress: Callable[[Progress], None] | None) -> Outcome:
    """Run the requests until the count or the duration is reached, or a connection is lost."""
    rec = Record()
    add = rec.add
    out = Outcome(rec, 0.0)
    shared = len(wires) < runners
    quick = rate is None and not shared  # closed loop, own connections: the fast path
    free = collections.deque(wires)
    waiting: collections.deque[tuple[int, int]] = collections.deque()  # (runner, t_enqueue)
    sleeping: list[tuple[int, int]] = []  # open loop: (due, runner), a heap
    retry: collections.deque[int] = collections.deque()  # runners whose send failed
    limit = _FOREVER if count is None else count
    k = active = 0
    stop = False
    poller = select.epoll()
    by_fd = {w.fd: w for w in wires}
    for w in wires:
        poller.register(w.fd, select.EPOLLIN)
    now = time.monotonic_ns
    t0 = now()
    end = t0 + round(duration_s * 1e9) if duration_s is not None else _FOREVER

    def take(r: int) -> None:
        """Runner r's next request: sent now, queued for a connection, or due later."""
        nonlocal k
        if stop or k >= limit:
            return
        if rate is None:
            t_enq = now()
            if t_enq >= end:
                return
        else:
            t_enq = t0 + round(k * 1e9 / rate)  # runner.intended_start_ns
            if t_enq >= end:
                return
            if t_enq > now():
                k += 1
                heapq.heappush(sleeping, (t_enq, r))
                return
        k += 1
        start(r, t_enq)

    def start(r: int, t_enq: int) -> None:
        if not shared:
            send(wires[r], r, t_enq)
        elif free and not waiting:
            send(free.popleft(), r, t_enq)
        else:
            waiting.append((r, t_enq))

    def send(w: Wire, r: int, t_enq: int) -> None:
        nonlocal active
        t_send = now()
        try:
            w.send()
        except RequestError as exc:
            unsent(w, r, t_enq, t_send, exc)
            return
        w.runner = r
        w.t_enq = t_enq
        w.t_send = t_send
        active += 1

    def unsent(w: Wire, r: int, t_enq: int, t_send: int, exc: RequestError) -> None:
        """A request that could not be sent: an error; the runner goes on from the loop."""
        row(w, r, t_enq, t_send, now(), exc)
        retry.append(r)

    def row(w: Wire, r: int, t_enq: int, t_send: int, t_recv: int,
            failure: RequestError | None) -> None:
        """Record a request that ended; hand its connection to the oldest waiter."""
        add((t_enq, t_send, t_recv, w.pid, failure is None, r))
        if failure is not None:
            failed(w, failure)
        if shared:
            if waiting:
                send(w, *waiting.popleft())
            else:
                free.append(w)

    def failed(w: Wire, failure: RequestError) -> None:
        nonlocal stop
        if len(out.first_errors) < 5:
            out.first_errors.append(str(failure))
        if failure.broken:
            stop = True
            waiting.clear()
            sleeping.clear()
            if out.fatal is None:
                out.fatal = str(failure)
        if w.dead:
            forget(w)

    def forget(w: Wire) -> None:
        with contextlib.suppress(OSError):  # closed by libpq: epoll has let it go
            poller.unregister(w.fd)

    def ended(w: Wire, t_recv: int) -> None:
        nonlocal active
        active -= 1
        r = w.runner  # before row(): it may hand the connection to another runner
        row(w, r, w.t_enq, w.t_send, t_recv, w.failure)
        take(r)

    def liveness(seen: list[int]) -> None:
        """Read the sockets of requests waiting since the previous check."""
        for i, w in enumerate(wires):
            if w.busy and w.sent == seen[i] and w.check():
                ended(w, now())
            seen[i] = w.sent

    seen = [w.sent for w in wires]
    tick = t0 + _LIVENESS_NS
    report_at = t0 + 1_000_000_000 if on_progress is not None else _FOREVER
    next_tick = min(tick, report_at)
    poll = poller.poll
    for r in range(runners):
        take(r)
    t = t0
    try:
        while True:
            while retry:
                take(retry.popleft())
            if not active and not sleeping:
                break
            wait = (min(next_tick, sleeping[0][0]) if sleeping else next_tick) - t
            events = poll(wait / 1e9 if wait > 0 else 0)
            t = 0
            for fd, ev in events:
                w = by_fd[fd]
                if not w.readable(ev):
                    if w.dead:
                        forget(w)
                    continue
                t = now()
                if not quick or w.failure is not None:
                    ended(w, t)
                    continue
                # the fast path: the runner's next request goes out first
                done = (w.t_enq, w.t_send, t, w.pid, True, w.runner)
                if stop or k >= limit or (t_enq := now()) >= end:
                    active -= 1
                else:
                    k += 1
                    t_send = now()
                    try:
                        w.send()
                        w.t_enq = t_enq
                        w.t_send = t_send
                    except RequestError as exc:
                        active -= 1
                        unsent(w, w.runner, t_enq, t_send, exc)
                add(done)
            if not t or sleeping:
                t = now()  # else the last reply's stamp serves (closed loop: no schedule)
            while sleeping and sleeping[0][0] <= t:
                due, r = heapq.heappop(sleeping)
                start(r, due)
            if t >= next_tick:
                if t >= tick:
                    liveness(seen)
                    tick = t + _LIVENESS_NS
                if t >= report_at:
                    assert on_progress is not None
                    on_progress(rec.progress((t - t0) / 1e9))
                    report_at += 1_000_000_000
                next_tick = min(tick, report_at)
    finally:
        poller.close()
    out.elapsed_s = (now() - t0) / 1e9
    return out
