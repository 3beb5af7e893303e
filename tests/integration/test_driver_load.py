"""`pgtrace load` against a live cluster: every workload, queueing, open loop, bad input."""

from __future__ import annotations

import json
import os
import select
import struct
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from pgtrace.driver import runner
from pgtrace.driver import wire as wire_mod
from pgtrace.driver.command import load
from pgtrace.driver.runner import run_load
from pgtrace.driver.wire import RequestError, Wire
from pgtrace.driver.workloads import WORKLOADS, get_workload
from pgtrace.errors import ServerError

pytestmark = pytest.mark.root

Conn = psycopg.Connection[tuple[Any, ...]]


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(load, ["-q", *args])


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_each_workload(name: str, dsn: str, conn: Conn, tmp_path: Path) -> None:
    table = WORKLOADS[name].table
    conn.execute(f"drop table if exists {table}")
    out = tmp_path / "s.json"
    res = _invoke(["--dsn", dsn, "--workload", name, "--runners", "4", "--connections", "4",
                   "--duration", "2", "--payload-bytes", "32", "--summary-json", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())
    assert s["requests"] > 0 and s["errors"] == 0
    assert 1.9 < s["duration_s"] < 3.0
    assert s["tps"] == pytest.approx(s["requests"] / s["duration_s"])
    c = s["client_ns"]
    assert 0 < c["p50"] <= c["p99"] <= c["p999"] <= c["max"]
    row = conn.execute(f"select count(*), min(length(payload)) from {table}").fetchone()
    assert row == (s["requests"], 32)
    assert f"{s['requests']} requests, 0 errors" in res.output
    if name == "insert-uuidv7":
        row = conn.execute(f"select count(*) from {table} where substr(id::text, 15, 1) = '7'"
                           " and substr(id::text, 20, 1) in ('8', '9', 'a', 'b')").fetchone()
        assert row == (s["requests"],)
    conn.execute(f"drop table {table}")


def test_drop_flag(dsn: str, conn: Conn) -> None:
    res = _invoke(["--dsn", dsn, "--workload", "insert-uuidv4", "--count", "50", "--drop"])
    assert res.exit_code == 0, res.output
    assert "50 requests, 0 errors" in res.output
    row = conn.execute("select to_regclass('pgtrace_insert_uuidv4')").fetchone()
    assert row == (None,)


def test_frame_columns_and_pids(dsn: str, conn: Conn) -> None:
    w = get_workload("insert-bigint")
    conn.execute(f"drop table if exists {w.table}")
    w.setup(conn)
    r = run_load(dsn, w, runners=4, connections=4, duration_s=None, count=400)
    df = r.frame
    assert list(df.columns) == ["t_enqueue", "t_send", "t_recv", "pid", "ok", "runner"]
    assert len(df) == 400 and bool(df["ok"].all())
    assert ((df["t_enqueue"] <= df["t_send"]) & (df["t_send"] < df["t_recv"])).all()
    assert df["pid"].nunique() == 4 and set(df["runner"]) == {0, 1, 2, 3}
    server_pids = {int(p[0]) for p in conn.execute(
        "select pid from pg_stat_activity where backend_type = 'client backend'").fetchall()}
    assert conn.info.backend_pid in server_pids  # pids are real backend pids
    w.teardown(conn)


def test_queue_wait_when_runners_exceed_connections(dsn: str, conn: Conn) -> None:
    w = get_workload("insert-bigint")
    conn.execute(f"drop table if exists {w.table}")
    w.setup(conn)
    even = run_load(dsn, w, runners=2, connections=2, duration_s=2.0).frame
    queued = run_load(dsn, w, runners=8, connections=2, duration_s=2.0).frame
    w.teardown(conn)
    wait_even = (even["t_send"] - even["t_enqueue"]).median()
    wait_q = (queued["t_send"] - queued["t_enqueue"]).median()
    service_q = (queued["t_recv"] - queued["t_send"]).median()
    assert queued["pid"].nunique() == 2 and queued["runner"].nunique() == 8
    # 8 runners on 2 connections: each request waits for ~3 others per connection
    assert wait_q > 1.5 * service_q
    assert wait_q > 20 * max(wait_even, 1000)


def test_open_loop_rate(dsn: str, conn: Conn, tmp_path: Path) -> None:
    conn.execute("drop table if exists pgtrace_insert")
    out = tmp_path / "s.json"
    res = _invoke(["--dsn", dsn, "--workload", "insert-bigint", "--runners", "4",
                   "--rate", "200", "--duration", "2", "--summary-json", str(out), "--drop"])
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())
    assert 360 <= s["requests"] <= 440 and s["errors"] == 0


def test_open_loop_latency_from_intended_start(dsn: str, conn: Conn) -> None:
    w = get_workload("insert-bigint")
    conn.execute(f"drop table if exists {w.table}")
    w.setup(conn)
    # far more than one connection can do: requests fall behind their schedule
    df = run_load(dsn, w, runners=1, connections=1, duration_s=None, count=2000,
                  rate=1_000_000.0).frame
    w.teardown(conn)
    assert len(df) == 2000
    lag = df["t_send"] - df["t_enqueue"]
    assert lag.iloc[-1] > 100 * lag.iloc[0] + 1_000_000  # latency includes schedule lag


def test_unreachable_server_is_one_line() -> None:
    res = _invoke(["--dsn", "host=127.0.0.1 port=1 connect_timeout=2", "--duration", "1"])
    assert res.exit_code == ServerError.exit_code
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pgtrace: cannot connect to PostgreSQL")


def test_bad_credentials_is_one_line(dsn: str) -> None:
    res = _invoke(["--dsn", dsn + " dbname=no_such_db_pgtrace", "--duration", "1"])
    assert res.exit_code == ServerError.exit_code
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no_such_db_pgtrace" in lines[0]


def test_table_with_another_shape(dsn: str, conn: Conn) -> None:
    conn.execute("drop table if exists pgtrace_insert")
    conn.execute("create table pgtrace_insert (id int primary key, note text)")
    res = _invoke(["--dsn", dsn, "--workload", "insert-bigint", "--duration", "1"])
    assert res.exit_code == ServerError.exit_code
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "table pgtrace_insert exists with another shape" in lines[0]
    assert "column id is integer, not bigint" in lines[0]
    assert "column payload is missing" in lines[0]
    # same columns, other sequence cache
    conn.execute("drop table pgtrace_insert")
    conn.execute("create table pgtrace_insert (id bigint generated always as identity "
                 "(cache 7) primary key, payload text)")
    with pytest.raises(ServerError, match="sequence cache is 7, not 1"):
        get_workload("insert-bigint").setup(conn)
    conn.execute("drop table pgtrace_insert")


def test_server_kills_connections_mid_run(dsn: str, conn: Conn, tmp_path: Path) -> None:
    conn.execute("drop table if exists pgtrace_insert")
    out = tmp_path / "s.json"

    def killer() -> None:
        time.sleep(0.7)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("select pg_terminate_backend(pid) from pg_stat_activity"
                      " where backend_type = 'client backend' and pid <> pg_backend_pid()"
                      " and application_name = ''"
                      " and query like 'insert into pgtrace_insert%'")

    t = threading.Thread(target=killer)
    t.start()
    res = _invoke(["--dsn", dsn, "--workload", "insert-bigint", "--runners", "2",
                   "--duration", "5", "--summary-json", str(out)])
    t.join()
    assert res.exit_code == ServerError.exit_code, res.output
    assert "run stopped early" in res.output
    s = json.loads(out.read_text())  # results so far are written
    assert s["requests"] > 0 and s["errors"] >= 1 and s["duration_s"] < 4
    conn.execute("drop table pgtrace_insert")


def test_failing_requests_are_counted(dsn: str, conn: Conn, tmp_path: Path) -> None:
    w = get_workload("insert-bigint")
    conn.execute(f"drop table if exists {w.table}")
    w.setup(conn)
    conn.execute(f"alter table {w.table} add constraint short check (length(payload) < 10)")
    out = tmp_path / "s.json"
    res = _invoke(["--dsn", dsn, "--workload", "insert-bigint", "--runners", "3",
                   "--connections", "2", "--count", "60", "--payload-bytes", "32",
                   "--summary-json", str(out), "--drop"])
    assert res.exit_code == ServerError.exit_code, res.output
    assert "60 requests failed" in res.output and "short" in res.output
    s = json.loads(out.read_text())
    assert s["requests"] == 0 and s["errors"] == 60


def test_server_restart_mid_run(tmp_path: Path) -> None:
    """A server that restarts under the load: one clear line, results so far written."""
    from pgtrace.cluster import start_cluster

    with start_cluster() as cluster:
        out = tmp_path / "s.json"
        restarted = threading.Event()

        def restart() -> None:
            deadline = time.monotonic() + 30
            with psycopg.connect(cluster.dsn, autocommit=True) as c:
                # wait until the load has inserted rows, then restart under it
                while time.monotonic() < deadline:
                    row = c.execute("select to_regclass('pgtrace_insert')").fetchone()
                    if row and row[0] and c.execute(
                        "select count(*) > 100 from pgtrace_insert"
                    ).fetchone() == (True,):
                        break
            cluster.restart()
            restarted.set()

        t = threading.Thread(target=restart)
        t.start()
        res = _invoke(["--dsn", cluster.dsn, "--runners", "4", "--duration", "20",
                       "--summary-json", str(out)])
        t.join()
        assert restarted.is_set()
        assert res.exit_code == ServerError.exit_code, res.output
        err = [ln for ln in res.output.splitlines() if ln.startswith("pgtrace:")]
        assert len(err) == 1 and "stopped early" in err[0], res.output
        s = json.loads(out.read_text())
        assert s["requests"] > 100
        assert s["duration_s"] < 20


def _sabotage(conn: Conn, wire: Wire) -> float:
    """With wire's insert waiting on a lock: a Sync its backend will never read, then end
    the backend. Returns when the socket holds the FATAL message and an error (POLLERR),
    unless the request has ended meanwhile; the time the backend was ended."""
    deadline = time.monotonic() + 10
    while conn.execute("select wait_event_type from pg_stat_activity where pid = %s",
                       (wire.pid,)).fetchone() != ("Lock",):
        assert time.monotonic() < deadline, "the insert never waited on the lock"
        time.sleep(0.01)
    os.write(wire.fd, b"S" + struct.pack("!i", 4))
    ended_at = time.monotonic()
    conn.execute("select pg_terminate_backend(%s)", (wire.pid,))
    hangup = select.poll()
    hangup.register(wire.fd, 0)  # errors and hang-ups only
    while wire.busy and time.monotonic() < deadline:
        if hangup.poll(10):
            break
    return ended_at


@pytest.mark.parametrize("ending", ["fatal", "socket-error"])
def test_request_ends_when_backend_exits_with_our_bytes_unread(
        ending: str, dsn: str, conn: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    """The restart hang, made deterministic: a backend that exits with bytes of ours unread
    leaves our socket with an error (POLLERR) behind its FATAL message (an event loop may
    then drop its reader: uvloop did). The loop's epoll is level-triggered: the FATAL
    ends the request at once; with that path off, the socket's error does."""
    if ending == "socket-error":
        monkeypatch.setattr(wire_mod, "_SESSION_ENDS", ())
    w = get_workload("insert-bigint")
    conn.execute(f"drop table if exists {w.table}")
    w.setup(conn)
    lock_conn: Conn = psycopg.connect(dsn)  # holds the table: the insert waits, request read
    made: list[Wire] = []

    class Spy(Wire):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)  # prepares the insert: before the lock
            lock_conn.execute(f"lock table {w.table} in access exclusive mode")
            made.append(self)

    monkeypatch.setattr(runner, "Wire", Spy)
    ended_at: list[float] = []

    def saboteur() -> None:
        try:
            deadline = time.monotonic() + 10
            while not made and time.monotonic() < deadline:
                time.sleep(0.01)
            with psycopg.connect(dsn, autocommit=True) as c:
                ended_at.append(_sabotage(c, made[0]))
        finally:
            if not ended_at:
                lock_conn.close()  # let the insert through: the run ends, the test fails

    t = threading.Thread(target=saboteur)
    t.start()
    try:
        res = run_load(dsn, w, runners=1, duration_s=None, count=1)
        done_at = time.monotonic()
    finally:
        t.join()
        lock_conn.close()
    assert ended_at and done_at - ended_at[0] < 1.0
    assert res.fatal and len(res.frame) == 1 and not res.frame["ok"].any()
    w.teardown(conn)


@pytest.mark.parametrize("ending", ["fatal", "socket-error"])
def test_liveness_check_ends_request_on_dead_socket(
        ending: str, dsn: str, conn: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog's part, with no loop polling: the same dead socket (POLLERR behind the
    FATAL), and Wire.check alone ends the request as lost."""
    if ending == "socket-error":
        monkeypatch.setattr(wire_mod, "_SESSION_ENDS", ())
    w = get_workload("insert-bigint")
    conn.execute(f"drop table if exists {w.table}")
    w.setup(conn)
    lock_conn: Conn = psycopg.connect(dsn)
    wconn = psycopg.connect(dsn, autocommit=True)
    try:
        wire = Wire(wconn, w)
        lock_conn.execute(f"lock table {w.table} in access exclusive mode")
        wire.send()
        _sabotage(conn, wire)
        assert wire.busy  # nothing has read the socket yet
        hangup = select.poll()
        hangup.register(wire.fd, 0)
        events = hangup.poll(0)
        assert events and events[0][1] & select.POLLERR, events
        assert wire.check()
        assert wire.dead and not wire.busy
        assert wire.failure is not None and wire.failure.broken
        with pytest.raises(RequestError):
            wire.send()
    finally:
        wconn.close()
        lock_conn.close()
    w.teardown(conn)


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("name", ["insert-bigint", "insert-uuidv7"])
def test_batches(name: str, copy: bool, dsn: str, conn: Conn, tmp_path: Path) -> None:
    """--batch-rows N: each request writes N rows, as one INSERT or one COPY."""
    table = WORKLOADS[name].table
    conn.execute(f"drop table if exists {table}")
    out = tmp_path / "s.json"
    res = _invoke(["--dsn", dsn, "--workload", name, "--runners", "2", "--count", "40",
                   "--batch-rows", "25", "--payload-bytes", "8", "--summary-json", str(out),
                   *(["--copy"] if copy else [])])
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())
    assert s["requests"] == 40 and s["errors"] == 0
    row = conn.execute(f"select count(*), count(distinct id), min(length(payload)) "
                       f"from {table}").fetchone()
    assert row == (40 * 25, 40 * 25, 8)
    conn.execute(f"drop table {table}")


def test_sql_file(dsn: str, conn: Conn, tmp_path: Path) -> None:
    conn.execute("drop table if exists custom_t")
    conn.execute("create table custom_t (k int, v text)")
    f = tmp_path / "w.sql"
    f.write_text("\\set k random(1, 5)\ninsert into custom_t values (:k, :k::int::text || 'x');\n")
    res = _invoke(["--dsn", dsn, "--sql-file", str(f), "--runners", "2", "--count", "30"])
    assert res.exit_code == 0, res.output
    row = conn.execute("select count(*), min(k), max(k), bool_and(v = k || 'x') "
                       "from custom_t").fetchone()
    assert row is not None and row[0] == 30 and 1 <= row[1] <= row[2] <= 5 and row[3]
    conn.execute("drop table custom_t")


def test_sql_file_select(dsn: str, tmp_path: Path) -> None:
    """A statement that returns rows is a request like any other, not an error."""
    f = tmp_path / "r.sql"
    f.write_text("\\set k random(1, 1000)\nselect :k::int + 1, repeat('x', :k::int);\n")
    out = tmp_path / "s.json"
    res = _invoke(["--dsn", dsn, "--sql-file", str(f), "--runners", "2", "--count", "40",
                   "--summary-json", str(out)])
    assert res.exit_code == 0, res.output
    summ = json.loads(out.read_text())
    assert summ["requests"] == 40 and summ["errors"] == 0, summ


def _key_default(conn: Conn, table: str) -> str | None:
    row = conn.execute(
        "select pg_get_expr(d.adbin, d.adrelid) from pg_attribute a"
        " left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum"
        " where a.attrelid = to_regclass(%s) and a.attname = 'id'", (table,)).fetchone()
    assert row is not None, f"{table} has no id column"
    return None if row[0] is None else str(row[0])


@pytest.mark.pg(">= 18")
def test_uuidv7_from_the_servers_uuidv7(dsn: str, conn: Conn) -> None:
    """PostgreSQL 18 has uuidv7(): the workload lets the server make the key."""
    w = get_workload("insert-uuidv7")
    conn.execute(f"drop table if exists {w.table}")
    native = w.setup(conn)
    assert native.insert_columns == ("payload",) and native.id_factory is None
    assert native.prepared_sql == f"insert into {w.table} (payload) values ($1)".encode()
    assert _key_default(conn, w.table) == "uuidv7()"
    res = _invoke(["--dsn", dsn, "--workload", "insert-uuidv7", "--runners", "2",
                   "--count", "300"])
    assert res.exit_code == 0, res.output
    assert "300 requests, 0 errors" in res.output
    row = conn.execute(f"select count(*), count(distinct id), bool_and(uuid_extract_version(id)"
                       f" = 7) from {w.table}").fetchone()
    assert row == (300, 300, True)
    conn.execute(f"drop table {w.table}")


@pytest.mark.pg("< 18")
def test_uuidv7_from_the_driver_before_18(conn: Conn) -> None:
    """No uuidv7() before PostgreSQL 18: the driver makes the key, the column has no default."""
    w = get_workload("insert-uuidv7")
    conn.execute(f"drop table if exists {w.table}")
    row = conn.execute("select to_regprocedure('uuidv7()')").fetchone()
    assert row == (None,)
    assert w.setup(conn) == w
    assert _key_default(conn, w.table) is None
    conn.execute(f"drop table {w.table}")


def test_workers_run_the_spec_they_are_given(dsn: str, conn: Conn, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--workers: each process gets its share of the spec (JSON on stdin), the DSN included:
    every row carries the DSN's application_name, the shares add up to --count."""
    conn.execute("drop table if exists workers_t")
    conn.execute("create table workers_t (app text, k int)")
    (tmp_path / "w.sql").write_text(
        "\\set k random(1, 9)\ninsert into workers_t values "
        "(current_setting('application_name'), :k);\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.json"
    res = _invoke(["--dsn", f"{dsn} application_name=spec_as_data", "--sql-file", "w.sql",
                   "--workers", "3", "--runners", "5", "--connections", "3", "--count", "301",
                   "--summary-json", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())
    assert s["requests"] == 301 and s["errors"] == 0
    row = conn.execute("select count(*), count(*) filter (where app = 'spec_as_data'), "
                       "min(k), max(k) from workers_t").fetchone()
    assert row is not None and row[:2] == (301, 301) and 1 <= row[2] <= row[3] <= 9
    conn.execute("drop table workers_t")
