"""find_target and list_backends against a real PostgreSQL cluster (the shared pg_cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgtrace.target import (
    Backend,
    binary_version,
    find_target,
    list_backends,
)

pytestmark = pytest.mark.root

Conn = psycopg.Connection[tuple[Any, ...]]


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll `cond()` until true or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def pm(pg_cluster: Any) -> int:
    """The postmaster pid of the test cluster (skip when it is not visible from here)."""
    pid: int = pg_cluster.postmaster_pid
    if not pid:
        pytest.skip("the test server's postmaster is not visible from this machine")
    return pid


def _kinds(pm: int) -> set[str]:
    return {b.kind for b in list_backends(pm)}


def test_from_postmaster(pg_cluster: Any, pm: int) -> None:
    wait_for(lambda: {"checkpointer", "walwriter", "background writer"} <= _kinds(pm))
    t = find_target(pm)
    assert t.postmaster_pid == pm
    assert os.path.realpath(t.data_dir) == os.path.realpath(pg_cluster.data_dir)
    assert t.port == pg_cluster.port
    assert t.socket_dir is not None
    assert os.path.realpath(t.socket_dir) == os.path.realpath(pg_cluster.socket_dir)
    assert os.path.isabs(t.binary)
    assert t.binary == os.path.realpath(os.path.join(pg_cluster.bin_dir, "postgres"))
    out = subprocess.run([t.binary, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.split()[2] == t.version  # "postgres (PostgreSQL) 15.18 ..."
    with open(os.path.join(pg_cluster.data_dir, "PG_VERSION")) as f:
        assert t.major == int(f.read().strip())
    assert t.version.startswith(f"{t.major}.")
    assert binary_version(t.binary) == (t.version, t.major)
    kinds = {b.kind for b in t.backends}
    assert {"checkpointer", "walwriter", "background writer"} <= kinds
    assert all(b.pid != pm for b in t.backends)


def test_from_client_backend(pg_cluster: Any, pm: int, conn: Conn) -> None:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    backend = int(row[0])
    t = find_target(backend)
    assert t.postmaster_pid == pm
    assert os.path.realpath(t.data_dir) == os.path.realpath(pg_cluster.data_dir)
    assert backend in t.client_backends()
    assert Backend(backend, "client backend") in t.backends
    assert {"checkpointer", "walwriter", "client backend"} <= {b.kind for b in t.backends}


def test_from_auxiliary_processes(pm: int) -> None:
    wait_for(lambda: "checkpointer" in _kinds(pm))
    aux = [b for b in list_backends(pm) if b.kind in ("checkpointer", "walwriter")]
    assert aux
    for b in aux:
        assert find_target(b.pid).postmaster_pid == pm


def test_kinds_agree_with_pg_stat_activity(pm: int, conn: Conn) -> None:
    """Our title-derived kinds against the server's own backend_type."""
    wait_for(lambda: "autovacuum launcher" in _kinds(pm))
    rows = conn.execute("select pid, backend_type from pg_stat_activity").fetchall()
    server = {int(pid): str(kind) for pid, kind in rows}
    ours = {b.pid: b.kind for b in list_backends(pm)}
    common = set(server) & set(ours)
    assert len(common) >= 4
    for pid in common:
        if ours[pid] == "background worker":  # an extension's worker, e.g. pg_wait_sampling
            assert server[pid] not in ("client backend", "checkpointer", "walwriter")
        else:
            assert ours[pid] == server[pid], pid


def test_permission_denied_for_an_unprivileged_user(pm: int) -> None:
    code = (
        "import sys\n"
        "from pgtrace.errors import TargetError\n"
        "from pgtrace.target import find_target\n"
        "try:\n"
        f"    find_target({pm})\n"
        "except TargetError as e:\n"
        "    print(e.line())\n"
        "    sys.exit(e.exit_code)\n"
    )
    res = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=False,
    )
    assert res.returncode == 3, res.stderr
    assert "permission denied" in res.stdout
    assert "run as root" in res.stdout
