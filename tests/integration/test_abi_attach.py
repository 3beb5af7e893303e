"""Drift between the probes' C and the Python mirror stops `pgtrace attach` with one line."""

from __future__ import annotations

import os

import pytest

from pgtrace.cli import cli
from pgtrace.collect.events import abi_header
from pgtrace.errors import AbiMismatchError
from tests.conftest import ClusterLike

pytestmark = [pytest.mark.root, pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]


def _bpf_fds() -> int:
    """BPF programs and maps this process holds open."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:bpf")
        except OSError:
            continue
    return n


def test_drift_fails_attach_with_one_line(
    pg_cluster: ClusterLike, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = abi_header
    # the C side of task_state grows a field the Python mirror does not know
    monkeypatch.setattr("pgtrace.collect.loader.abi_header", lambda: real().replace(
        "\tu64 last_ts;", "\tu64 last_ts;\n\tu64 drifted;"))
    before = _bpf_fds()
    with pytest.raises(SystemExit) as exc:
        cli.main(["attach", "-p", str(pg_cluster.postmaster_pid), "-d", "1"])
    lines = capsys.readouterr().err.splitlines()  # progress lines, then the error
    err = lines[-1]
    assert exc.value.code == AbiMismatchError.exit_code == 5
    assert [ln for ln in lines if ln.startswith("pgtrace:")] == [err], lines
    assert err.startswith("pgtrace: the BPF map states's value layout is not pgtrace's mirror: "
                          ".wake_ts is at 8, 8 bytes, u64 in Python, .drifted at 8"), err
    assert _bpf_fds() == before  # the loaded programs and maps were closed
