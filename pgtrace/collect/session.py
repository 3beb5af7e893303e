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

from pgtrace.collect.events import NCHECKPOINTS, RunqEvent, event_dtype
from pgtrace.collect.loader import (
    CLIENT_RINGBUF_PAGES,
    STATE_SLOTS,
    Attachment,
    ProgramConfig,
    attach_all,
    compile_program,
    import_bcc,
)
from pgtrace.collect.ringbuf import RingReader
from pgtrace.collect.stacks import folded
from pgtrace.model import COUNTERS
from pgtrace.target import CLIENT, backend_kind, title_of

MODE_ONCPU, MODE_BLOCKED = 0, 2
#: REQ_IDLE and SEED_PENDING (pgtrace.h): an existing backend's state is read at its next event
REQ_IDLE, SEED_PENDING = 1, 1
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
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return backend_kind(title_of(f.read())) == CLIENT
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, IndexError):
        return False


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
    sample_hz: int = 99
    _att: Attachment | None = None
    _ring: RingReader | None = None
    _client_ring: RingReader | None = None
    _pending: int = 0

    def start(self) -> None:
        """Compile, seed the task map, attach probes, open the ring buffer."""
        pm = self.postmaster_pid if self.follow_forks else 0
        cfg = dataclasses.replace(self.config, postmaster_pid=pm)
        bpf = compile_program(cfg)
        self._att = Attachment(bpf)
        try:
            self.add_pids(self.pids)
            self._att = attach_all(bpf, self.binary, self.postmaster_pid, cfg)
            self._ring = RingReader(
                bpf["events"].map_fd,
                cfg.ringbuf_pages * mmap.PAGESIZE,
                event_dtype(cfg.query_len).itemsize,
            )
            if cfg.stacks:
                bcc = import_bcc()
                bpf.attach_perf_event(ev_type=bcc.PerfType.SOFTWARE,
                                      ev_config=bcc.PerfSWConfig.CPU_CLOCK,
                                      fn_name="on_cpu_sample", sample_freq=self.sample_hz)
            self._client_ring = RingReader(
                bpf["client_runq"].map_fd,
                CLIENT_RINGBUF_PAGES * mmap.PAGESIZE,
                ct.sizeof(RunqEvent),
            )
        except BaseException:
            self.close()
            raise

    def add_pids(self, pids: Iterable[int]) -> None:
        """Trace these (already running) backends from now on."""
        for pid in pids:
            leaf = self._leaf()
            leaf.wal_fd = wal_fd_of(pid)
            leaf.mode = MODE_ONCPU if _running(pid) else MODE_BLOCKED
            if _is_client(pid):  # a session: its state is read at its next event
                leaf.req, leaf.seed = REQ_IDLE, SEED_PENDING
                leaf.acc.t_start = leaf.last_ts = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            self._track(pid, leaf)

    def add_client_pids(self, pids: Iterable[int]) -> None:
        """Driver threads: their run-queue waits are reported as intervals."""
        for pid in pids:
            leaf = self._leaf()
            leaf.is_client = 1
            leaf.mode = MODE_ONCPU if _running(pid) else MODE_BLOCKED
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
            chunk = self._ring.read() + self._read_deferred()
            if chunk:
                self.chunks.append(chunk)
                self._pending += len(chunk) // self._ring.record_size

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
        """Kernel-side counters summed over CPUs."""
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
