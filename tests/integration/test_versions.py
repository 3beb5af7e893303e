"""What differs between PostgreSQL versions, checked on real servers of each.

- the doctor reports version and probe count for a server of every version of the matrix
  (``all_pg_bins``: 15 from Debian, 17 and 18 from scripts/build-postgres.sh);
- the status-entry layout pgtrace reads query text from (collect/activity.py) agrees with
  each build's headers and with the text of live backends;
- the settings kept in a capture's header, by version;
- and what pgtrace refuses, with one line and a non-zero exit: PostgreSQL 12, a build without
  probes, a binary for another architecture (prebuilt servers from
  scripts/install-prebuilt-postgres.sh, which scripts/test.sh runs).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from pgtrace.cli import cli
from pgtrace.cluster import TempCluster, start_cluster
from pgtrace.collect.activity import ACTIVITY_RAW_OFFSET, PROCPID_OFFSET, locate_activity
from pgtrace.doctor import check_binary, check_target, check_usdt
from pgtrace.elf.usdt import read_probes
from pgtrace.errors import NoProbesError, UnsupportedError
from pgtrace.settings import WRITE_SETTINGS, server_settings
from pgtrace.target import binary_version, find_target

PREBUILT = os.environ.get("PGTRACE_PREBUILT_ROOT", "/opt/pgtrace/prebuilt")
PREBUILT_FIX = "run: sudo bash scripts/install-prebuilt-postgres.sh (scripts/test.sh does)"

Conn = psycopg.Connection[tuple[Any, ...]]


def _stapsdt_notes(binary: str) -> int:
    """The number of stapsdt notes as binutils counts them (independent of pgtrace.elf)."""
    out = subprocess.run(["readelf", "-n", binary], capture_output=True, text=True,
                         check=True).stdout
    return len(re.findall(r"^\s+stapsdt\s+0x[0-9a-f]+\s+NT_STAPSDT", out, re.M))


def _prebuilt(name: str) -> str:
    bin_dir = os.path.join(PREBUILT, name, "bin")
    if not os.access(os.path.join(bin_dir, "postgres"), os.X_OK):
        pytest.skip(f"no prebuilt server at {bin_dir} ({PREBUILT_FIX})")
    return bin_dir


@pytest.fixture(scope="module")
def cluster_of_each(all_pg_bins: list[str]) -> Iterator[list[TempCluster]]:
    """A running cluster of every version of the matrix (one after another would be slower
    only in wall time; they are small)."""
    assert all_pg_bins, "no PostgreSQL server found (run: sudo bash scripts/test.sh)"
    clusters: list[TempCluster] = []
    try:
        for bin_dir in all_pg_bins:
            clusters.append(start_cluster(bin_dir=bin_dir, preload=[]))
        yield clusters
    finally:
        for c in clusters:
            c.stop()


# --- the doctor, on every version ---------------------------------------------------------


@pytest.mark.root
def test_doctor_reports_version_and_probes_of_each(cluster_of_each: list[TempCluster]) -> None:
    seen = []
    for c in cluster_of_each:
        binary = os.path.realpath(os.path.join(c.bin_dir, "postgres"))
        version, major = binary_version(binary)
        server_version = c.psql("show server_version").split()[0]
        assert server_version == version, (binary, server_version)
        target, target_binary = check_target(c.postmaster_pid)
        assert target.ok, target
        assert target.detail.startswith(f"PostgreSQL {version}, postmaster {c.postmaster_pid}")
        assert target_binary is not None
        assert check_binary(target_binary) == check_binary(binary)
        assert check_binary(binary).ok and check_binary(binary).detail == (
            f"PostgreSQL {version} (x86_64)")
        usdt, required = check_usdt(target_binary)
        assert usdt.ok and required.ok, (usdt, required)
        sites = _stapsdt_notes(binary)
        assert sites == len(read_probes(binary)) > 0
        assert usdt.detail.startswith(f"PostgreSQL {version}: {sites} probe sites, ")
        # the same through the command line, as a person would run it
        res = CliRunner().invoke(cli, ["doctor", "--pid", str(c.postmaster_pid)])
        assert f"PostgreSQL {version}: {sites} probe sites" in res.output, res.output
        seen.append((major, sites))
        print(f"PostgreSQL {version}: {sites} probe sites")
    majors = [m for m, _ in seen]
    assert len(set(majors)) == len(majors), f"two servers of one version in the matrix: {seen}"


@pytest.mark.root
def test_target_kinds_of_each(cluster_of_each: list[TempCluster]) -> None:
    """Every auxiliary process of every version gets a kind the server agrees with."""
    for c in cluster_of_each:
        with psycopg.connect(c.dsn, autocommit=True) as conn:
            rows = conn.execute("select pid, backend_type from pg_stat_activity").fetchall()
            me = conn.info.backend_pid
            t = find_target(c.postmaster_pid)
        kinds = {b.pid: b.kind for b in t.backends}
        assert kinds[me] == "client backend"
        compared = 0
        for pid, backend_type in rows:
            if pid in kinds:  # a process that started after the listing is not there
                assert kinds[pid] == backend_type, (t.version, pid, kinds[pid], backend_type)
                compared += 1
        assert compared >= 4, (t.version, rows, kinds)  # checkpointer, walwriter, ... and us


# --- where query text is read from ----------------------------------------------------------


_OFFSETS_C = """
#include "postgres.h"
#include "utils/backend_status.h"
#include <stdio.h>
#undef printf  /* port.h points it at pg_printf, in libpgport */
int main(void)
{
    printf("%zu %zu\\n", offsetof(PgBackendStatus, st_procpid),
           offsetof(PgBackendStatus, st_activity_raw));
    return 0;
}
"""


def test_activity_offsets_agree_with_the_headers(all_pg_bins: list[str], tmp_path: Path) -> None:
    """offsetof() from each build's own server headers (the Debian server ships none)."""
    checked = []
    for bin_dir in all_pg_bins:
        pg_config = os.path.join(bin_dir, "pg_config")
        include = subprocess.run([pg_config, "--includedir-server"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        if not os.path.exists(os.path.join(include, "utils", "backend_status.h")):
            assert bin_dir.startswith("/usr/lib/postgresql/"), f"{bin_dir} has no headers"
            continue
        _version, major = binary_version(os.path.join(bin_dir, "postgres"))
        src = tmp_path / f"offsets{major}.c"
        src.write_text(_OFFSETS_C)
        exe = tmp_path / f"offsets{major}"
        subprocess.run(["gcc", f"-I{include}", "-o", str(exe), str(src)], check=True)
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
        procpid, activity = (int(x) for x in out.split())
        assert (procpid, activity) == (PROCPID_OFFSET, ACTIVITY_RAW_OFFSET[major]), major
        checked.append(major)
    assert checked, f"no build with server headers among {all_pg_bins}"


@pytest.mark.root
def test_activity_text_of_live_backends(pg_cluster: Any, pg_major: int) -> None:
    """The located entry of each backend holds the statement that backend ran last."""
    binary = os.path.realpath(os.path.join(pg_cluster.bin_dir, "postgres"))
    conns = [psycopg.connect(pg_cluster.dsn, autocommit=True) for _ in range(3)]
    try:
        texts = {}
        for i, c in enumerate(conns):
            sql = f"select {i} as pgtrace_activity_{pg_major}_{i}"
            c.execute(sql)
            texts[c.info.backend_pid] = sql
        found = locate_activity(binary, pg_major, list(texts))
        assert found is not None, f"status entry layout of PostgreSQL {pg_major} not confirmed"
        addr, offset = found
        assert offset == ACTIVITY_RAW_OFFSET[pg_major]
        for pid, sql in texts.items():
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(addr)
                (entry,) = struct.unpack("<Q", mem.read(8))
                mem.seek(entry + offset)
                (raw,) = struct.unpack("<Q", mem.read(8))
                mem.seek(raw)
                text = mem.read(len(sql) + 1)
            assert text == sql.encode() + b"\0", (pid, text)
    finally:
        for c in conns:
            c.close()


# --- settings kept in the capture header --------------------------------------------------


@pytest.mark.root
def test_settings_by_version(pg_cluster: Any, pg_major: int, conn: Conn) -> None:
    t = find_target(pg_cluster.postmaster_pid)
    got = server_settings(t.binary, t.postmaster_pid, t.data_dir)
    for name, value in got.items():
        assert name in WRITE_SETTINGS
        # in the base unit, as `postgres -C` prints it
        row = conn.execute("select setting from pg_settings where name = %s", (name,)).fetchone()
        assert row is not None
        if value != "-1":  # -1: sized by the server at start (wal_buffers), not in the file
            assert value == row[0], (name, value, row)
    names = set(got)
    assert {"wal_sync_method", "synchronous_commit", "shared_buffers"} <= names
    io_names = {"io_method", "io_workers", "io_max_concurrency"}
    if pg_major >= 18:
        assert io_names <= names
    else:
        assert not io_names & names


# --- refusals ---------------------------------------------------------------------------------


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("pgtrace: "), output
    return lines[0]


@pytest.mark.root
def test_postgres_12_is_refused() -> None:
    bin_dir = _prebuilt("pg12")
    with start_cluster(bin_dir=bin_dir, preload=[]) as c:
        with pytest.raises(UnsupportedError, match="PostgreSQL 12 is too old"):
            find_target(c.postmaster_pid)
        res = CliRunner().invoke(cli, ["attach", "--pid", str(c.postmaster_pid),
                                       "--duration", "1"])
        assert res.exit_code == UnsupportedError.exit_code, res.output
        line = _one_error_line(res.output)
        assert f"cannot trace postmaster {c.postmaster_pid}" in line
        assert "PostgreSQL 12 is too old: pgtrace needs 13 or newer" in line
        doc = CliRunner().invoke(cli, ["doctor", "--pid", str(c.postmaster_pid)])
        assert doc.exit_code == 1
        failed = [ln for ln in doc.output.splitlines() if ln.startswith("FAIL")]
        assert len(failed) == 1 and failed[0].startswith("FAIL target"), doc.output
        assert "PostgreSQL 12 is too old" in failed[0]


@pytest.mark.root
def test_a_build_without_probes_is_refused() -> None:
    bin_dir = _prebuilt("noprobes")
    binary = os.path.join(bin_dir, "postgres")
    assert _stapsdt_notes(binary) == 0
    with start_cluster(bin_dir=bin_dir, preload=[]) as c:
        assert find_target(c.postmaster_pid).major >= 13  # the version is fine
        res = CliRunner().invoke(cli, ["attach", "--pid", str(c.postmaster_pid),
                                       "--duration", "1"])
        assert res.exit_code == NoProbesError.exit_code, res.output
        line = _one_error_line(res.output)
        assert "has no USDT probes" in line and "built without --enable-dtrace" in line
        doc = CliRunner().invoke(cli, ["doctor", "--pid", str(c.postmaster_pid)])
        assert doc.exit_code == 1
        failed = [ln.split()[1] for ln in doc.output.splitlines() if ln.startswith("FAIL")]
        assert failed == ["usdt", "usdt-required"], doc.output


def test_another_architecture_is_refused() -> None:
    binary = os.path.join(_prebuilt("arm64"), "postgres")
    c = check_binary(binary)
    assert not c.ok
    assert c.detail == (f"cannot trace {binary}: it is built for aarch64: "
                        "pgtrace traces x86_64 binaries only")
    res = CliRunner().invoke(cli, ["doctor", "--binary", binary])
    assert res.exit_code == 1
    assert "FAIL binary" in res.output and "built for aarch64" in res.output
