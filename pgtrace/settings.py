"""Server settings read without a connection: `postgres -C NAME` with the postmaster's args."""

from __future__ import annotations

import os
import subprocess

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
    """The postmaster's command line."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def server_settings(
    binary: str, postmaster_pid: int, data_dir: str, names: tuple[str, ...] = WRITE_SETTINGS
) -> dict[str, str]:
    """Values from the server's configuration files (as the data directory's owner).

    Settings changed by SET or per role/database are not seen; a setting that
    cannot be read is left out.
    """
    try:
        args = postmaster_args(postmaster_pid)[1:]
        owner = os.stat(data_dir).st_uid
    except OSError:
        return {}
    out: dict[str, str] = {}
    for name in names:
        try:
            res = subprocess.run(
                [binary, *args, "-C", name],
                capture_output=True,
                text=True,
                timeout=10,
                user=owner if os.geteuid() == 0 else None,
                cwd="/",
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0 and res.stdout.strip():
            out[name] = res.stdout.strip()
    return out
