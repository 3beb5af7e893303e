"""Flame-graph stacks: folded lines whose off-CPU time agrees with the buckets."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import pytest

from pgtrace.attach import AttachOptions, trace_during
from pgtrace.cluster import start_cluster

pytestmark = [pytest.mark.root, pytest.mark.bpf]

FOLDED = re.compile(r"^\S(?:[^\n]*\S)? \d+$")


def test_stacks_agree_with_buckets(tmp_path: Any) -> None:
    with start_cluster() as c:
        c.psql("create table st(id bigint generated always as identity primary key, v int)")
        script = tmp_path / "ins.sql"
        script.write_text("insert into st(v) values (1);\n")
        os.chmod(tmp_path, 0o755)
        os.chmod(script, 0o644)

        def load(_s: object) -> int:
            return subprocess.run(
                [os.path.join(c.bin_dir, "pgbench"), "-n", "-h", c.socket_dir, "-p",
                 str(c.port), "-U", "postgres", "-c", "8", "-T", "3", "-f", str(script),
                 "postgres"], capture_output=True, check=False).returncode

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
