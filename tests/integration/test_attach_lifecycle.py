"""An attach's life, first second to last: the real CLI against a real cluster.

- Backends that connect while pgtrace compiles (seconds) are traced: each connection's
  requests inside the window are counted, and the backends match those that
  pg_stat_activity listed meanwhile (issue 18).
- The --duration window opens when every probe is attached and closes by detaching them,
  before the records are converted: nothing is lost at 40 clients, and the process exits
  promptly after the window (issue 14, item 3).
- A postmaster restart is followed; a postmaster that stops ends the run with one line,
  the capture written and exit 7 (issue 14, item 5).

Each test runs its own cluster on a private copy of the server (--pg-bin chooses the
version), so no other pgtrace run on this machine touches its probes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psycopg
import pytest

from pgtrace.capture import read_capture
from pgtrace.cluster import TempCluster
from tests.integration.test_attach_cli import (
    PGBENCH_DEFAULT,
    Attach,
    _conn_args,
    _env,
    attaches,
    cluster_on_copy,
    src_bin,
    wait_for,
)

__all__ = ["attaches", "src_bin"]  # fixtures used here
pytestmark = [pytest.mark.root, pytest.mark.bpf]

ATTACHED = re.compile(r"^attached after (\d+\.\d) s$", re.M)
#: Client pause between requests: 24 connections of a Python thread each, without a pause,
#: would take both CPUs of the test machine from the compiler.
THINK_S = 0.003
#: Connections opened while pgtrace starts (one every 0.2 s), then 4 more once attached.
MAX_EARLY = 24
REPORT_LINE = re.compile(r"after it, converting the records took (\d+\.\d+) s and the whole "
                         r"report (\d+\.\d+) s")


@pytest.fixture
def cluster(src_bin: str) -> Iterator[TempCluster]:
    """A cluster of this test's own: some tests restart or stop it."""
    with cluster_on_copy(src_bin) as c:
        yield c


def attached_after(a: Attach) -> float:
    m = ATTACHED.search(a.stderr())
    assert m, a.stderr()
    return float(m.group(1))


# --- issue 18: connections opened while compiling --------------------------------------------


@dataclass
class Client:
    """One connection looping short requests, each stamped (CLOCK_MONOTONIC ns)."""

    opened_ns: int = 0
    pid: int = 0
    stamps: list[tuple[int, int]] = field(default_factory=list)


def run_client(dsn: str, stop: threading.Event, out: Client) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        out.opened_ns = time.monotonic_ns()
        row = c.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        out.pid = int(row[0])
        while not stop.wait(THINK_S):
            t0 = time.monotonic_ns()
            c.execute("select 1")
            out.stamps.append((t0, time.monotonic_ns()))


def sample_activity(dsn: str, stop: threading.Event, out: list[tuple[int, set[int]]]) -> None:
    """Client backends listed by pg_stat_activity, every 0.2 s: (time ns, pids)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        while not stop.wait(0.2):
            rows = c.execute("select pid from pg_stat_activity"
                             " where backend_type = 'client backend'").fetchall()
            out.append((time.monotonic_ns(), {int(r[0]) for r in rows}))


def contained(stamps: list[tuple[int, int]], records: pd.DataFrame) -> list[bool]:
    """Per client request: whether a server record lies inside its send -> reply interval."""
    starts = records["t_start"].to_numpy()
    ends = records["t_end"].to_numpy()
    out = []
    for send, recv in stamps:
        out.append(bool(((starts >= send) & (ends <= recv)).any()))
    return out


def test_connections_opened_while_compiling_are_all_counted(
    cluster: TempCluster, attaches: Callable[..., Attach], tmp_path: Path,
) -> None:
    capture = tmp_path / "run.pgtrace"
    a = attaches("-p", str(cluster.postmaster_pid), "--duration", "4", "-o", str(capture))
    stop = threading.Event()
    clients: list[Client] = []
    threads: list[threading.Thread] = []
    samples: list[tuple[int, set[int]]] = []

    def open_client() -> None:
        c = Client()
        clients.append(c)
        t = threading.Thread(target=run_client, args=(cluster.dsn, stop, c), daemon=True)
        t.start()
        threads.append(t)

    sampler = threading.Thread(target=sample_activity, args=(cluster.dsn, stop, samples),
                               daemon=True)
    sampler.start()
    try:
        # a connection every 0.2 s from the command's start until it is attached, then 4 more
        deadline = time.monotonic() + 90
        while ATTACHED.search(a.stderr()) is None:
            assert a.proc.poll() is None, a.stderr()
            assert time.monotonic() < deadline, "pgtrace did not attach within 90 s"
            if len(clients) < MAX_EARLY:
                open_client()
            time.sleep(0.2)
        for _ in range(4):
            open_client()
            time.sleep(0.2)
        rc, _out, err = a.finish(timeout=120)
    finally:
        stop.set()
        for t in [*threads, sampler]:
            t.join(30)
    assert rc == 0, err
    lines = err.splitlines()
    assert lines[0] == "compiling the BPF programs...", err
    df, header = read_capture(capture)
    start_ns, end_ns = header["window_ns"]
    seeded = set(header["postmasters"][0]["seeded_pids"])
    assert f"attached after {header['attach_s']:.1f} s" in lines, err
    assert 4.0 <= header["duration_s"] < 4.5
    assert header["counters"]["lost"] == 0

    before = [c for c in clients if c.opened_ns and c.opened_ns < start_ns]
    after = [c for c in clients if c.opened_ns >= start_ns]
    rescanned = header["postmasters"][0]["rescanned_backends"]
    detail = (f"attached after {header['attach_s']} s; {len(before)} connections opened "
              f"before, {len(after)} after; {rescanned} backends found by the re-scan; "
              f"{len(df)} requests")
    print(detail)
    # both ways a backend is found: listed once the programs run, or seen forking
    assert rescanned >= 2 and len(after) >= 2, detail
    missed: dict[int, list[int]] = {}
    for c in clients:
        inside = [(s, r) for s, r in c.stamps if s >= start_ns and r <= end_ns]
        assert inside, f"connection of backend {c.pid} made no request in the window"
        found = contained(inside, df[df["pid"] == c.pid])
        misses = [i for i, ok in enumerate(found) if not ok]
        if misses:
            missed[c.pid] = misses
    # A backend traced from its fork counts every request. One listed at attach (seeded)
    # counts all but possibly its first: idle then, its state is unknown until its first
    # ReadyForQuery (issue 14, item 2: reading st_state at attach removes this exception).
    print(f"seeded backends whose first request in the window was not counted: {len(missed)}")
    bad = {pid: m for pid, m in missed.items() if pid not in seeded or m != [0]}
    assert not bad, f"{detail}; requests not counted (index in window by backend): {bad}"

    # pg_stat_activity, sampled during the window: the same client backends, all traced
    listed = set().union(*(pids for t, pids in samples if start_ns <= t <= end_ns))
    traced = set(df["pid"].unique().tolist())
    assert listed, "no pg_stat_activity sample fell in the window"
    assert listed == traced, (f"pg_stat_activity listed {sorted(listed - traced)} not traced; "
                              f"traced {sorted(traced - listed)} not listed")


# --- issue 14 item 3: the window's end -------------------------------------------------------


def pgbench_insert(cluster: TempCluster, src_bin: str, tmp: Path, seconds: int
                   ) -> subprocess.Popen[str]:
    """40 clients of single-row inserts for `seconds` s, in the background."""
    cluster.psql("create table if not exists lc_insert"
                 " (id bigint generated always as identity primary key, v int)")
    script = tmp / "insert.sql"
    script.write_text("insert into lc_insert(v) values (1);\n")
    exe = os.path.join(src_bin, "pgbench")
    return subprocess.Popen(
        [exe if os.access(exe, os.X_OK) else PGBENCH_DEFAULT, "-n", "-c", "40", "-j", "2",
         "-T", str(seconds), "-f", str(script), *_conn_args(cluster)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


@pytest.mark.parametrize("how", ["duration", "SIGINT"])
def test_window_end_loses_nothing_and_exits_promptly(
    how: str, cluster: TempCluster, src_bin: str, attaches: Callable[..., Attach],
    tmp_path: Path,
) -> None:
    capture = tmp_path / "run.pgtrace"
    load = pgbench_insert(cluster, src_bin, tmp_path, 40)
    try:
        args = ["-p", str(cluster.postmaster_pid), "-o", str(capture)]
        a = attaches(*args, *(["--duration", "5"] if how == "duration" else []))
        wait_for(lambda: ATTACHED.search(a.stderr()) is not None, 90, "pgtrace to attach")
        seen = time.monotonic()
        if how == "duration":
            window_end = seen + 5.0  # at the latest: the window opened before it said so
        else:
            time.sleep(5)
            window_end = time.monotonic()
            a.proc.send_signal(signal.SIGINT)
        rc, _out, err = a.finish(timeout=120)
        exited = time.monotonic()
    finally:
        load.terminate()
        load.wait(30)
    assert rc == 0, err
    m = REPORT_LINE.search(err)
    assert m, err
    conversion, report = float(m.group(1)), float(m.group(2))
    _df, header = read_capture(capture)
    detail = (f"{header['counters']['requests']} requests, lost {header['counters']['lost']}; "
              f"exited {exited - window_end:.2f} s after the window's end, converting "
              f"{conversion:.2f} s, report {report:.2f} s")
    print(detail)
    assert header["counters"]["requests"] > 1000, detail
    assert header["counters"]["lost"] == 0, detail
    assert header["lost"] == 0, detail
    assert abs(header["conversion_s"] - conversion) < 0.01
    assert exited - window_end <= 2.0 + report, detail
    # every request counted ended inside the window
    assert header["window_ns"][0] <= int(_df["t_end"].min())
    assert int(_df["t_end"].max()) <= header["window_ns"][1]


# --- issue 14 item 5: postmaster restarts ------------------------------------------------------


def selects(dsn: str, n: int) -> int:
    """n requests on a new connection (none prepared: no round trip of its own); its pid."""
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as c:
        row = c.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        for _ in range(n - 1):
            c.execute("select 1")
        return int(row[0])


def test_restart_is_followed(
    cluster: TempCluster, attaches: Callable[..., Attach], tmp_path: Path,
) -> None:
    capture = tmp_path / "run.pgtrace"
    old_pm = cluster.postmaster_pid
    a = attaches("-p", str(old_pm), "-o", str(capture), "--query-text")
    a.wait_ready(90)
    first = selects(cluster.dsn, 50)
    cluster.restart()
    new_pm = cluster.postmaster_pid
    assert new_pm != old_pm
    follows = f"following the new postmaster {new_pm} of {cluster.data_dir}: attached"
    wait_for(lambda: follows in a.stderr(), 90, "pgtrace to follow the new postmaster")
    second = selects(cluster.dsn, 70)
    rc, out, err = a.finish(signal.SIGINT)
    assert rc == 0, err
    assert f"postmaster {old_pm} of {cluster.data_dir} exited" in err
    df, header = read_capture(capture)
    assert [p["postmaster_pid"] for p in header["postmasters"]] == [old_pm, new_pm]
    # both connections were opened after the programs were attached: every request counted
    counts = df.groupby("pid").size().to_dict()
    assert counts == {first: 50, second: 70}, df[["pid", "seq", "query"]].to_string()
    assert "postmaster restarts followed: 1\n" in out


def test_stopped_postmaster_ends_the_run(
    cluster: TempCluster, attaches: Callable[..., Attach], tmp_path: Path,
) -> None:
    capture = tmp_path / "run.pgtrace"
    pm = cluster.postmaster_pid
    a = attaches("-p", str(pm), "--duration", "15", "-o", str(capture))
    a.wait_ready(90)
    backend = selects(cluster.dsn, 30)
    stopped = time.monotonic()
    cluster.stop()
    rc, out, err = a.finish(timeout=120)
    assert rc == 7, err
    last = err.splitlines()[-1]
    assert last.startswith(f"pgtrace: postmaster {pm} of {cluster.data_dir} exited and no new "
                           "one came up"), err
    df, header = read_capture(capture)
    assert df.groupby("pid").size().to_dict() == {backend: 30}
    assert header["ended"] == last.removeprefix("pgtrace: ")
    assert "30 requests in" in out
    assert f"ended early: {header['ended']}\n" in out
    # it waited for a restart until the window's end, not longer
    assert time.monotonic() - stopped < 15 + 10
