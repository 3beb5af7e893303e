"""Shared fixtures and the root/BPF marker policy.

- ``pg_cluster`` (session): a private throwaway cluster (pgtrace.cluster.start_cluster), or
  the server named by ``$PGTRACE_TEST_DSN`` (used as is, never stopped).
  ``--pg-bin DIR`` / ``$PGTRACE_TEST_PGBIN`` choose the server's bin dir, for every cluster
  the session starts (it is passed on as ``$PGTRACE_PGBIN``).
- ``dsn`` (session, str) and ``conn`` (function, autocommit psycopg connection).
- Tests marked ``root`` are skipped when not root, tests marked ``bpf`` when bcc cannot be
  imported. Under ``CI=true`` a skipped root/bpf test fails instead, and the session fails
  when bpf tests were collected but none ran.
- ``@pytest.mark.pg(">= 17")``: the test runs only when the server under test (``--pg-bin``,
  or ``$PGTRACE_TEST_DSN``) satisfies the version spec (tests/pgversion.py), and is skipped
  otherwise. Such a skip is the version matrix at work, not a missing privilege: it never
  fails under ``CI=true``. ``pg_major`` (session, int) is that server's major version.
- ``all_pg_bins`` (session): the bin dirs of every server version of the matrix,
  ``$PGTRACE_TEST_PGBINS`` (space separated; scripts/test.sh sets it), else the Debian
  packages and the builds of scripts/build-postgres.sh found on this machine.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import pytest

from pgtrace.cluster import find_pg_bin, first_value, server_major, start_cluster
from tests.pgversion import matches, parse_spec

GUARDED_MARKERS = ("root", "bpf")
#: Where scripts/build-postgres.sh installs its builds (pgNN/bin).
BUILD_ROOT = os.environ.get("PGTRACE_PG_ROOT", "/opt/pgtrace")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# --- options --------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-bin",
        default=os.environ.get("PGTRACE_TEST_PGBIN") or None,
        help="PostgreSQL bin dir for the test cluster (env PGTRACE_TEST_PGBIN; "
        "default: newest /usr/lib/postgresql/*/bin)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Every cluster the tests start, also those started without a bin dir (fixtures of their
    # own, `pgtrace run` without --dsn), uses the chosen server: pgtrace.cluster.find_pg_bin
    # takes $PGTRACE_PGBIN when no bin dir is given.
    pg_bin = config.getoption("--pg-bin")
    if pg_bin:
        os.environ["PGTRACE_PGBIN"] = os.path.abspath(pg_bin)
    config.addinivalue_line("markers", "root: needs root (BPF, uprobes, initdb as postgres)")
    config.addinivalue_line("markers", "bpf: loads real BPF programs")
    config.addinivalue_line(
        "markers",
        'pg(spec): run only against a server whose major version satisfies spec, e.g. ">= 17"',
    )


# --- the server version under test --------------------------------------------------------

_major_key = pytest.StashKey[int]()
_version_skip_key = pytest.StashKey[bool]()


def _major_under_test(config: pytest.Config) -> int:
    """The major version of the server the tests run against (looked up once)."""
    if _major_key not in config.stash:
        external = os.environ.get("PGTRACE_TEST_DSN")
        if external:
            num = first_value(external, "show server_version_num")
            config.stash[_major_key] = int(num) // 10000
        else:
            bin_dir = find_pg_bin(pg_bin=config.getoption("--pg-bin"))
            config.stash[_major_key] = server_major(bin_dir)
    return config.stash[_major_key]


@pytest.fixture(scope="session")
def pg_major(pytestconfig: pytest.Config) -> int:
    return _major_under_test(pytestconfig)


def _version_mismatch(item: pytest.Item) -> str | None:
    """Why the item does not run against this server version (None: it does)."""
    specs = [str(m.args[0]) for m in item.iter_markers("pg")]
    if not specs:
        return None
    for spec in specs:
        parse_spec(spec)  # a typo in a spec is an error, not a skip
    major = _major_under_test(item.config)
    failing = [spec for spec in specs if not matches(spec, major)]
    if failing:
        return f"needs PostgreSQL {' and '.join(failing)}; the server under test is {major}"
    return None


def discover_pg_bins() -> list[str]:
    """Bin dirs of the Debian packages and of scripts/build-postgres.sh's builds, by version."""
    found: dict[int, str] = {}
    candidates = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob(f"{BUILD_ROOT}/pg*/bin")
    for bin_dir in sorted(candidates):
        if not os.access(os.path.join(bin_dir, "postgres"), os.X_OK):
            continue
        with contextlib.suppress(Exception):
            found.setdefault(server_major(bin_dir), bin_dir)
    return [found[m] for m in sorted(found)]


@pytest.fixture(scope="session")
def all_pg_bins() -> list[str]:
    listed = os.environ.get("PGTRACE_TEST_PGBINS", "").split()
    return listed or discover_pg_bins()


# --- clusters -------------------------------------------------------------------------------


class ClusterLike(Protocol):
    bin_dir: str
    data_dir: str
    socket_dir: str
    port: int
    postmaster_pid: int

    @property
    def dsn(self) -> str: ...

    def psql(self, sql: str) -> str: ...

    def stop(self) -> None: ...


@dataclass
class ExternalCluster:
    """A server we were pointed at with $PGTRACE_TEST_DSN: same attributes, never stopped."""

    bin_dir: str
    data_dir: str
    socket_dir: str
    port: int
    postmaster_pid: int
    dsn: str

    @classmethod
    def attach(cls, dsn: str) -> ExternalCluster:
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute(
                "select current_setting('data_directory'), current_setting('port'),"
                " current_setting('unix_socket_directories')"
            ).fetchone()
        assert row is not None
        data_dir, port, sockets = str(row[0]), int(row[1]), str(row[2])
        pid = 0
        try:
            with open(os.path.join(data_dir, "postmaster.pid"), encoding="utf-8") as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            pass  # server on another host/container, or not readable by us
        bin_dir = ""
        if pid:
            with contextlib.suppress(OSError):
                bin_dir = os.path.dirname(os.readlink(f"/proc/{pid}/exe"))
        socket_dir = sockets.split(",")[0].strip()
        return cls(bin_dir, data_dir, socket_dir, port, pid, dsn)

    def psql(self, sql: str) -> str:
        return first_value(self.dsn, sql)

    def stop(self) -> None:
        """Never stop a server we did not start."""


@pytest.fixture(scope="session")
def pg_bin(pytestconfig: pytest.Config) -> str | None:
    value: str | None = pytestconfig.getoption("--pg-bin")
    return value


@pytest.fixture(scope="session")
def pg_cluster(pg_bin: str | None) -> Iterator[ClusterLike]:
    external = os.environ.get("PGTRACE_TEST_DSN")
    if external:
        yield ExternalCluster.attach(external)
        return
    cluster = start_cluster(bin_dir=pg_bin)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def dsn(pg_cluster: ClusterLike) -> str:
    return pg_cluster.dsn


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    c = psycopg.connect(dsn, autocommit=True)
    try:
        yield c
    finally:
        c.close()


# --- root / bpf policy ----------------------------------------------------------------------

_bcc_error: list[str] = []  # cached: [] unknown, [""] importable, [msg] not importable


def _bcc_problem() -> str:
    if not _bcc_error:
        try:
            import bcc  # noqa: F401
        except Exception as e:  # ImportError, or bcc failing to load libbcc
            _bcc_error.append(f"bcc cannot be imported: {e}")
        else:
            _bcc_error.append("")
    return _bcc_error[0]


_stats_key = pytest.StashKey[dict[str, int]]()


def _stats(config: pytest.Config) -> dict[str, int]:
    if _stats_key not in config.stash:
        config.stash[_stats_key] = {
            "collected_bpf": 0, "ran": 0, "ran_bpf": 0, "skipped": 0, "version_skipped": 0
        }
    return config.stash[_stats_key]


def _guarded(item: pytest.Item) -> list[str]:
    return [m for m in GUARDED_MARKERS if item.get_closest_marker(m) is not None]


def pytest_collection_finish(session: pytest.Session) -> None:
    def for_this_version(item: pytest.Item) -> bool:
        try:
            return _version_mismatch(item) is None
        except Exception:  # no server to ask: the test itself will say so
            return True

    _stats(session.config)["collected_bpf"] = sum(
        1
        for item in session.items
        if item.get_closest_marker("bpf") is not None and for_this_version(item)
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    mismatch = _version_mismatch(item)
    if mismatch is not None:
        item.stash[_version_skip_key] = True
        pytest.skip(mismatch)
    marks = _guarded(item)
    if "root" in marks and os.geteuid() != 0:
        pytest.skip("needs root (run: sudo bash scripts/test.sh)")
    if "bpf" in marks:
        problem = _bcc_problem()
        if problem:
            pytest.skip(f"{problem} (run: sudo bash scripts/setup.sh)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    rep: pytest.TestReport = outcome.get_result()
    stats = _stats(item.config)
    if rep.skipped and item.stash.get(_version_skip_key, False):
        stats["version_skipped"] += 1  # the matrix: another server version runs this test
        return
    marks = _guarded(item)
    if not marks:
        return
    if rep.skipped and not hasattr(rep, "wasxfail"):
        stats["skipped"] += 1
        if _in_ci():
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            rep.outcome = "failed"
            rep.longrepr = (
                f"CI=true: a {'/'.join(marks)} test must run, but it was skipped: {reason}"
            )
    elif rep.when == "call":
        stats["ran"] += 1
        if "bpf" in marks:
            stats["ran_bpf"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stats = _stats(session.config)
    if _in_ci() and stats["collected_bpf"] > 0 and stats["ran_bpf"] == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    stats = _stats(config)
    line = f"pgtrace: {stats['ran']} root/BPF tests ran ({stats['ran_bpf']} BPF)"
    if stats["skipped"]:
        line += f", {stats['skipped']} skipped"
    with contextlib.suppress(Exception):  # no server at all: a unit-test-only machine
        line += f"; server under test: PostgreSQL {_major_under_test(config)}"
    if stats["version_skipped"]:
        n = stats["version_skipped"]
        line += f", {n} test{'s' if n != 1 else ''} not for this version"
    terminalreporter.write_line(line)
    if _in_ci() and stats["collected_bpf"] > 0 and stats["ran_bpf"] == 0:
        terminalreporter.write_line(
            f"pgtrace: CI=true but none of the {stats['collected_bpf']} BPF tests ran: failing",
            red=True,
        )
