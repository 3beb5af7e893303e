"""e2e.py on synthetic frames: the join, the run-queue overlap, the end-to-end split.

The simulated driver follows the driver's contract: one request in flight per
connection (backend pid), each request's server record contained in
[t_send, t_recv] of that connection, plus connection setup records that no
client request owns. Every client row carries the id of its true server record
(``truth``), so the join can be checked row by row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pgtrace.e2e import e2e_frame, e2e_summary, e2e_table, join_requests, runq_overlap, tail_shares
from pgtrace.model import E2E_BUCKETS, SERVER_BUCKETS, UNEXPLAINED

BASE = 5_000_000_000_000  # a CLOCK_MONOTONIC reading ~83 minutes after boot
E2E_COLUMNS = ["e2e_unexplained" if b == UNEXPLAINED else b for b in E2E_BUCKETS]


def server_row(pid: int, t_start: int, t_end: int, rid: int, wakeup: int = 0,
               rng: np.random.Generator | None = None) -> dict[str, int]:
    """A server record whose buckets split its time (randomly if rng), the rest unexplained."""
    server = t_end - t_start
    parts = [0] * len(SERVER_BUCKETS)
    if rng is not None and server > 0:
        cuts = np.sort(rng.integers(0, server + 1, len(SERVER_BUCKETS)))
        parts = np.diff(np.concatenate([[0], cuts])).tolist()  # sums to cuts[-1] <= server
    row = {"pid": pid, "seq": 0, "t_start": t_start, "t_end": t_end, "server_ns": server,
           "wakeup_ns": wakeup, "rid": rid}
    row.update(dict(zip(SERVER_BUCKETS, (int(p) for p in parts), strict=True)))
    row[UNEXPLAINED] = server - sum(int(p) for p in parts)
    return row


def client_row(pid: int, t_enqueue: int, t_send: int, t_recv: int, truth: int = -1,
               tid: int = 1) -> dict[str, int | bool]:
    return {"t_enqueue": t_enqueue, "t_send": t_send, "t_recv": t_recv, "pid": pid,
            "ok": True, "runner": 0, "client_tid": tid, "truth": truth}


def frames(clients: list[dict[str, int | bool]],
           servers: list[dict[str, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    c = pd.DataFrame(clients).astype({"pid": "int32"})  # as the driver writes it
    s = pd.DataFrame(servers)
    return c, s


def simulate(rng: np.random.Generator, connections: int, per_conn: int, *, setup: int = 2,
             tids: int = 2, base: int = BASE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sequential requests on each connection, setup records first, both frames shuffled."""
    clients: list[dict[str, int | bool]] = []
    servers: list[dict[str, int]] = []
    for c in range(connections):
        pid = 1000 + c
        t = base + int(rng.integers(0, 1_000_000))
        for _ in range(setup):  # the connection's own queries: no client request owns them
            servers.append(server_row(pid, t, t + 30_000, rid=len(servers), rng=rng))
            t += 50_000
        for _ in range(per_conn):
            t_enq = t
            t_send = t_enq + int(rng.integers(0, 200_000))
            transit = int(rng.integers(1_000, 60_000))
            t_start = t_send + transit
            t_end = t_start + int(rng.integers(5_000, 2_000_000))
            t_recv = t_end + int(rng.integers(1_000, 80_000))
            wakeup = int(rng.integers(0, 2 * transit))  # sometimes more than the transit
            clients.append(client_row(pid, t_enq, t_send, t_recv, truth=len(servers),
                                      tid=1 + c % tids))
            servers.append(server_row(pid, t_start, t_end, rid=len(servers), wakeup=wakeup,
                                      rng=rng))
            t = t_recv + int(rng.integers(0, 20_000))
    c_df, s_df = frames(clients, servers)
    c_df = c_df.sample(frac=1.0, random_state=1).reset_index(drop=True)
    s_df = s_df.sample(frac=1.0, random_state=2).reset_index(drop=True)
    return c_df, s_df


def random_runq(rng: np.random.Generator, tids: list[int], t0: int, t1: int,
                n: int) -> pd.DataFrame:
    """n disjoint run-queue intervals per driver thread inside [t0, t1]."""
    rows = []
    for tid in tids:
        edges = np.sort(rng.choice(np.arange(t0, t1, dtype=np.int64), 2 * n, replace=False))
        for s, e in edges.reshape(-1, 2):
            rows.append({"client_tid": tid, "start": int(s), "end": int(e)})
    return pd.DataFrame(rows)


def brute_overlap(starts: np.ndarray, ends: np.ndarray, a: int, b: int) -> int:
    return int(sum(max(0, min(int(e), b) - max(int(s), a)) for s, e in zip(starts, ends,
                                                                              strict=True)))


# --- join_requests ---------------------------------------------------------------------------


def test_sequential_requests_each_get_their_own_record() -> None:
    rng = np.random.default_rng(7)
    client, server = simulate(rng, connections=40, per_conn=60)
    joined, unmatched = join_requests(client, server)
    assert unmatched == 0, f"{unmatched} of {len(client)} requests unmatched"
    assert len(joined) == len(client)
    wrong = joined[joined["rid"] != joined["truth"]]
    assert wrong.empty, f"{len(wrong)} rows joined to another request's record:\n{wrong.head()}"
    # server_row points at the record's row in the server frame as given
    assert (server["rid"].to_numpy()[joined["server_row"].to_numpy()]
            == joined["truth"].to_numpy()).all()


def test_setup_records_without_a_client_request_are_ignored() -> None:
    rng = np.random.default_rng(8)
    client, server = simulate(rng, connections=5, per_conn=20, setup=3)
    joined, unmatched = join_requests(client, server)
    setup_ids = set(server["rid"]) - set(client["truth"])
    assert len(setup_ids) == 15
    assert unmatched == 0 and len(joined) == len(client)
    assert not setup_ids & set(joined["rid"]), "a setup record was joined to a request"


def test_records_between_requests_and_of_other_backends_are_ignored() -> None:
    clients = [client_row(10, 1_000, 1_000, 2_000, truth=0),
               client_row(10, 3_000, 3_000, 4_000, truth=2)]
    servers = [
        server_row(10, 1_100, 1_900, rid=0),
        server_row(10, 2_200, 2_800, rid=1),  # same backend, between two requests
        server_row(10, 3_100, 3_900, rid=2),
        server_row(11, 3_050, 3_950, rid=3),  # another backend, inside the window
    ]
    joined, unmatched = join_requests(*frames(clients, servers))
    assert unmatched == 0
    assert joined["rid"].tolist() == [0, 2]


def test_candidate_ending_after_the_reply_is_unmatched() -> None:
    """Request 0's record is missing: its only candidate, request 1's record, ends after
    request 0's reply, so request 0 is unmatched and request 1 still gets its record."""
    clients = [client_row(10, 1_000, 1_000, 2_000),
               client_row(10, 3_000, 3_000, 4_000, truth=0)]
    servers = [server_row(10, 3_100, 3_900, rid=0)]
    joined, unmatched = join_requests(*frames(clients, servers))
    assert unmatched == 1
    assert joined["t_send"].tolist() == [3_000] and joined["rid"].tolist() == [0]


def test_record_starting_before_the_send_is_not_used() -> None:
    clients = [client_row(10, 1_000, 1_000, 2_000)]
    servers = [server_row(10, 999, 1_900, rid=0)]
    joined, unmatched = join_requests(*frames(clients, servers))
    assert (len(joined), unmatched) == (0, 1)


def test_a_server_record_is_never_used_twice() -> None:
    """Two (impossible) overlapping requests on one backend both contain one record:
    neither may claim it alone by accident of order, and it is not used twice."""
    clients = [client_row(10, 1_000, 1_000, 5_000), client_row(10, 1_200, 1_200, 6_000)]
    servers = [server_row(10, 1_500, 4_000, rid=0)]
    joined, unmatched = join_requests(*frames(clients, servers))
    assert not joined["server_row"].duplicated().any()
    assert len(joined) + unmatched == len(clients)
    assert len(joined) <= 1


def test_no_record_used_twice_with_lost_records() -> None:
    """Drop a third of the records: the rest still join to their own request, once each."""
    rng = np.random.default_rng(9)
    client, server = simulate(rng, connections=10, per_conn=40)
    kept = server[rng.random(len(server)) > 1 / 3].reset_index(drop=True)
    joined, unmatched = join_requests(client, kept)
    owned = client["truth"].isin(kept["rid"])
    assert not joined["server_row"].duplicated().any()
    assert (joined["rid"] == joined["truth"]).all()
    assert len(joined) == int(owned.sum()), "a request whose record exists was not matched"
    assert unmatched == int((~owned).sum())


def test_empty_client_frame() -> None:
    _, server = simulate(np.random.default_rng(1), connections=1, per_conn=3)
    client = pd.DataFrame({c: pd.Series(dtype="int64")
                           for c in ("t_enqueue", "t_send", "t_recv", "pid", "client_tid")})
    joined, unmatched = join_requests(client, server)
    assert (len(joined), unmatched) == (0, 0)


def test_join_keeps_integer_nanoseconds_exact() -> None:
    """Timestamps are CLOCK_MONOTONIC ns, beyond float64's exact range (2**53 ns, about
    104 days) on a machine up for 200 days. A request with no candidate record at all
    (its record lost, the last on its connection) must not turn the joined server
    columns into floats and shift the matched rows' timestamps."""
    base = 200 * 86_400 * 10**9 + 1  # odd: not representable as float64
    clients = [client_row(10, base, base + 10, base + 1_000, truth=0),
               client_row(10, base + 2_000, base + 2_001, base + 3_001)]
    servers = [server_row(10, base + 20, base + 900, rid=0, wakeup=3)]  # odd ns
    joined, unmatched = join_requests(*frames(clients, servers))
    assert unmatched == 1 and len(joined) == 1
    got = (int(joined["t_start"].iloc[0]) - base, int(joined["t_end"].iloc[0]) - base)
    assert got == (20, 900), f"t_start, t_end shifted to base + {got}"
    for col in ("t_start", "t_end", "wakeup_ns", *SERVER_BUCKETS):
        assert joined[col].dtype == np.int64, f"{col} became {joined[col].dtype}"


# --- runq_overlap ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_runq_overlap_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    edges = np.sort(rng.choice(np.arange(10_000, dtype=np.int64), 2 * n, replace=False))
    starts, ends = edges[0::2], edges[1::2]
    if seed % 2:  # zero-length intervals (a wait of 0 ns) and touching intervals
        ends = starts.copy()
        ends[::2] = starts[::2]
    order = rng.permutation(n)  # given in any order
    a = rng.integers(-100, 10_100, 400)
    b = a + rng.integers(0, 3_000, 400)
    # windows starting or ending exactly on interval edges
    a = np.concatenate([a, starts, ends, starts])
    b = np.concatenate([b, ends, ends + 5, starts])
    got = runq_overlap(starts[order], ends[order], a, b)
    want = np.array([brute_overlap(starts, ends, int(x), int(y)) for x, y in zip(a, b,
                                                                                strict=True)])
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (f"{bad.size} windows differ, e.g. [{a[bad[0]]}, {b[bad[0]]}): "
                           f"{got[bad[0]]} != {want[bad[0]]}")


def test_runq_overlap_without_intervals() -> None:
    empty = np.array([], dtype=np.int64)
    got = runq_overlap(empty, empty, np.array([0, 5]), np.array([10, 50]))
    assert got.tolist() == [0, 0] and got.dtype == np.int64


def test_runq_overlap_large_timestamps() -> None:
    starts = np.array([BASE + 100, BASE + 500], dtype=np.int64)
    ends = np.array([BASE + 300, BASE + 900], dtype=np.int64)
    got = runq_overlap(starts, ends, np.array([BASE + 200]), np.array([BASE + 600]))
    assert got.tolist() == [100 + 100]


# --- e2e_frame -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A simulated run joined and split end to end; with its driver run-queue intervals."""
    rng = np.random.default_rng(11)
    client, server = simulate(rng, connections=20, per_conn=50, tids=3)
    joined, unmatched = join_requests(client, server)
    assert unmatched == 0
    t0, t1 = int(client["t_enqueue"].min()), int(client["t_recv"].max())
    runq = random_runq(rng, [1, 2, 3], t0, t1, 3_000)
    return e2e_frame(joined, runq), runq


def test_buckets_sum_exactly_to_latency(split: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    df, _ = split
    total = df[E2E_COLUMNS].sum(axis=1)
    bad = df[total != df["latency_ns"]]
    assert bad.empty, f"{len(bad)} rows whose buckets do not sum to latency_ns"
    assert (df["latency_ns"] == df["t_recv"] - df["t_enqueue"]).all()
    for col in E2E_COLUMNS:
        assert df[col].dtype == np.int64, f"{col} is {df[col].dtype}"
        assert (df[col] >= 0).all(), f"{col} negative: {df[col].min()}"


def test_split_parts(split: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    df, runq = split
    assert (df["client_queue"] == df["t_send"] - df["t_enqueue"]).all()
    transit = df["t_start"] - df["t_send"]
    assert (df["request_transit"] + df["server_wakeup"] == transit).all()
    assert (df["server_wakeup"] == np.minimum(df["wakeup_ns"], transit)).all()
    assert (df["server_wakeup"] < df["wakeup_ns"]).any(), "no wake-up was capped: weak data"
    assert (df[list(SERVER_BUCKETS)].sum(axis=1) + df["e2e_unexplained"] == df["server_ns"]).all()
    assert (df["e2e_unexplained"] == df[UNEXPLAINED]).all()
    response = df["t_recv"] - df["t_end"]
    assert (df["response_transit"] + df["client_wakeup"] == response).all()
    # client_wakeup: the row's own driver thread's run-queue time inside [t_end, t_recv)
    rows = df.sample(200, random_state=3)
    for tid, end, recv, got in zip(rows["client_tid"].tolist(), rows["t_end"].tolist(),
                                   rows["t_recv"].tolist(), rows["client_wakeup"].tolist(),
                                   strict=True):
        mine = runq[runq["client_tid"] == tid]
        want = brute_overlap(mine["start"].to_numpy(), mine["end"].to_numpy(), end, recv)
        assert got == min(want, recv - end)
    assert (df["client_wakeup"] > 0).mean() > 0.5, "too little run-queue overlap: weak data"


def test_client_wakeup_capped_by_response() -> None:
    clients = [client_row(10, 1_000, 1_100, 3_000, tid=5)]
    servers = [server_row(10, 1_200, 2_000, rid=0, wakeup=50)]
    joined, _ = join_requests(*frames(clients, servers))
    runq = pd.DataFrame({"client_tid": [5, 6], "start": [500, 2_000], "end": [5_000, 3_000]})
    df = e2e_frame(joined, runq)
    row = df.iloc[0]
    assert row["client_wakeup"] == 1_000 and row["response_transit"] == 0
    assert row["server_wakeup"] == 50 and row["request_transit"] == 50
    assert row["client_queue"] == 100 and row["latency_ns"] == 2_000


# --- tables and tail -------------------------------------------------------------------------


def test_e2e_table(split: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    df, _ = split
    table = e2e_table(df)
    assert table["bucket"].tolist() == list(E2E_BUCKETS)
    assert int(table["total_ns"].sum()) == int(df["latency_ns"].sum())
    assert table["share"].sum() == pytest.approx(1.0)
    for b, col in zip(E2E_BUCKETS, E2E_COLUMNS, strict=True):
        row = table[table["bucket"] == b].iloc[0]
        assert row["total_ns"] == int(df[col].sum())
        assert row["p50_ns"] <= row["p99_ns"]
    empty = e2e_table(df.iloc[0:0])
    assert empty["bucket"].tolist() == list(E2E_BUCKETS)
    assert (empty["total_ns"] == 0).all() and (empty["share"] == 0).all()


def test_tail_shares_explain_the_slow_requests(split: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    df, _ = split
    shares = tail_shares(df)
    assert list(shares) == list(E2E_BUCKETS)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    # make the slowest 1% slow only by queueing: the tail is then mostly client_queue
    slow = df.copy()
    idx = slow["latency_ns"].nlargest(len(slow) // 100).index
    extra = 50 * int(slow["latency_ns"].max())
    slow.loc[idx, "client_queue"] += extra
    slow.loc[idx, "latency_ns"] += extra
    tail = tail_shares(slow)
    assert tail["client_queue"] > 0.95, f"tail shares: {tail}"
    overall = e2e_table(slow).set_index("bucket")["share"]
    assert tail["client_queue"] > overall["client_queue"]
    assert tail_shares(df.iloc[0:0]) == dict.fromkeys(E2E_BUCKETS, 0.0)


def test_e2e_summary_sums_to_client_latency(split: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    df, _ = split
    s = e2e_summary(df)
    assert list(s["e2e_buckets_ns"]) == list(E2E_BUCKETS)
    assert sum(s["e2e_buckets_ns"].values()) == int(df["latency_ns"].sum())
    assert s["client_latency_ns"]["sum"] == int(df["latency_ns"].sum())
