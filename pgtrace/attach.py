"""Run a tracing session against a cluster: the loop behind `pgtrace attach`."""

from __future__ import annotations

import os
import platform
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar, cast

import pandas as pd

from pgtrace import __version__
from pgtrace.aggregate import concat, summary
from pgtrace.capture import ClusterInfo, Header, Lifecycle, Stacks
from pgtrace.collect.activity import locate_activity, state_running
from pgtrace.collect.frame import Fingerprints, TrancheNames, records_frame, runq_frame
from pgtrace.collect.loader import ProgramConfig, check_root
from pgtrace.collect.session import TraceSession
from pgtrace.collect.waitevent import io_contexts, locate_wait_event_info
from pgtrace.errors import Interrupted, PgtraceError, TargetError, UsageError
from pgtrace.sampler import Sampler
from pgtrace.settings import server_settings
from pgtrace.target import Target, find_target

#: Records are kept as read (raw) while tracing and turned into a DataFrame at
#: each live interval, at the end, or once this many are pending (~260 MB at the
#: default query length): converting costs ~0.6 us a record, which then runs
#: beside the traced server only on long runs without live lines.
SPOOL_RECORDS = 500_000


@dataclass
class AttachOptions:
    """What to trace and for how long."""

    pids: list[int]
    duration: float | None = None
    interval: float | None = None
    count: int | None = None
    query_text: bool = False
    query_len: int = 128
    dsn: str | None = None          # for the timeline's server counters
    sample_interval: float = 1.0
    stacks: bool = False            # on/off-CPU stacks for flame graphs
    stack_hz: int = 99
    lwlock_probes: bool = False     # LWLock waits from USDT probes, not wait events


@dataclass
class AttachResult:
    """Everything a finished attach produced."""

    target: Target
    frame: pd.DataFrame
    summary: dict[str, Any]
    header: Header
    texts: dict[str, str] = field(default_factory=dict)
    client_runq: pd.DataFrame = field(default_factory=pd.DataFrame)
    ended: str | None = None        # why tracing ended early (the postmaster exited)
    conversion_s: float = 0.0       # turning the last records into the report, after the window

    def since_window_end(self) -> float:
        """Seconds since the probes were detached (the window's end)."""
        end = (self.header.get("window_ns") or [0, 0])[1]
        return (time.monotonic_ns() - end) / 1e9 if end else 0.0


def resolve_targets(pids: list[int]) -> tuple[Target, list[int], bool]:
    """The cluster, the pids to seed, and whether to follow the postmaster's forks."""
    if not pids:
        raise UsageError("give -p/--pid: the postmaster's pid, or backend pids")
    targets = [find_target(p) for p in pids]
    target = targets[0]
    if any(t.postmaster_pid != target.postmaster_pid for t in targets):
        raise UsageError("all --pid values must belong to one cluster")
    if target.postmaster_pid in pids:
        if len(pids) > 1:
            raise UsageError("give the postmaster's pid alone, or backend pids only")
        return target, [b.pid for b in target.backends], True
    clients = set(target.client_backends())
    for p in pids:
        if p not in clients:
            raise TargetError(f"pid {p} is not a client backend of {target.data_dir}")
    return target, pids, False


class _Stop:
    """Set by SIGINT/SIGTERM: ends the loop so everything detaches."""

    def __init__(self) -> None:
        self.stopped = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True


@contextmanager
def _signals(stop: _Stop) -> Iterator[None]:
    """Route SIGINT/SIGTERM/SIGHUP to `stop` (only the main thread can take signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _activity_constants(target: Target, settings: dict[str, str]) -> dict[str, int]:
    """Read query text from the status entry where its layout checks out on live backends."""
    if settings.get("track_activities", "on") != "on":
        return {}
    found = locate_activity(target.binary, target.major, [b.pid for b in target.backends])
    if found is None:
        return {}
    return {"mybeentry_addr": found[0], "activity_raw_off": found[1]}


def _engine_constants(target: Target, settings: dict[str, str],
                      opts: AttachOptions) -> dict[str, Any]:
    """How sleeps are classified and requests ended, for this server."""
    out: dict[str, Any] = {"rfq_uprobe": settings.get("ssl", "off") == "on",
                           "state_running": state_running(target.major)}
    if not opts.lwlock_probes:
        addr = locate_wait_event_info(target.binary, target.major, target.postmaster_pid)
        if addr is not None:
            out.update(wait_event_addr=addr, io_wait_ctx=io_contexts(target.major))
    return out


def engine_modes(config: ProgramConfig) -> dict[str, str]:
    """How this session times waits and ends requests, for the capture header."""
    return {
        "lwlock_waits": "wait_event" if config.wait_event_addr else "usdt",
        "request_end": "ReadyForQuery uprobe" if config.rfq_uprobe else "send of 'Z'",
    }


#: How long a traced postmaster that exited may take to be back (same data directory)
#: before the run ends with an error.
FOLLOW_TIMEOUT_S = 60.0


def new_postmaster(data_dir: str, old_pid: int) -> int | None:
    """The pid of a postmaster other than `old_pid` that is up in `data_dir`, or None.

    postmaster.pid names it on its first line; its 8th line says "ready" once it
    accepts connections (PostgreSQL 10+).
    """
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    if len(lines) < 8 or not lines[0].strip().isdigit() or lines[7].strip() != "ready":
        return None
    pid = int(lines[0].strip())
    if pid == old_pid or not os.path.exists(f"/proc/{pid}"):
        return None
    return pid


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` exits (None: it is gone already)."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


@dataclass
class _Segment:
    """One postmaster's part of a run: its session and when its window opened and closed."""

    target: Target
    session: TraceSession
    settings: dict[str, str]
    tranches: TrancheNames
    pidfd: int | None
    attach_s: float
    start_wall: float
    end_wall: float | None = None

    def record(self) -> dict[str, Any]:
        s = self.session
        return {
            "postmaster_pid": self.target.postmaster_pid,
            "attach_s": round(self.attach_s, 3),
            "start_wall": self.start_wall,
            "end_wall": self.end_wall,
            "start_ns": s.window_start_ns,
            "end_ns": s.window_end_ns,
            "seeded_pids": s.seeded,
            "rescanned_backends": s.rescanned,
            "requests_before_window": s.before_window,
            "requests_after_window": s.after_window,
        }


class _Run:
    """The state of one attach across its segments (more than one after a restart)."""

    def __init__(self, opts: AttachOptions, status: Callable[[str], None]) -> None:
        self.opts = opts
        self.status = status
        self.fps = Fingerprints()
        self.frames: list[pd.DataFrame] = []
        self.interval_frames: list[pd.DataFrame] = []
        self.segments: list[_Segment] = []
        self.counters: dict[str, int] = {}
        self.client_runq: list[bytes] = []
        self.checkpoints: list[dict[str, int | None]] = []
        self.oncpu: list[str] = []
        self.offcpu: list[str] = []

    def open(self, target: Target, seed: list[int], follow: bool, since: float) -> _Segment:
        """Compile and attach for `target`; the window opens when everything is attached."""
        settings = server_settings(target.binary, target.postmaster_pid, target.data_dir)
        session = TraceSession(
            binary=target.binary,
            postmaster_pid=target.postmaster_pid,
            pids=seed,
            follow_forks=follow,
            config=ProgramConfig.for_sync_method(
                settings.get("wal_sync_method"),
                query_len=self.opts.query_len,
                stacks=self.opts.stacks,
                **_activity_constants(target, settings),
                **_engine_constants(target, settings, self.opts),
            ),
            stack_hz=self.opts.stack_hz,
        )
        session.prepare()  # what can fail before compiling fails here, alone
        pidfd = _pidfd(target.postmaster_pid)
        if not self.segments:
            self.status("compiling the BPF programs...")
        try:
            session.start()
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
            raise
        tranches = TrancheNames(
            lambda: [target.postmaster_pid, *session.tracked_pids()], major=target.major)
        seg = _Segment(target=target, session=session, settings=settings, tranches=tranches,
                       pidfd=pidfd, attach_s=time.monotonic() - since, start_wall=time.time())
        self.segments.append(seg)
        return seg

    def convert(self, seg: _Segment) -> None:
        """The records read so far as a frame (costs ~0.6 us a record)."""
        raw = seg.session.drain()
        if raw:
            f = records_frame(raw, query_len=self.opts.query_len, tranches=seg.tranches,
                              fingerprints=self.fps, keep_text=self.opts.query_text)
            self.frames.append(f)
            self.interval_frames.append(f)

    def close(self, seg: _Segment) -> None:
        """End the segment's window: detach, read the rest and the counters, free it all."""
        s = seg.session
        try:
            s.stop()
            if seg.end_wall is None:
                seg.end_wall = time.time()
            for k, v in s.counters().items():
                self.counters[k] = self.counters.get(k, 0) + v
            self.client_runq.append(s.client_runq())
            self.checkpoints += s.checkpoints()
            on, off = s.folded_stacks()
            self.oncpu += on
            self.offcpu += off
        finally:
            s.close()
            if seg.pidfd is not None:
                os.close(seg.pidfd)
                seg.pidfd = None

    def follow(self, old: _Segment, stop: Callable[[], bool], deadline: float) -> _Segment | None:
        """After the postmaster's exit: trace the next postmaster of the same data directory.

        None when none is up before `deadline` (or `stop()`): the run ends.
        """
        old_pm, data_dir = old.target.postmaster_pid, old.target.data_dir
        gone = time.monotonic()
        self.status(f"postmaster {old_pm} of {data_dir} exited: waiting up to "
                    f"{max(0.0, deadline - gone):.0f} s for a new postmaster there")
        woke = threading.Event()
        while not stop():
            pm = new_postmaster(data_dir, old_pm)
            if pm is not None:
                try:
                    target = find_target(pm)
                except TargetError:
                    target = None
                if target is not None and target.data_dir == data_dir:
                    try:
                        seg = self.open(target, [b.pid for b in target.backends], True, gone)
                    except PgtraceError as exc:  # e.g. it exited again meanwhile
                        self.status(f"cannot trace the new postmaster {pm}: {exc.message}")
                        return None
                    self.status(f"following the new postmaster {pm} of {data_dir}: attached "
                                f"{seg.attach_s:.1f} s after postmaster {old_pm} exited")
                    return seg
            if time.monotonic() >= deadline:
                return None
            woke.wait(0.1)
        return None


def _postmaster_exited(seg: _Segment, timeout: float) -> bool:
    """Wait up to `timeout` s for the segment's postmaster to exit; whether it did."""
    if seg.pidfd is None:  # it had exited before it could be watched
        return True
    ready, _, _ = select.select([seg.pidfd], [], [], timeout)
    return bool(ready)


def _ended_line(target: Target, followed: bool, stopped: bool) -> str:
    """Why a run ended early: its postmaster exited (and no new one was traced)."""
    why = ""
    if followed:
        why = " (stopped while waiting for a new one)" if stopped else \
            " and no new one came up"
    return (f"postmaster {target.postmaster_pid} of {target.data_dir} exited{why}: "
            "tracing ended early (what was traced is reported)")


def run_attach(
    opts: AttachOptions,
    on_interval: Callable[[pd.DataFrame, float], None] | None = None,
    on_ready: Callable[[TraceSession], None] | None = None,
    stop_when: Callable[[], bool] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> AttachResult:
    """Trace until duration, count intervals, or a signal; detach always.

    The --duration window opens once every program is attached (compiling takes
    seconds) and closes with their detaching, before the records are converted.
    `on_status` gets one line at each step of the session's life (compiling,
    attached, the postmaster's exit and the new one followed).
    """
    started, started_wall = time.monotonic(), time.time()
    status = on_status or (lambda _line: None)
    check_root()
    target, seed, follow = resolve_targets(opts.pids)
    run = _Run(opts, status)
    stop = _Stop()
    ended: str | None = None

    def stopping() -> bool:
        return stop.stopped or (stop_when is not None and stop_when())

    sampler = Sampler(opts.dsn, opts.sample_interval)
    with _signals(stop):
        seg = run.open(target, seed, follow, started)
        status(f"attached after {seg.attach_s:.1f} s")
        try:
            sampler.start()
            if stop.stopped:  # Ctrl-C/SIGTERM while compiling or attaching: no report
                raise Interrupted("interrupted before tracing started: every probe is "
                                  "detached, nothing was written")
            t0 = seg.session.window_start_ns / 1e9
            next_tick = t0 + opts.interval if opts.interval else None
            ticks = 0
            if on_ready is not None:
                on_ready(seg.session)
            while not stopping():
                now = time.monotonic()
                if opts.duration is not None and now - t0 >= opts.duration:
                    break
                if _postmaster_exited(seg, 0.1):
                    run.close(seg)
                    run.convert(seg)
                    nxt = None
                    if follow:
                        deadline = time.monotonic() + FOLLOW_TIMEOUT_S
                        if opts.duration is not None:
                            deadline = min(deadline, t0 + opts.duration)
                        nxt = run.follow(seg, stopping, deadline)
                    if nxt is None:
                        ended = _ended_line(seg.target, follow, stopping())
                        break
                    seg = nxt
                    continue
                seg.session.poll(0)
                if seg.session.pending >= SPOOL_RECORDS:
                    run.convert(seg)
                if next_tick is not None and time.monotonic() >= next_tick:
                    run.convert(seg)
                    if on_interval is not None:
                        on_interval(concat(run.interval_frames), opts.interval or 0.0)
                    run.interval_frames.clear()
                    ticks += 1
                    next_tick += opts.interval or 0.0
                    if opts.count is not None and ticks >= opts.count:
                        break
        finally:
            try:  # the window ends here: detach first, the sampler can take its time
                for s in run.segments:
                    if s.pidfd is not None or s.session.window_end_ns == 0:
                        run.close(s)
            finally:
                sampler.stop()
    stopped = seg.session.window_end_ns or time.monotonic_ns()
    elapsed = (stopped - run.segments[0].session.window_start_ns) / 1e9
    t = time.monotonic()
    run.convert(seg)
    df = concat(run.frames)
    counters = run.counters
    summ = summary(df, lost=counters.get("lost", 0), unmatched=counters.get("unmatched", 0),
                   duration_s=elapsed, counters=counters)
    conversion_s = time.monotonic() - t
    lifecycle = lifecycle_header([s.record() for s in run.segments], ended, conversion_s)
    header = capture_header(target, opts, run, started_wall, sampler, elapsed, lifecycle)
    client_runq = runq_frame(b"".join(run.client_runq))
    return AttachResult(target=target, frame=df, summary=summ, header=header,
                     texts=run.fps.texts, client_runq=client_runq, ended=ended,
                     conversion_s=conversion_s)


def capture_header(target: Target, opts: AttachOptions, run: _Run, t0: float,
                   sampler: Sampler, elapsed: float, lifecycle: Lifecycle) -> Header:
    """The capture's header: the one place it is built (`pgtrace run` adds its figures)."""
    first, counters = run.segments[0], run.counters
    header: Header = {
        "tool": f"pgtrace {__version__}",
        "cluster": ClusterInfo(data_dir=target.data_dir, port=target.port,
                               postmaster_pid=target.postmaster_pid, binary=target.binary),
        "server_version": target.version, "kernel": platform.release(),
        "host": platform.node(), "started_wall": t0, "pids": opts.pids, "counters": counters,
        "query_texts": run.fps.texts if opts.query_text else {},
        "settings": first.settings, "engine": engine_modes(first.session.config),
        "timeline": sampler.samples, "checkpoints": run.checkpoints, "duration_s": elapsed,
        "lost": counters.get("lost", 0), "unmatched": counters.get("unmatched", 0),
    }
    if opts.stacks:
        header["stacks"] = Stacks(oncpu=run.oncpu, offcpu=run.offcpu, hz=opts.stack_hz)
    if sampler.error:
        header["timeline_error"] = sampler.error
    # Header extends Lifecycle, so the union is a Header (mypy cannot merge TypedDicts)
    return cast(Header, {**header, **lifecycle})


def lifecycle_header(segments: list[dict[str, Any]], ended: str | None,
                     conversion_s: float) -> Lifecycle:
    """When tracing started and stopped, each postmaster followed, and why it ended early.

    `segments`: one _Segment.record() per postmaster traced, in order.
    """
    first, last = segments[0], segments[-1]
    out = Lifecycle(
        tracing_started_wall=first["start_wall"],
        attach_s=first["attach_s"],
        stopped_wall=last["end_wall"],
        window_ns=[first["start_ns"], last["end_ns"]],
        requests_before_window=sum(s["requests_before_window"] for s in segments),
        requests_after_window=sum(s["requests_after_window"] for s in segments),
        conversion_s=round(conversion_s, 3),
        postmasters=segments,
    )
    if ended:
        out["ended"] = ended
    return out


T = TypeVar("T")


def trace_during(
    opts: AttachOptions, workload: Callable[[TraceSession], T]
) -> tuple[AttachResult, T]:
    """Run `workload(session)` in a thread once the probes are attached; trace until it ends.

    The trace stops when the workload returns (or at opts.duration). A
    workload's exception is re-raised after the probes are detached.
    """
    ready = threading.Event()
    done = threading.Event()
    sessions: list[TraceSession] = []
    out: list[T] = []
    err: list[BaseException] = []

    def on_ready(session: TraceSession) -> None:
        sessions.append(session)
        ready.set()

    def body() -> None:
        try:
            if ready.wait(120) and sessions:
                out.append(workload(sessions[0]))
        except BaseException as exc:
            err.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    try:
        result = run_attach(opts, on_ready=on_ready, stop_when=done.is_set)
    finally:
        ready.set()
        worker.join()
    if err:
        raise err[0]
    if not out:
        raise UsageError("the workload did not start: tracing never became ready")
    return result, out[0]
