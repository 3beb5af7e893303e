"""Server settings read without a connection: `postgres -C NAME` with the postmaster's args.

The server's binary runs as the data directory's owner (its uid, its gid, no supplementary
groups, hence no capabilities), with an empty environment and no inherited descriptors;
never as root, even when the data directory is root's.
"""

from __future__ import annotations

import os
import subprocess

from pgtrace.proc import argv, cmdline

#: Settings that matter for write latency, kept in every capture's header.
WRITE_SETTINGS: tuple[str, ...] = (
    "wal_sync_method",
    "synchronous_commit",
    "fsync",
    "full_page_writes",
    "wal_compression",
    "commit_delay",
    "commit_siblings",
    "wal_buffers",
    "wal_writer_delay",
    "shared_buffers",
    "checkpoint_timeout",
    "max_wal_size",
    "track_activities",
    # PostgreSQL 18+ (left out on older servers): asynchronous I/O, which moves relation
    # reads to I/O workers (worker) or the kernel (io_uring)
    "io_method",
    "io_workers",
    "io_max_concurrency",
    "ssl",
)


def postmaster_args(pid: int) -> list[str]:
    """The postmaster's command line ([] when it is gone)."""
    return argv(cmdline(pid))


def server_settings(
    binary: str, postmaster_pid: int, data_dir: str, names: tuple[str, ...] = WRITE_SETTINGS
) -> dict[str, str]:
    """Values from the server's configuration files (as the data directory's owner).

    Settings changed by SET or per role/database are not seen; a setting that
    cannot be read is left out.
    """
    command = postmaster_args(postmaster_pid)
    try:
        st = os.stat(data_dir)
    except OSError:
        return {}
    if not command:
        return {}  # the postmaster is gone
    args = command[1:]
    if st.st_uid == 0:
        return {}  # PostgreSQL never runs as root: whatever runs here is not a server to trust
    out: dict[str, str] = {}
    for name in names:
        try:
            res = run_as_owner([binary, *args, "-C", name], st.st_uid, st.st_gid)
        except (OSError, subprocess.SubprocessError):
            continue
        if res.returncode == 0 and res.stdout.strip():
            out[name] = res.stdout.strip()
    return out


def run_as_owner(cmd: list[str], uid: int, gid: int,
                 timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run `cmd` as uid:gid when we are root (as ourselves otherwise); never as uid 0."""
    if uid == 0:
        raise PermissionError("pgtrace runs nothing of a server's as root")
    root = os.geteuid() == 0
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd="/",
        stdin=subprocess.DEVNULL, close_fds=True,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/"},
        user=uid if root else None, group=gid if root else None,
        extra_groups=[] if root else None,
    )
