"""A tracing session: load, seed the traced backends, poll the ring buffer, detach."""

from __future__ import annotations

import ctypes as ct
import dataclasses
import mmap
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pgtrace.collect.events import NCHECKPOINTS, Mode, Req, RunqEvent, Seed, event_dtype
from pgtrace.collect.loader import (
    CLIENT_RINGBUF_PAGES,
    STATE_SLOTS,
    Attachment,
    ProgramConfig,
    attach_all,
    compile_program,
    import_bcc,
    preflight,
    usdt_sites,
)
from pgtrace.collect.ringbuf import RingReader
from pgtrace.collect.stacks import folded
from pgtrace.elf.usdt import ProbeSite
from pgtrace.model import COUNTERS
from pgtrace.proc import cmdline, state, title_of
from pgtrace.target import CLIENT, backend_kind, list_backends

_WAL_NAME = re.compile(r"/pg_wal/[0-9A-F]{24}$")


def wal_fd_of(pid: int) -> int:
    """The fd of the WAL segment `pid` has open, or -1."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return -1
    for name in names:
        try:
            if _WAL_NAME.search(os.readlink(f"/proc/{pid}/fd/{name}")):
                return int(name)
        except OSError:
            continue
    return -1


def _is_client(pid: int) -> bool:
    """Whether pid is a client backend (a session), not an auxiliary process."""
    return backend_kind(title_of(cmdline(pid))) == CLIENT


def _running(pid: int) -> bool:
    return state(pid) == "R"


def _alive(pid: int) -> bool:
    return state(pid) not in ("", "Z", "X")


@dataclass
class TraceSession:
    """One attach: the BPF programs, their probes, and the records read so far."""

    binary: str
    postmaster_pid: int
    pids: list[int]
    follow_forks: bool = True
    config: ProgramConfig = field(default_factory=ProgramConfig)
    chunks: list[bytes] = field(default_factory=list)
    client_chunks: list[bytes] = field(default_factory=list)
    stack_hz: int = 99
    _att: Attachment | None = None
    _ring: RingReader | None = None
    _client_ring: RingReader | None = None
    _pending: int = 0
    _sites: dict[str, list[ProbeSite]] | None = None
    #: CLOCK_MONOTONIC ns when every probe was attached (0: not yet): records of requests
    #: that ended before are dropped, counters count from here.
    window_start_ns: int = 0
    #: when detaching began (0: still attached)
    window_end_ns: int = 0
    #: records dropped because their request ended before window_start_ns
    before_window: int = 0
    #: ... or ended after window_end_ns (while the probes were being detached)
    after_window: int = 0
    #: pids traced from user space (listed, not seen forking): seeded, then rescanned
    seeded: list[int] = field(default_factory=list)
    #: pids that were listed and traced from user space after the programs were loaded
    rescanned: int = 0
    _base: dict[str, int] = field(default_factory=dict)

    def prepare(self) -> None:
        """Every check that can fail before compiling: bcc, root, headers, tracefs, probes."""
        preflight()
        self._sites = usdt_sites(self.binary)

    def start(self) -> None:
        """Compile, seed the task map, attach probes, open the ring buffer.

        The fork and exit tracepoints run as soon as bcc has loaded the programs; the
        backends are listed (again) only then, so one forked at any time, also while
        compiling, is either listed or seen forking.
        """
        if self._sites is None:
            self.prepare()
        pm = self.postmaster_pid if self.follow_forks else 0
        cfg = dataclasses.replace(self.config, postmaster_pid=pm)
        bpf = compile_program(cfg)
        self._att = Attachment(bpf)
        try:
            self._ring = RingReader(
                bpf["events"].map_fd,
                cfg.ringbuf_pages * mmap.PAGESIZE,
                event_dtype(cfg.query_len).itemsize,
            )
            self._client_ring = RingReader(
                bpf["client_runq"].map_fd,
                CLIENT_RINGBUF_PAGES * mmap.PAGESIZE,
                ct.sizeof(RunqEvent),
            )
            self.add_pids(self.pids)
            if self.follow_forks:
                self.rescan()
            self._att = attach_all(bpf, self.binary, self.postmaster_pid, cfg, self._sites)
            if cfg.stacks:
                bcc = import_bcc()
                bpf.attach_perf_event(ev_type=bcc.PerfType.SOFTWARE,
                                      ev_config=bcc.PerfSWConfig.CPU_CLOCK,
                                      fn_name="on_cpu_sample", sample_freq=self.stack_hz)
            self._open_window()
        except BaseException:
            self.close()
            raise

    def _open_window(self) -> None:
        """Everything is attached: count from now (records and counters before are not ours)."""
        self.window_start_ns = time.monotonic_ns()
        self._base = self._raw_counters()
        self.poll(0)

    def rescan(self) -> list[int]:
        """Trace the postmaster's children not traced yet; the new pids.

        Run once the fork tracepoint is attached: a child forked before is listed here,
        one forked after is seen forking (tracked twice is harmless: never replaced).
        """
        known = set(self.tracked_pids())
        new = [b.pid for b in list_backends(self.postmaster_pid) if b.pid not in known]
        self.add_pids(new)
        self.rescanned += len(new)
        return new

    def add_pids(self, pids: Iterable[int]) -> None:
        """Trace these (already running) backends from now on.

        A pid that exited before it was in the map is taken out again (its exit
        tracepoint had nothing to untrack), so no dead pid stays traced.
        """
        added = []
        for pid in pids:
            leaf = self._leaf()
            leaf.wal_fd = wal_fd_of(pid)
            leaf.mode = Mode.ONCPU if _running(pid) else Mode.BLOCKED
            if _is_client(pid):  # a session: its state is read at its next event
                leaf.req, leaf.seed = Req.IDLE, Seed.PENDING
                leaf.acc.t_start = leaf.last_ts = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            self._track(pid, leaf)
            added.append(pid)
        for pid in added:
            if _alive(pid):
                self.seeded.append(pid)
            else:
                self._untrack(pid)

    def add_client_pids(self, pids: Iterable[int]) -> None:
        """Driver threads: their run-queue waits are reported as intervals."""
        for pid in pids:
            leaf = self._leaf()
            leaf.is_client = 1
            leaf.mode = Mode.ONCPU if _running(pid) else Mode.BLOCKED
            self._track(pid, leaf, replace=True)

    def _leaf(self) -> Any:
        assert self._att is not None
        leaf = self._att.bpf["states"].Leaf()
        leaf.wal_fd = leaf.init_fd = leaf.off_ustack = leaf.off_kstack = -1
        leaf.recv_fd = -1
        return leaf

    def _track(self, pid: int, leaf: Any, replace: bool = False) -> None:
        """What track() in pgtrace.h does, from user space: the pid's slot, else a spill."""
        assert self._att is not None
        bpf = self._att.bpf
        states, spills, tasks = bpf["states"], bpf["spills"], bpf["tasks"]
        slot = states.Key(pid & (STATE_SLOTS - 1))
        leaf.pid = pid
        cur = states[slot]
        if cur.pid == pid or cur.pid == 0:
            if cur.pid == 0 or replace:  # else already seeded by the fork tracepoint
                states[slot] = leaf
            return
        key = tasks.Key(pid)
        if key in tasks and not replace:
            return
        new = key not in tasks
        tasks[key] = leaf
        if new:
            spills[slot] = spills.Leaf(spills[slot].value + 1)

    def _untrack(self, pid: int) -> None:
        """What untrack() in pgtrace.h does, from user space."""
        assert self._att is not None
        bpf = self._att.bpf
        states, spills, tasks = bpf["states"], bpf["spills"], bpf["tasks"]
        slot = states.Key(pid & (STATE_SLOTS - 1))
        if states[slot].pid == pid:
            states[slot] = states.Leaf()
            return
        key = tasks.Key(pid)
        if key in tasks:
            del tasks[key]
            spills[slot] = spills.Leaf(max(0, spills[slot].value - 1))

    def checkpoints(self) -> list[dict[str, int | None]]:
        """Checkpoints seen since attach, oldest first: start and end ns (None: running)."""
        if self._att is None or self._att.bpf is None:
            return []
        table = self._att.bpf["checkpoints"]
        total = int(table[ct.c_int(NCHECKPOINTS)].start)
        spans = []
        for k in range(max(0, total - NCHECKPOINTS), total):
            cp = table[ct.c_int(k % NCHECKPOINTS)]
            spans.append({"start": int(cp.start), "end": int(cp.end) or None})
        return spans

    def folded_stacks(self) -> tuple[list[str], list[str]]:
        """(on-CPU, off-CPU) folded stacks so far; empty without stacks."""
        if self._att is None or self._att.bpf is None or not self.config.stacks:
            return [], []
        return folded(self._att.bpf, self.postmaster_pid)

    def client_runq(self) -> bytes:
        """Driver run-queue intervals read so far (concatenated struct runq_event)."""
        return b"".join(self.client_chunks)

    def poll(self, timeout_ms: int = 100) -> None:
        """Wait timeout_ms (records are not signalled), then read the ring buffer."""
        if timeout_ms > 0:
            time.sleep(timeout_ms / 1000)
        if self._client_ring is not None:
            runq = self._client_ring.read()
            if runq:
                self.client_chunks.append(runq)
        if self._ring is not None:
            chunk = self._in_window(self._ring.read() + self._read_deferred())
            if chunk:
                self.chunks.append(chunk)
                self._pending += len(chunk) // self._ring.record_size

    def _in_window(self, chunk: bytes) -> bytes:
        """The records of requests that ended inside the window: once every probe was
        attached, and before detaching began (one in flight at its start counts whole)."""
        if not chunk or not self.window_start_ns:
            return chunk
        a = np.frombuffer(chunk, dtype=event_dtype(self.config.query_len))
        early = a["t_end"] < self.window_start_ns
        late = a["t_end"] > self.window_end_ns if self.window_end_ns else np.zeros(len(a), bool)
        if not early.any() and not late.any():
            return chunk
        self.before_window += int(early.sum())
        self.after_window += int((late & ~early).sum())
        return a[~(early | late)].tobytes()

    def _read_deferred(self) -> bytes:
        """Records the ring buffer refused, handed over through the `deferred` map."""
        assert self._att is not None and self._att.bpf is not None
        table = self._att.bpf["deferred"]
        out = []
        for key in list(table.keys()):
            try:
                leaf = table[key]
            except KeyError:
                continue
            out.append(ct.string_at(ct.addressof(leaf), ct.sizeof(leaf)))
            del table[key]
        return b"".join(out)

    @property
    def pending(self) -> int:
        """Records read and not yet drained."""
        return self._pending

    def drain(self) -> bytes:
        """The records read since the last drain, concatenated."""
        out = b"".join(self.chunks)
        self.chunks.clear()
        self._pending = 0
        return out

    def counters(self) -> dict[str, int]:
        """Kernel-side counters summed over CPUs, since every probe was attached."""
        raw = self._raw_counters()
        return {k: v - self._base.get(k, 0) for k, v in raw.items()}

    def _raw_counters(self) -> dict[str, int]:
        if self._att is None or self._att.bpf is None:
            return {}
        table = self._att.bpf["counters"]
        out: dict[str, int] = {}
        for i, name in enumerate(COUNTERS):
            out[name] = int(sum(table[ct.c_int(i)]))
        out["missed"] = self._recursion_misses()
        return out

    def _recursion_misses(self) -> int:
        """Program runs the kernel skipped (a program already running on that CPU)."""
        assert self._att is not None and self._att.bpf is not None
        total = 0
        for fn in self._att.bpf.funcs.values():
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("recursion_misses:"):
                    total += int(line.split()[1])
        return total

    def tracked_pids(self) -> list[int]:
        """Pids currently in the task map."""
        if self._att is None or self._att.bpf is None:
            return []
        bpf = self._att.bpf
        in_slots = [int(v.pid) for v in bpf["states"].values() if v.pid]
        return in_slots + [int(k.value) for k in bpf["tasks"]]

    def stop(self) -> None:
        """End the window: detach every program (nothing more is recorded, the server pays
        nothing more), then read what the ring buffer still holds. Counters, checkpoints
        and stacks stay readable until close()."""
        if self._att is not None and not self.window_end_ns:
            self.window_end_ns = time.monotonic_ns()
            self._att.stop()
        self.poll(0)

    def close(self) -> None:
        """Detach everything; idempotent."""
        for ring in (self._ring, self._client_ring):
            if ring is not None:
                ring.close()
        self._ring = self._client_ring = None
        if self._att is not None:
            self._att.detach()
            self._att = None

    def __enter__(self) -> TraceSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
