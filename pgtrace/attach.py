"""Run a tracing session against a cluster: the loop behind `pgtrace attach`."""

from __future__ import annotations

import platform
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import pandas as pd

from pgtrace import __version__
from pgtrace.aggregate import concat, summary
from pgtrace.collect.activity import locate_activity
from pgtrace.collect.frame import Fingerprints, TrancheNames, records_frame, runq_frame
from pgtrace.collect.loader import ProgramConfig, check_root
from pgtrace.collect.session import TraceSession
from pgtrace.collect.waitevent import io_contexts, locate_wait_event_info
from pgtrace.errors import Interrupted, TargetError, UsageError
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
class RunResult:
    """Everything a finished attach produced."""

    target: Target
    frame: pd.DataFrame
    summary: dict[str, Any]
    header: dict[str, Any]
    texts: dict[str, str] = field(default_factory=dict)
    client_runq: pd.DataFrame = field(default_factory=pd.DataFrame)


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


def _header(target: Target, opts: AttachOptions, t0: float, counters: dict[str, int],
            texts: dict[str, str]) -> dict[str, Any]:
    return {
        "tool": f"pgtrace {__version__}",
        "cluster": {
            "data_dir": target.data_dir,
            "port": target.port,
            "postmaster_pid": target.postmaster_pid,
            "binary": target.binary,
        },
        "server_version": target.version,
        "kernel": platform.release(),
        "host": platform.node(),
        "started_wall": t0,
        "pids": opts.pids,
        "counters": counters,
        "query_texts": texts if opts.query_text else {},
    }


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
    out: dict[str, Any] = {"rfq_uprobe": settings.get("ssl", "off") == "on"}
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


def run_attach(
    opts: AttachOptions,
    on_interval: Callable[[pd.DataFrame, float], None] | None = None,
    on_ready: Callable[[TraceSession], None] | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> RunResult:
    """Trace until duration, count intervals, or a signal; detach always."""
    check_root()
    target, seed, follow = resolve_targets(opts.pids)
    settings = server_settings(target.binary, target.postmaster_pid, target.data_dir)
    session = TraceSession(
        binary=target.binary,
        postmaster_pid=target.postmaster_pid,
        pids=seed,
        follow_forks=follow,
        config=ProgramConfig.for_sync_method(
            settings.get("wal_sync_method"),
            query_len=opts.query_len,
            stacks=opts.stacks,
            **_activity_constants(target, settings),
            **_engine_constants(target, settings, opts),
        ),
        sample_hz=opts.stack_hz,
    )
    fps = Fingerprints()
    tranches = TrancheNames(lambda: [target.postmaster_pid, *session.tracked_pids()],
                            major=target.major)
    frames: list[pd.DataFrame] = []
    interval_frames: list[pd.DataFrame] = []
    stop = _Stop()
    wall0 = time.time()

    def convert() -> None:
        raw = session.drain()
        if raw:
            f = records_frame(raw, query_len=opts.query_len, tranches=tranches,
                              fingerprints=fps, keep_text=opts.query_text)
            frames.append(f)
            interval_frames.append(f)

    sampler = Sampler(opts.dsn, opts.sample_interval)
    with _signals(stop):
        session.start()
        try:
            sampler.start()
            if stop.stopped:  # Ctrl-C/SIGTERM while compiling or attaching: no report
                raise Interrupted("interrupted before tracing started: every probe is "
                                  "detached, nothing was written")
            t0 = time.monotonic()
            next_tick = t0 + opts.interval if opts.interval else None
            ticks = 0
            if on_ready is not None:
                on_ready(session)
            while not stop.stopped and not (stop_when is not None and stop_when()):
                now = time.monotonic()
                if opts.duration is not None and now - t0 >= opts.duration:
                    break
                session.poll(100)
                if session.pending >= SPOOL_RECORDS:
                    convert()
                if next_tick is not None and time.monotonic() >= next_tick:
                    convert()
                    if on_interval is not None:
                        on_interval(concat(interval_frames), opts.interval or 0.0)
                    interval_frames.clear()
                    ticks += 1
                    next_tick += opts.interval or 0.0
                    if opts.count is not None and ticks >= opts.count:
                        break
            elapsed = time.monotonic() - t0
            session.poll(0)
            convert()
            counters = session.counters()
            client_runq = runq_frame(session.client_runq())
            checkpoints = session.checkpoints()
            oncpu, offcpu = session.folded_stacks()
        finally:
            sampler.stop()
            session.close()
    df = concat(frames)
    summ = summary(df, lost=counters.get("lost", 0), unmatched=counters.get("unmatched", 0),
                   duration_s=elapsed)
    header = _header(target, opts, wall0, counters, fps.texts)
    header["settings"] = settings
    header["engine"] = engine_modes(session.config)
    header["timeline"] = sampler.samples
    header["checkpoints"] = checkpoints
    if opts.stacks:
        header["stacks"] = {"oncpu": oncpu, "offcpu": offcpu, "hz": opts.stack_hz}
    if sampler.error:
        header["timeline_error"] = sampler.error
    header["duration_s"] = elapsed
    header["lost"] = counters.get("lost", 0)
    header["unmatched"] = counters.get("unmatched", 0)
    return RunResult(target=target, frame=df, summary=summ, header=header, texts=fps.texts,
                     client_runq=client_runq)



T = TypeVar("T")


def trace_during(
    opts: AttachOptions, workload: Callable[[TraceSession], T]
) -> tuple[RunResult, T]:
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
