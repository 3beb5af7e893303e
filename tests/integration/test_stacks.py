"""Flame-graph stacks: folded lines whose off-CPU time agrees with the buckets."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from pgtrace.attach import AttachOptions, trace_during
from pgtrace.cluster import TempCluster, start_cluster
from tests.integration.workload import wait_for

pytestmark = [pytest.mark.root, pytest.mark.bpf]

FOLDED = re.compile(r"^\S(?:[^\n]*\S)? \d+$")
READY = "Tracing... hit Ctrl-C to end."


def insert_bench(c: TempCluster, tmp_path: Any, clients: int,
                 seconds: int) -> Callable[[object], int]:
    """A table of inserts on `c`; the callable runs pgbench on it, returning its exit code."""
    c.psql("create table if not exists st"
           "(id bigint generated always as identity primary key, v int)")
    script = tmp_path / "ins.sql"
    script.write_text("insert into st(v) values (1);\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(script, 0o644)

    def load(_s: object) -> int:
        return subprocess.run(
            [os.path.join(c.bin_dir, "pgbench"), "-n", "-h", c.socket_dir, "-p",
             str(c.port), "-U", "postgres", "-c", str(clients), "-T", str(seconds), "-f",
             str(script), "postgres"], capture_output=True, check=False).returncode

    return load


def test_stacks_agree_with_buckets(tmp_path: Any) -> None:
    with start_cluster() as c:
        load = insert_bench(c, tmp_path, 8, 3)
        result, code = trace_during(AttachOptions(pids=[c.postmaster_pid], stacks=True), load)
    assert code == 0
    stacks = result.header["stacks"]
    assert stacks["oncpu"] and stacks["offcpu"]
    for line in stacks["oncpu"] + stacks["offcpu"]:
        assert FOLDED.match(line), line
    assert any("PostgresMain" in line for line in stacks["oncpu"])
    off: dict[str, int] = {}
    for line in stacks["offcpu"]:
        frames, n = line.rsplit(" ", 1)
        bucket = frames.split(";", 1)[0].strip("[]")
        off[bucket] = off.get(bucket, 0) + int(n)
    df = result.frame
    # blocked time by bucket: never more than the bucket, and most of a blocking bucket
    for bucket in ("lwlock", "fsync"):
        total = int(df[bucket].sum())
        assert total > 0, bucket
        assert off.get(bucket, 0) <= total * 1.01, (bucket, off.get(bucket), total)
        assert off.get(bucket, 0) >= total * 0.5, (bucket, off.get(bucket), total)


def test_attach_stacks_writes_folded_files(tmp_path: Any) -> None:
    """`pgtrace attach --stacks -o X` writes X.oncpu.folded and X.offcpu.folded (0600), as
    the README and --help say: folded stacks of the traced backends, non-empty."""
    pgtrace = os.path.join(os.path.dirname(sys.executable), "pgtrace")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with start_cluster() as c:
        load = insert_bench(c, tmp_path, 4, 2)
        capture = tmp_path / "run.pgtrace"
        err_path = tmp_path / "attach.err"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [pgtrace, "attach", "-p", str(c.postmaster_pid), "--stacks", "--duration",
                 "6", "-o", str(capture)],
                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env)
        try:
            wait_for(lambda: proc.poll() is not None or READY in err_path.read_text(), 60,
                     "pgtrace to attach")
            assert proc.poll() is None, err_path.read_text()
            assert load(None) == 0, "pgbench failed"
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    assert rc == 0, err_path.read_text()
    for kind in ("oncpu", "offcpu"):
        path = tmp_path / f"run.pgtrace.{kind}.folded"
        assert path.exists(), f"{path.name} not written; stderr: {err_path.read_text()}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
        lines = path.read_text().splitlines()
        assert lines, f"{path.name} is empty"
        bad = [line for line in lines if not FOLDED.match(line)]
        assert not bad, f"{path.name}: not folded stacks: {bad[:3]}"
        assert f"wrote {path}" in err_path.read_text()
    oncpu = (tmp_path / "run.pgtrace.oncpu.folded").read_text()
    assert "PostgresMain" in oncpu
