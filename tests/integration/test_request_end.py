"""Where a request ends: the send that carries its ReadyForQuery.

On a plaintext stream pgtrace recognises the 'Z' message in the bytes sent (no uprobe);
these tests hold it to exact counts where that is hardest: answers far larger than the
send buffer (many sends, short writes on a full socket, each before the one that ends
the request). On an encrypted stream (ssl = on) the bytes cannot be read, and a uprobe
on ReadyForQuery marks the send instead: a TLS connection's requests are counted
exactly too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import pq

from pgtrace.cluster import TempCluster, _server_owner, start_cluster
from tests.conftest import ClusterLike
from tests.integration.workload import traced

pytestmark = [pytest.mark.root, pytest.mark.bpf]

BIG = 3_000_000  # bytes in one answer: hundreds of 8 kB sends


def test_large_answers_end_their_request_once(pg_cluster: ClusterLike) -> None:
    # prepare_threshold=None: no automatic PREPARE round trips besides the statements
    with psycopg.connect(pg_cluster.dsn, autocommit=True, prepare_threshold=None) as conn:
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(row[0])

        def work(_session: object) -> int:
            # a backend already connected and idle counts its next request (issue 14)
            conn.execute("select 'first'")
            n = 1
            for _ in range(15):
                big = conn.execute("select repeat('x', %s)", (BIG,)).fetchone()
                assert big is not None and len(big[0]) == BIG
                conn.execute("select 1")
                # a buffer full of bytes that end like a ReadyForQuery is not one
                conn.execute("select decode('5a0000000549', 'hex')")
                n += 3
            return n

        tr = traced(pg_cluster.postmaster_pid, work)
    df = tr.run.frame
    mine = df[df["pid"] == pid]
    assert len(mine) == tr.value, f"{len(mine)} requests traced for {tr.value} statements"
    assert (mine["depth_at_end"] == 0).all()
    assert tr.run.header["engine"]["request_end"] == "send of 'Z'"


@pytest.fixture(scope="module")
def tls_cluster(pg_bin: str | None) -> Iterator[TempCluster]:
    """A cluster with ssl = on and a throwaway self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the TLS test (scripts/setup.sh installs it)")
    keydir = tempfile.mkdtemp(prefix="pgtrace-tls-")
    try:
        key, crt = os.path.join(keydir, "server.key"), os.path.join(keydir, "server.crt")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-keyout", key, "-out", crt],
                       check=True, capture_output=True)
        owner = _server_owner()
        os.chmod(keydir, 0o755)
        os.chmod(key, 0o600)
        if owner is not None:
            for f in (key, crt):
                os.chown(f, owner.pw_uid, owner.pw_gid)
        cluster = start_cluster(bin_dir=pg_bin, settings={
            "ssl": "on", "ssl_cert_file": crt, "ssl_key_file": key})
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(keydir, ignore_errors=True)


def test_tls_requests_end_at_ready_for_query(tls_cluster: TempCluster) -> None:
    dsn = f"host=127.0.0.1 port={tls_cluster.port} user=postgres dbname=postgres sslmode=require"
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        assert conn.pgconn.ssl_in_use
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(row[0])
        conn.execute("create table tls_t (id int)")

        def work(_session: object) -> int:
            conn.execute("select 'first'")  # idle at attach: counted too
            for i in range(40):
                conn.execute("insert into tls_t values (%s)", (i,))
            # a Flush read alone after the answer opens no request, encrypted too
            pg = conn.pgconn
            pg.enter_pipeline_mode()
            pg.send_query_params(b"select 1", None)
            pg.pipeline_sync()
            while pg.flush():
                pass
            while (res := pg.get_result()) is None or res.status != pq.ExecStatus.PIPELINE_SYNC:
                pass
            pg.send_flush_request()
            while pg.flush():
                pass
            time.sleep(0.5)  # the client pauses: never server time
            pg.exit_pipeline_mode()
            conn.execute("select 'last'")
            return 43

        tr = traced(tls_cluster.postmaster_pid, work)
    assert tr.run.header["engine"]["request_end"] == "ReadyForQuery uprobe"
    df = tr.run.frame
    mine = df[df["pid"] == pid]
    assert len(mine) == tr.value, mine[["seq", "server_ns", "fingerprint"]].to_string()
    assert tr.run.header["counters"]["unanswered"] == 1
    # the request after the Flush starts after the pause, not at the Flush
    assert (mine["server_ns"] < 500_000_000).all(), mine["server_ns"].max()
