"""Doctor checks against fake tracefs / modules trees, and its text and JSON output."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pgtrace import doctor, preflight
from pgtrace.cli import cli
from pgtrace.doctor import check_psi, check_target, check_usdt, render_checks, run_checks
from pgtrace.errors import KernelHeadersError, NotRootError
from pgtrace.preflight import (
    TRACEPOINTS,
    Check,
    check_headers,
    check_kernel,
    check_privileges,
    check_tracefs,
    check_tracepoints,
    kernel_version,
)

POSTGRES = "/usr/lib/postgresql/15/bin/postgres"
RELEASE = "6.18.44-test"
APT_FIX = "apt-get install linux-headers-$(uname -r)"
SETUP_FIX = "bash scripts/setup.sh"


def fake_tracefs(root: Path, skip: tuple[str, ...] = ()) -> str:
    """A directory shaped like a mounted tracefs, without the tracepoints in `skip`."""
    (root / "events").mkdir(parents=True)
    for tp in TRACEPOINTS:
        if tp in skip:
            continue
        cat, name = tp.split(":")
        d = root / "events" / cat / name
        d.mkdir(parents=True)
        (d / "id").write_text("1\n")
    return str(root)


def fake_headers(root: Path) -> Path:
    """A configured headers tree like Debian's linux-headers-<ver>-amd64."""
    tree = root / "usr-src" / "linux-headers-6.1.0-56-amd64"
    (tree / "include").mkdir(parents=True)
    (tree / "Makefile").write_text("# headers\n")
    return tree


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("release", "version"),
    [("6.18.44-fc-v769", (6, 18)), ("5.8.0", (5, 8)), ("4.19.0-27-amd64", (4, 19))],
)
def test_kernel_version(release: str, version: tuple[int, int]) -> None:
    assert kernel_version(release) == version


def test_kernel_check_thresholds() -> None:
    assert check_kernel("5.8.0").ok
    assert check_kernel("6.1.0-56-amd64").ok
    old = check_kernel("5.4.0-150-generic")
    assert not old.ok
    assert old.fix is not None
    assert "5.8" in old.detail
    assert not check_kernel("weird").ok


def test_privileges_are_euid_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert check_privileges() == Check("privileges", True, "root (euid 0)")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    c = check_privileges()
    assert not c.ok
    assert c.detail == "tracing needs root (euid 0; this is uid 1000)"
    assert c.fix == "run it with sudo"


def test_attach_stops_at_the_first_failing_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What doctor prints is what attach runs: its first failure is attach's one line."""
    monkeypatch.setattr(preflight, "apt_has_package", lambda name: True)
    monkeypatch.setenv("PGTRACE_MODULES_DIR", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NotRootError) as not_root:
        preflight.require()
    assert not_root.value.line() == (
        "pgtrace: tracing needs root (euid 0; this is uid 1000) (run it with sudo)")
    assert not_root.value.exit_code == 77
    doctor_sees = run_checks()
    assert next(c for c in doctor_sees if not c.ok) == check_privileges()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    headers = check_headers(str(tmp_path))
    with pytest.raises(KernelHeadersError) as no_headers:
        preflight.require()
    assert no_headers.value.line() == f"pgtrace: {headers.detail} ({headers.fix})"
    assert no_headers.value.exit_code == 5
    assert {c.name: c for c in run_checks()}["headers"] == headers
    assert [c.name for c in preflight.machine_checks()] == list(preflight.ERRORS)


# ---------------------------------------------------------------- tracefs and tracepoints


def test_unmounted_tracefs(tmp_path: Path) -> None:
    c = check_tracefs(str(tmp_path))
    assert not c.ok
    assert c.detail == f"tracefs is not mounted at {tmp_path}"
    assert c.fix == f"mount -t tracefs nodev {tmp_path}"


def test_tracepoints_skipped_without_tracefs(tmp_path: Path) -> None:
    c = check_tracepoints(str(tmp_path), check_tracefs(str(tmp_path)))
    assert not c.ok
    assert c.detail == "skipped: tracefs not mounted"
    assert c.fix == f"mount -t tracefs nodev {tmp_path}"


def test_all_tracepoints_present(tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path / "tracing")
    assert check_tracefs(root).ok
    c = check_tracepoints(root, check_tracefs(root))
    assert c.ok, c
    assert c.detail == f"all {len(TRACEPOINTS)} present"


def test_missing_tracepoints_are_named(tmp_path: Path) -> None:
    gone = ("raw_syscalls:sys_enter", "raw_syscalls:sys_exit")
    root = fake_tracefs(tmp_path / "tracing", skip=gone)
    c = check_tracepoints(root, check_tracefs(root))
    assert not c.ok
    assert c.detail == "missing tracepoints: " + ", ".join(gone)
    assert c.fix is not None
    assert "CONFIG_FTRACE_SYSCALLS" in c.fix


def test_every_tracepoint_the_probes_use_is_checked() -> None:
    # the list is read from probes/*.bpf.c; these are the ones the engine cannot do without
    assert set(TRACEPOINTS) >= {
        "sched:sched_switch",
        "sched:sched_wakeup",
        "sched:sched_wakeup_new",
        "sched:sched_process_fork",
        "sched:sched_process_exit",
        "raw_syscalls:sys_enter",
        "raw_syscalls:sys_exit",
    }


# ---------------------------------------------------------------- kernel headers


@pytest.mark.parametrize(("in_apt", "fix"), [(True, APT_FIX), (False, SETUP_FIX)])
def test_missing_headers_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_apt: bool, fix: str
) -> None:
    asked: list[str] = []

    def apt(name: str) -> bool:
        asked.append(name)
        return in_apt

    monkeypatch.setattr(preflight, "apt_has_package", apt)
    (tmp_path / RELEASE).mkdir()
    c = check_headers(str(tmp_path), RELEASE)
    assert not c.ok
    assert c.detail == f"no kernel headers at {tmp_path / RELEASE / 'build'}"
    assert c.fix is not None
    assert fix in c.fix
    assert asked == [f"linux-headers-{RELEASE}"]


def test_dangling_headers_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "apt_has_package", lambda name: False)
    (tmp_path / RELEASE).mkdir()
    (tmp_path / RELEASE / "build").symlink_to(tmp_path / "gone")
    c = check_headers(str(tmp_path), RELEASE)
    assert not c.ok
    assert "not a configured headers tree" in c.detail
    assert c.fix is not None
    assert SETUP_FIX in c.fix


def test_linked_generic_headers(tmp_path: Path) -> None:
    tree = fake_headers(tmp_path)
    (tmp_path / RELEASE).mkdir()
    (tmp_path / RELEASE / "build").symlink_to(tree)
    c = check_headers(str(tmp_path), RELEASE)
    assert c.ok, c
    assert c.detail == (
        f"{tmp_path / RELEASE / 'build'} -> {tree} (generic headers of 6.1.0-56-amd64)"
    )


def test_headers_without_makefile_are_refused(tmp_path: Path) -> None:
    tree = fake_headers(tmp_path)
    (tree / "Makefile").unlink()
    (tmp_path / RELEASE).mkdir()
    (tmp_path / RELEASE / "build").symlink_to(tree)
    assert not check_headers(str(tmp_path), RELEASE).ok


def test_apt_lookup_of_an_absent_package() -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("no apt-cache")
    assert not preflight.apt_has_package("linux-headers-0.0.0-no-such-kernel")


# ---------------------------------------------------------------- other checks


def test_psi_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "PSI_CPU", str(tmp_path / "cpu"))
    c = check_psi()
    assert not c.ok
    assert c.fix is not None
    assert "psi=1" in c.fix


def test_target_check_with_a_bad_pid() -> None:
    c, binary = check_target(2)
    assert not c.ok
    assert binary is None
    assert "kernel thread" in c.detail


def test_usdt_of_a_binary_without_probes() -> None:
    usdt, required = check_usdt("/bin/true")
    assert not usdt.ok
    assert "--enable-dtrace" in usdt.detail
    assert not required.ok
    assert required.detail.startswith("skipped")


@pytest.mark.skipif(not os.path.exists(POSTGRES), reason=f"{POSTGRES} is not installed")
def test_usdt_of_debian_postgres() -> None:
    usdt, required = check_usdt(POSTGRES)
    assert usdt.ok, usdt
    assert usdt.detail.startswith("PostgreSQL 15.")
    assert "probe sites" in usdt.detail
    assert required.ok, required


def test_run_checks_with_broken_tracefs_and_headers(tmp_path: Path) -> None:
    checks = run_checks(tracefs=str(tmp_path / "tracing"), modules_dir=str(tmp_path / "modules"))
    by = {c.name: c for c in checks}
    assert list(by) == [
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
    assert not by["tracefs"].ok
    assert by["tracefs"].fix == f"mount -t tracefs nodev {tmp_path / 'tracing'}"
    assert not by["tracepoints"].ok
    assert not by["headers"].ok
    assert by["headers"].fix is not None
    assert APT_FIX in by["headers"].fix or SETUP_FIX in by["headers"].fix
    assert not by["bcc-load"].ok
    assert by["bcc-load"].detail.startswith("skipped: ")


# ---------------------------------------------------------------- output


SAMPLE = [
    Check("kernel", True, "6.18.44 (>= 5.8)"),
    Check("tracefs", False, "not mounted at /x", "mount -t tracefs nodev /x"),
    Check("psi", False, "cannot read /proc/pressure/cpu", None),
]


def test_render_text() -> None:
    out = io.StringIO()
    render_checks(SAMPLE, out, as_json=False)
    assert out.getvalue().splitlines() == [
        "ok   kernel   6.18.44 (>= 5.8)",
        "FAIL tracefs  not mounted at /x  -> fix: mount -t tracefs nodev /x",
        "FAIL psi      cannot read /proc/pressure/cpu",
    ]


def test_render_json() -> None:
    out = io.StringIO()
    render_checks(SAMPLE, out, as_json=True)
    doc = json.loads(out.getvalue())
    assert doc["ok"] is False
    assert doc["checks"][1] == {
        "name": "tracefs",
        "ok": False,
        "detail": "not mounted at /x",
        "fix": "mount -t tracefs nodev /x",
    }
    assert [set(c) for c in doc["checks"]] == [{"name", "ok", "detail", "fix"}] * 3
    out = io.StringIO()
    render_checks(SAMPLE[:1], out, as_json=True)
    assert json.loads(out.getvalue())["ok"] is True


def test_cli_exit_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int | None, str | None]] = []

    def fake(pid: int | None = None, binary: str | None = None) -> list[Check]:
        seen.append((pid, binary))
        return SAMPLE if pid else SAMPLE[:1]

    monkeypatch.setattr(doctor, "run_checks", fake)
    runner = CliRunner()
    good = runner.invoke(cli, ["doctor"])
    assert good.exit_code == 0
    assert good.output == "ok   kernel  6.18.44 (>= 5.8)\n"
    bad = runner.invoke(cli, ["doctor", "--pid", "42", "--json"])
    assert bad.exit_code == 1
    assert json.loads(bad.output)["ok"] is False
    assert seen == [(None, None), (42, None)]


def test_first_error_line() -> None:
    text = "warning: x\n/virtual/main.c:1:40: error: use of undeclared identifier 'y'\nTraceback\n"
    assert doctor._first_error_line(text) == (
        "/virtual/main.c:1:40: error: use of undeclared identifier 'y'"
    )
    assert doctor._first_error_line("a\nException: boom\n\n") == "Exception: boom"
    assert doctor._first_error_line("") == "no output"
