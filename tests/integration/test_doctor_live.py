"""The doctor on this machine, as root: everything passes; broken pieces fail with their fix."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pgtrace import doctor, preflight
from pgtrace.cli import cli
from pgtrace.cluster import find_pg_bin
from pgtrace.doctor import run_checks

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MACHINE_CHECKS = [
    "privileges",
    "kernel",
    "btf",
    "tracefs",
    "uprobes",
    "tracepoints",
    "headers",
    "bcc",
    "bcc-load",
    "psi",
]
TARGET_CHECKS = ["target", "engine", "binary", "usdt", "usdt-required", "probe-scope"]


def _failures(checks: list[doctor.Check]) -> list[doctor.Check]:
    return [c for c in checks if not c.ok]


def test_machine_checks_pass() -> None:
    checks = run_checks()
    assert [c.name for c in checks] == MACHINE_CHECKS
    assert _failures(checks) == []


def test_checks_with_a_live_server(pg_cluster: Any, pg_major: int) -> None:
    if not pg_cluster.postmaster_pid:
        pytest.skip("the test server's postmaster is not visible from this machine")
    checks = run_checks(pid=pg_cluster.postmaster_pid)
    assert [c.name for c in checks] == MACHINE_CHECKS + TARGET_CHECKS
    assert _failures(checks) == []
    by = {c.name: c for c in checks}
    assert by["target"].detail.startswith(f"PostgreSQL {pg_major}.")
    assert by["binary"].detail.startswith(f"PostgreSQL {pg_major}.")
    assert f"postmaster {pg_cluster.postmaster_pid}" in by["target"].detail
    assert "probe sites" in by["usdt"].detail
    # every version the tests run has a tranche table: no LWLock probe traps
    assert by["engine"].detail.startswith(
        f"LWLock waits from wait events (tranche ids of PostgreSQL {pg_major})"), by["engine"]
    assert by["usdt"].detail.endswith(os.path.realpath(f"{pg_cluster.bin_dir}/postgres"))
    assert by["probe-scope"].detail.startswith("attach's uprobes and USDT probes (and their "
                                               "semaphores, ref_ctr_offset) go into every ")


def test_cli_json_with_a_live_server(pg_cluster: Any) -> None:
    if not pg_cluster.postmaster_pid:
        pytest.skip("the test server's postmaster is not visible from this machine")
    res = CliRunner().invoke(cli, ["doctor", "--pid", str(pg_cluster.postmaster_pid), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ok"] is True
    assert [c["name"] for c in doc["checks"]] == MACHINE_CHECKS + TARGET_CHECKS
    for c in doc["checks"]:
        assert set(c) == {"name", "ok", "detail", "fix"}
        assert c["ok"] is True
        assert c["fix"] is None


def test_cli_text(pg_bin: str | None) -> None:
    binary = os.path.join(find_pg_bin(pg_bin=pg_bin), "postgres")
    res = CliRunner().invoke(cli, ["doctor", "--binary", binary])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == len(MACHINE_CHECKS) + 4  # binary, usdt, usdt-required, probe-scope
    assert all(line.startswith("ok   ") for line in lines)


def test_unmounted_tracefs_fails_with_the_mount_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unmounted = str(tmp_path / "tracing")
    os.mkdir(unmounted)
    by = {c.name: c for c in run_checks(tracefs=unmounted)}
    assert not by["tracefs"].ok
    assert by["tracefs"].fix == f"mount -t tracefs nodev {unmounted}"
    assert not by["tracepoints"].ok
    assert by["bcc-load"].detail == "skipped: tracefs not mounted"
    assert {n for n, c in by.items() if not c.ok} == {"tracefs", "tracepoints", "bcc-load"}

    monkeypatch.setattr(doctor, "run_checks", functools.partial(run_checks, tracefs=unmounted))
    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 1
    assert "FAIL tracefs" in res.output
    assert f"-> fix: mount -t tracefs nodev {unmounted}" in res.output


def test_missing_headers_link_fails_with_the_headers_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = tmp_path / "modules"
    (modules / os.uname().release).mkdir(parents=True)  # module dir without its build link
    by = {c.name: c for c in run_checks(modules_dir=str(modules))}
    headers = by["headers"]
    assert not headers.ok
    assert headers.detail == f"no kernel headers at {modules / os.uname().release / 'build'}"
    assert headers.fix is not None
    if preflight.apt_has_package(f"linux-headers-{os.uname().release}"):
        assert "apt-get install linux-headers-$(uname -r)" in headers.fix
    else:  # this VM: a custom kernel with no headers package
        assert "bash scripts/setup.sh" in headers.fix
    assert by["bcc-load"].detail == "skipped: no kernel headers"
    assert {n for n, c in by.items() if not c.ok} == {"headers", "bcc-load"}

    monkeypatch.setattr(
        doctor, "run_checks", functools.partial(run_checks, modules_dir=str(modules))
    )
    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert doc["ok"] is False
    failed = {c["name"]: c for c in doc["checks"] if not c["ok"]}
    assert set(failed) == {"headers", "bcc-load"}
    assert failed["headers"]["fix"] == headers.fix


def test_bad_pid_fails_the_target_check() -> None:
    res = CliRunner().invoke(cli, ["doctor", "--pid", "1"])
    assert res.exit_code == 1
    assert "FAIL target" in res.output
    assert "not a PostgreSQL server process" in res.output


def test_a_program_that_does_not_compile_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = doctor._LOAD_PROGRAM.replace("return 0;", "return no_such_symbol;")
    monkeypatch.setattr(doctor, "_LOAD_PROGRAM", broken)
    checks = run_checks()
    load = {c.name: c for c in checks}["bcc-load"]
    assert not load.ok
    assert "no_such_symbol" in load.detail
    assert "error:" in load.detail
    assert load.fix is not None
