"""pg_wal on a throttled block device: a loop device in a blkio cgroup (v1) with limits.

The cluster's processes join the cgroup, so the WAL writes and flushes they issue
to the loop device are held to the IOPS and bandwidth given, like a network SSD
(seed 000: 11k IOPS, 150 MB/s). Everything is undone on exit, in reverse order.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pgtrace.cluster import SERVER_USER, TempCluster
from pgtrace.errors import SetupError
from pgtrace.proc import children

BLKIO = Path("/sys/fs/cgroup/blkio")
DEVICE_BYTES = 2 << 30  # sparse; WAL segments are 16 MB
LIMIT_FILES = {"write_iops": "blkio.throttle.write_iops_device",
               "write_bps": "blkio.throttle.write_bps_device",
               "read_iops": "blkio.throttle.read_iops_device",
               "read_bps": "blkio.throttle.read_bps_device"}


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout}")
    return res.stdout.strip()


def check_blkio() -> None:
    """SetupError unless the cgroup v1 blkio controller with throttling is mounted."""
    if not (BLKIO / "blkio.throttle.write_iops_device").exists():
        raise SetupError(
            f"no blkio throttling at {BLKIO} (cgroup v1 blkio controller)",
            "mount it: mkdir -p /sys/fs/cgroup/blkio && "
            "mount -t cgroup -o blkio none /sys/fs/cgroup/blkio")
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            raise SetupError(f"{tool} is not installed (util-linux, e2fsprogs)")


def cluster_pids(postmaster_pid: int) -> list[int]:
    """The postmaster and its children, from /proc."""
    return [postmaster_pid, *children(postmaster_pid)]


def _move(pids: list[int], cgroup: Path) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):  # a backend may exit meanwhile
            (cgroup / "cgroup.procs").write_text(str(pid))


def _stop_server(cluster: TempCluster) -> None:
    ctl = os.path.join(cluster.bin_dir, "pg_ctl")
    cmd = [ctl, "stop", "-w", "-t", "60", "-m", "fast", "-D", cluster.data_dir]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", SERVER_USER, "--", *cmd]
    _run(cmd)


@contextlib.contextmanager
def throttled_wal(cluster: TempCluster, limits: dict[str, int]) -> Iterator[tuple[str, str]]:
    """Move the private cluster's pg_wal to a throttled loop device; yield (device, cgroup)."""
    check_blkio()
    unknown = set(limits) - set(LIMIT_FILES)
    if unknown:
        raise SetupError(f"unknown wal_device limits {sorted(unknown)}")
    base = Path(cluster.base_dir or os.path.dirname(cluster.data_dir))
    image, mnt = base / "wal.img", base / "walmnt"
    cgroup = BLKIO / f"pgtrace-lab-{os.getpid()}"
    with contextlib.ExitStack() as undo:
        with open(image, "wb") as f:
            f.truncate(DEVICE_BYTES)
        undo.callback(image.unlink, missing_ok=True)
        dev = _run(["losetup", "--find", "--show", str(image)])
        undo.callback(_run, ["losetup", "-d", dev])
        _run(["mkfs.ext4", "-q", "-F", dev])
        mnt.mkdir()
        undo.callback(mnt.rmdir)
        _run(["mount", dev, str(mnt)])
        undo.callback(_run, ["umount", str(mnt)])
        # the server is stopped to move pg_wal, and stopped again before the unmount
        _stop_server(cluster)
        undo.callback(_stop_server_if_running, cluster)
        wal = Path(cluster.data_dir) / "pg_wal"
        target = mnt / "pg_wal"
        shutil.copytree(wal, target, symlinks=True)
        shutil.rmtree(wal)
        wal.symlink_to(target)
        st = os.stat(cluster.data_dir)
        for path in (mnt, target, *target.rglob("*")):
            os.chown(path, st.st_uid, st.st_gid)
        cgroup.mkdir()
        undo.callback(_remove_cgroup, cgroup)
        major_minor = Path(f"/sys/class/block/{os.path.basename(dev)}/dev").read_text().strip()
        for key, value in limits.items():
            (cgroup / LIMIT_FILES[key]).write_text(f"{major_minor} {value}")
        cluster.restart()  # pg_ctl restart starts a stopped server
        _move(cluster_pids(cluster.postmaster_pid), cgroup)
        yield dev, str(cgroup)


def _stop_server_if_running(cluster: TempCluster) -> None:
    if os.path.exists(os.path.join(cluster.data_dir, "postmaster.pid")):
        _stop_server(cluster)


def _remove_cgroup(cgroup: Path) -> None:
    """Move any process left back to the root cgroup, then remove the cgroup."""
    with contextlib.suppress(OSError):
        _move([int(p) for p in (cgroup / "cgroup.procs").read_text().split()], BLKIO)
    cgroup.rmdir()
