"""The private test cluster (pgtrace.cluster) and the pg_cluster fixture."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import stat
import tempfile
import time
from typing import Any

import psycopg
import pytest

from pgtrace.cluster import TempCluster, find_pg_bin, start_cluster
from pgtrace.errors import ServerError, SetupError

pytestmark = pytest.mark.root


def _alive(pid: int) -> bool:
    """True for a running process; a zombie waiting to be reaped counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def private(pg_cluster: Any) -> TempCluster:
    if not isinstance(pg_cluster, TempCluster):
        pytest.skip("PGTRACE_TEST_DSN points at an external server: nothing private to check")
    return pg_cluster


def test_server_answers(pg_cluster: Any, conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("select 1 + 1").fetchone()
    assert row == (2,)
    assert pg_cluster.psql("select 40 + 2") == "42"
    assert pg_cluster.psql("select null") == ""
    assert pg_cluster.psql("create temp table t (x int)") == ""


def test_profiler_settings(private: TempCluster) -> None:
    assert private.psql("show track_wal_io_timing") == "on"
    assert private.psql("show track_io_timing") == "on"
    assert private.psql("show max_connections") == "200"
    assert private.psql("show fsync") == "on"


def test_pg_wait_sampling_loaded(private: TempCluster, conn: psycopg.Connection[Any]) -> None:
    assert "pg_wait_sampling" in private.psql("show shared_preload_libraries")
    conn.execute("create extension if not exists pg_wait_sampling")
    conn.execute("select * from pg_wait_sampling_profile limit 1").fetchall()


def test_port_and_socket_are_private(private: TempCluster) -> None:
    assert private.port != 5432
    assert private.psql("show port") == str(private.port)
    assert private.psql("show listen_addresses") == "127.0.0.1"
    assert private.psql("show unix_socket_directories") == private.socket_dir
    assert private.socket_dir.startswith(tempfile.gettempdir())
    assert os.path.exists(os.path.join(private.socket_dir, f".s.PGSQL.{private.port}"))
    st = os.stat(private.socket_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == pwd.getpwnam("postgres").pw_uid
    assert private.data_dir.startswith(private.socket_dir + os.sep)
    # TCP on loopback works too.
    with psycopg.connect(
        host="127.0.0.1", port=private.port, dbname="postgres", user="postgres"
    ) as c:
        assert c.execute("select current_setting('data_directory')").fetchone() == (
            private.data_dir,
        )


def test_postmaster_pid(private: TempCluster, conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    with open(f"/proc/{row[0]}/stat", encoding="utf-8") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    assert ppid == private.postmaster_pid
    assert os.path.realpath(f"/proc/{private.postmaster_pid}/cwd") == private.data_dir


def test_second_cluster_in_same_session(pg_cluster: Any, pg_bin: str | None) -> None:
    with start_cluster(bin_dir=pg_bin, settings={"work_mem": "7MB"}, preload=[]) as c2:
        assert c2.port != pg_cluster.port
        assert c2.socket_dir != pg_cluster.socket_dir
        assert c2.psql("select 42") == "42"
        assert c2.psql("show work_mem") == "7MB"
        assert c2.psql("show shared_preload_libraries") == ""
        assert c2.psql("show track_wal_io_timing") == "on"
        pid, port, base = c2.postmaster_pid, c2.port, c2.base_dir
        assert _alive(pid)
    # __exit__ stopped it and removed the tree; the first cluster is untouched.
    assert _wait_dead(pid)
    assert not os.path.exists(base)
    assert not _port_open(port)
    c2.stop()  # idempotent
    assert pg_cluster.psql("select 1") == "1"


def test_stop_survives_a_dead_server(pg_bin: str | None) -> None:
    c = start_cluster(bin_dir=pg_bin, preload=[])
    os.kill(c.postmaster_pid, signal.SIGKILL)
    assert _wait_dead(c.postmaster_pid)
    c.stop()
    c.stop()
    assert not os.path.exists(c.base_dir)


def test_start_failure_reports_server_log(pg_bin: str | None) -> None:
    parent = tempfile.mkdtemp(prefix="pgtrace-test-")
    try:
        os.chmod(parent, 0o755)
        with pytest.raises(ServerError) as e:
            start_cluster(bin_dir=pg_bin, base_dir=parent, settings={"shared_buffers": "lots"})
        assert "server log" in e.value.message
        assert "shared_buffers" in e.value.message
        assert os.listdir(parent) == []  # nothing left behind
    finally:
        os.rmdir(parent)


def test_unreachable_base_dir_is_a_clear_error(pg_bin: str | None) -> None:
    parent = tempfile.mkdtemp(prefix="pgtrace-test-")  # mode 0700, owned by root
    try:
        with pytest.raises(SetupError, match="cannot enter"):
            start_cluster(bin_dir=pg_bin, base_dir=os.path.join(parent, "sub"))
    finally:
        for d in (os.path.join(parent, "sub"), parent):
            if os.path.isdir(d):
                os.rmdir(d)


@pytest.mark.parametrize("bad", ["/nonexistent/bin", "/usr/bin"])
def test_find_pg_bin_rejects_non_server_dirs(bad: str) -> None:
    with pytest.raises(SetupError, match="not a PostgreSQL server bin dir"):
        find_pg_bin(pg_bin=bad)


def test_find_pg_bin_default_and_env(monkeypatch: pytest.MonkeyPatch, pg_bin: str | None) -> None:
    monkeypatch.delenv("PGTRACE_PGBIN", raising=False)
    default = find_pg_bin()
    assert os.access(os.path.join(default, "initdb"), os.X_OK)
    monkeypatch.setenv("PGTRACE_PGBIN", default)
    assert find_pg_bin() == default
    monkeypatch.setenv("PGTRACE_PGBIN", "/nonexistent/bin")
    with pytest.raises(SetupError):
        find_pg_bin()
