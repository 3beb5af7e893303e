"""A private, throwaway PostgreSQL cluster.

Used by the test fixtures and by ``pgtrace run`` without ``--dsn``: initdb into a fresh
temporary directory, listen on a free port on 127.0.0.1 and on a Unix socket inside that
directory, and remove everything on ``stop()``. Nothing global is registered: whoever starts a
cluster stops it (``with start_cluster() as c:`` does that).

When we are root, every server-side command runs as the ``postgres`` OS user (PostgreSQL
refuses to run as root); otherwise it runs as the current user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psycopg

from pgtrace.errors import ServerError, SetupError

log = logging.getLogger(__name__)

PG_LIB_ROOT = "/usr/lib/postgresql"
SERVER_USER = "postgres"
_TOOLS = ("initdb", "pg_ctl", "postgres")
_START_ATTEMPTS = 5
_LOG_TAIL_LINES = 30
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


def find_pg_bin(major: int | None = None, pg_bin: str | None = None) -> str:
    """The directory holding initdb, pg_ctl and postgres.

    Order: ``pg_bin``, then ``$PGTRACE_PGBIN``, then ``/usr/lib/postgresql/<major>/bin``
    (the newest installed major when ``major`` is None).
    """
    hint = "run 'sudo bash scripts/setup.sh', or point PGTRACE_PGBIN at a PostgreSQL bin dir"
    chosen = pg_bin or os.environ.get("PGTRACE_PGBIN") or None
    if chosen is None:
        if major is not None:
            chosen = f"{PG_LIB_ROOT}/{major}/bin"
        else:
            majors = _installed_majors()
            if not majors:
                raise SetupError(f"no PostgreSQL server found under {PG_LIB_ROOT}", hint)
            chosen = f"{PG_LIB_ROOT}/{majors[-1]}/bin"
    bin_dir = os.path.abspath(chosen)
    missing = [t for t in _TOOLS if not os.access(os.path.join(bin_dir, t), os.X_OK)]
    if missing:
        raise SetupError(
            f"{bin_dir} is not a PostgreSQL server bin dir (missing {', '.join(missing)})", hint
        )
    return bin_dir


def _installed_majors() -> list[int]:
    root = Path(PG_LIB_ROOT)
    if not root.is_dir():
        return []
    majors = [
        int(p.name)
        for p in root.iterdir()
        if p.name.isdigit() and all((p / "bin" / t).exists() for t in _TOOLS)
    ]
    return sorted(majors)


def server_major(bin_dir: str) -> int:
    """The major version of ``<bin_dir>/postgres`` (e.g. 15), read from the binary, not run."""
    from pgtrace.errors import PgtraceError
    from pgtrace.target import binary_version

    try:
        return binary_version(os.path.join(bin_dir, "postgres"))[1]
    except PgtraceError as exc:
        raise SetupError(f"cannot tell the version of {bin_dir}/postgres: "
                                f"{exc.message}") from None


def pkglibdir(bin_dir: str) -> str:
    """Where the server's extension libraries live (``pg_config --pkglibdir``)."""
    pg_config = os.path.join(bin_dir, "pg_config")
    if os.access(pg_config, os.X_OK):
        res = subprocess.run(  # as the server's user when we are root, like initdb
            _as_owner([pg_config, "--pkglibdir"]), capture_output=True, text=True, check=False,
            stdin=subprocess.DEVNULL, env=_server_env(), cwd="/",
        )
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.strip()
    return os.path.join(os.path.dirname(bin_dir), "lib")


def default_preload(bin_dir: str) -> list[str]:
    """Libraries to preload by default: pg_wait_sampling when it is installed."""
    libdir = pkglibdir(bin_dir)
    return [lib for lib in ("pg_wait_sampling",) if os.path.exists(f"{libdir}/{lib}.so")]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def first_value(dsn: str, sql: str) -> str:
    """Run ``sql`` at ``dsn``; the first column of the first row as text, or ""."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.encode())
        res = cur.pgresult
        if res is None or res.ntuples == 0 or res.nfields == 0:
            return ""
        value = res.get_value(0, 0)
        return "" if value is None else value.decode("utf-8", "replace")


@dataclass
class TempCluster:
    """A running private cluster; ``stop()`` shuts it down and deletes its directory."""

    bin_dir: str
    data_dir: str
    socket_dir: str
    port: int
    postmaster_pid: int
    base_dir: str = ""
    _stopped: bool = field(default=False, repr=False, compare=False)

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} dbname=postgres user=postgres"

    @property
    def log_file(self) -> str:
        return os.path.join(self.base_dir or os.path.dirname(self.data_dir), "log")

    def psql(self, sql: str) -> str:
        """Run ``sql``; the first column of the first row as the server's text, or ""."""
        return first_value(self.dsn, sql)

    def restart(self) -> None:
        """Restart the server (e.g. after ALTER SYSTEM of a postmaster-level setting)."""
        res = _pg_ctl(self.bin_dir, self.data_dir, "restart", "-m", "fast", "-l", self.log_file)
        if res.returncode != 0:
            raise ServerError(
                f"pg_ctl restart failed for {self.data_dir}: {res.stdout.strip()}"
                + _log_tail(self.log_file)
            )
        self.postmaster_pid = _read_postmaster_pid(self.data_dir)

    def stop(self) -> None:
        """Stop the server (fast) and remove its directory. Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        if os.path.exists(os.path.join(self.data_dir, "postmaster.pid")):
            res = _pg_ctl(self.bin_dir, self.data_dir, "stop", "-m", "fast")
            if res.returncode != 0:
                log.debug("pg_ctl stop failed (%s): %s", res.returncode, res.stdout.strip())
        _kill_if_ours(self.postmaster_pid, self.data_dir)
        shutil.rmtree(self.base_dir or os.path.dirname(self.data_dir), ignore_errors=True)
        log.debug("cluster on port %d removed", self.port)

    def __enter__(self) -> TempCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_cluster(
    *,
    bin_dir: str | None = None,
    settings: dict[str, str] | None = None,
    base_dir: str | None = None,
    preload: list[str] | None = None,
) -> TempCluster:
    """initdb and start a private cluster; raise ServerError with the log tail on failure.

    ``preload`` None means the default (pg_wait_sampling when installed); ``settings`` are
    written last, so they override everything including ``shared_preload_libraries``.
    """
    bin_dir = find_pg_bin(pg_bin=bin_dir)
    major = server_major(bin_dir)
    libs = default_preload(bin_dir) if preload is None else list(preload)
    owner = _server_owner()

    parent = os.path.abspath(base_dir or tempfile.gettempdir())
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if owner is not None:
        _check_traversable(parent, owner)
    base = tempfile.mkdtemp(prefix="pgtrace-pg-", dir=parent)
    try:
        os.chmod(base, 0o700)
        if owner is not None:
            os.chown(base, owner.pw_uid, owner.pw_gid)
        if len(base) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH:
            raise SetupError(
                f"{base} is too long for a Unix socket path",
                "pass a shorter base_dir or set TMPDIR to a short path",
            )
        data = os.path.join(base, "data")
        logfile = os.path.join(base, "log")
        _initdb(bin_dir, data, base)

        conf_path = os.path.join(data, "postgresql.conf")
        with open(conf_path, encoding="utf-8") as f:
            original_conf = f.read()
        last_error = ""
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = free_port()
            conf: dict[str, str] = {
                "listen_addresses": "127.0.0.1",
                "port": str(port),
                "unix_socket_directories": base,
                "max_connections": "200",
                "fsync": "on",
                "track_io_timing": "on",
                "shared_preload_libraries": ",".join(libs),
            }
            if major >= 14:
                conf["track_wal_io_timing"] = "on"
            conf.update(settings or {})
            with open(conf_path, "w", encoding="utf-8") as f:
                f.write(original_conf + _conf_block(conf))

            res = _pg_ctl(bin_dir, data, "start", "-t", "60", "-l", logfile)
            if res.returncode == 0:
                pid = _read_postmaster_pid(data)
                log.debug("cluster started: %s port %d pid %d", base, port, pid)
                return TempCluster(
                    bin_dir=bin_dir,
                    data_dir=data,
                    socket_dir=base,
                    port=port,
                    postmaster_pid=pid,
                    base_dir=base,
                )
            tail = _log_tail(logfile)
            last_error = f"pg_ctl start failed: {res.stdout.strip()}{tail}"
            # A server half up (e.g. timed out) must not outlive us.
            _pg_ctl(bin_dir, data, "stop", "-m", "immediate")
            if "could not bind" in tail or "already in use" in tail:
                log.debug("port %d taken (attempt %d), retrying", port, attempt)
                continue
            break
        raise ServerError(last_error, f"data directory was {data}")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


def _conf_block(conf: dict[str, str]) -> str:
    lines = ["", "# --- pgtrace private cluster ---"]
    for key, value in conf.items():
        escaped = value.replace("\\", "\\\\").replace("'", "''")
        lines.append(f"{key} = '{escaped}'")
    return "\n".join(lines) + "\n"


def _server_owner() -> pwd.struct_passwd | None:
    """The OS user to run the server as when we are root; None means 'as ourselves'."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise SetupError(
            f"running as root but there is no '{SERVER_USER}' OS user to run the server",
            "install the postgresql package (scripts/setup.sh) or run as a non-root user",
        ) from None


def _check_traversable(path: str, owner: pwd.struct_passwd) -> None:
    """The server user must be able to reach ``path`` (every ancestor searchable)."""
    p = Path(path)
    for d in [p, *p.parents]:
        st = d.stat()
        if st.st_uid == owner.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == owner.pw_gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise SetupError(
                f"the '{owner.pw_name}' user cannot enter {d} (mode {stat.S_IMODE(st.st_mode):o})",
                f"choose a base dir whose parents are world-searchable, not under {d}",
            )


def _as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_USER, "--", *cmd]
    return cmd


def _server_env() -> dict[str, str]:
    """Our environment without libpq/server variables that could redirect the commands."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    return env


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    log.debug("running %s", " ".join(cmd))
    return subprocess.run(
        _as_owner(cmd),
        cwd=cwd,
        env=_server_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )


def _initdb(bin_dir: str, data: str, cwd: str) -> None:
    res = _run(
        [
            os.path.join(bin_dir, "initdb"),
            "-D",
            data,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        cwd,
    )
    if res.returncode != 0:
        tail = "\n".join(res.stdout.strip().splitlines()[-_LOG_TAIL_LINES:])
        raise ServerError(f"initdb failed in {data}:\n{tail}")


def _pg_ctl(bin_dir: str, data: str, action: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [os.path.join(bin_dir, "pg_ctl"), action, "-w", "-D", data, *args]
    if action in ("stop", "restart") and "-t" not in args:
        cmd += ["-t", "60"]
    return _run(cmd, os.path.dirname(data))


def _read_postmaster_pid(data: str) -> int:
    path = os.path.join(data, "postmaster.pid")
    try:
        with open(path, encoding="utf-8") as f:
            return int(f.readline().strip())
    except (OSError, ValueError) as e:
        raise ServerError(f"cannot read the postmaster pid from {path}: {e}") from None


def _log_tail(logfile: str) -> str:
    try:
        with open(logfile, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return ""
    if not lines:
        return ""
    return "\n--- server log (last lines) ---\n" + "\n".join(lines)


def _is_ours(pid: int, data_dir: str) -> bool:
    """True when ``pid`` is alive and is a server of ``data_dir`` (its cwd), not a reused pid."""
    try:
        return os.path.realpath(f"/proc/{pid}/cwd") == os.path.realpath(data_dir)
    except OSError:
        return False


def _kill_if_ours(pid: int, data_dir: str) -> None:
    """Last resort when pg_ctl could not stop the server: SIGQUIT, then SIGKILL."""
    if pid <= 0 or not _is_ours(pid, data_dir):
        return
    for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _is_ours(pid, data_dir):
                return
            time.sleep(0.05)
