"""A proxy in front of PostgreSQL's Unix socket that holds every chunk for a known delay.

For the transit tests: `DelayProxy` listens on ``<its own temp dir>/.s.PGSQL.<port>``
(libpq's socket name, so ``host=<dir> port=<port>`` reaches it) and forwards each
connection to the server's socket, client -> server after ``in_ns``, server -> client after
``out_ns``. Each chunk read is forwarded at its arrival time plus the delay, in order: one
reader and one writer thread per direction, a FIFO between them, so chunks are never
reordered nor merged (the delay is the same for all, so the due times are monotonic).

The proxy runs as a process of its own (``python -m tests.integration.delayproxy``): in
the test's process, the engine's Python ring-buffer polling would hold the GIL while a
chunk is due. On SIGTERM it writes, per connection and direction, when each chunk arrived
and when its forwarding started (CLOCK_MONOTONIC, the clock of the driver's and the
engine's stamps) to a JSON file: the proxy's own cost, request by request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType

import numpy as np

from tests.integration.workload import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHUNK = 65536
DIRECTIONS = ("in", "out")  # client -> server, server -> client


# --- the proxy process -----------------------------------------------------------------------


def _read(src: socket.socket, fifo: queue.Queue[tuple[int, int, bytes]],
          delay_ns: int) -> None:
    """Stamp each chunk with its arrival and due times; an empty chunk is the end."""
    while True:
        try:
            data = src.recv(CHUNK)
        except OSError:
            data = b""
        now = time.monotonic_ns()
        fifo.put((now, now + delay_ns, data))
        if not data:
            return


def _write(dst: socket.socket, fifo: queue.Queue[tuple[int, int, bytes]],
           log: list[tuple[int, int]]) -> None:
    """Forward each chunk once it is due, logging (arrival, send start); pass the end on
    as a half-close."""
    while True:
        arrival, due, data = fifo.get()
        wait = due - time.monotonic_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        if not data:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            return
        log.append((arrival, time.monotonic_ns()))
        try:
            dst.sendall(data)
        except OSError:
            return  # the peer is gone; the reader sees the end of its side


Log = dict[str, list[tuple[int, int]]]  # direction -> [(arrival, send start)], ns


def _serve(client: socket.socket, upstream: str, delays: dict[str, int], log: Log) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.connect(upstream)
    except OSError:
        client.close()
        server.close()
        return
    threads = []
    for name, src, dst in (("in", client, server), ("out", server, client)):
        fifo: queue.Queue[tuple[int, int, bytes]] = queue.Queue()
        threads += [threading.Thread(target=_read, args=(src, fifo, delays[name]), daemon=True),
                    threading.Thread(target=_write, args=(dst, fifo, log[name]), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    server.close()


def serve(listen: str, upstream: str, in_ns: int, out_ns: int, stats: str) -> None:
    """Accept until SIGTERM, then write each connection's chunk log to `stats`."""
    logs: list[Log] = []
    delays = {"in": in_ns, "out": out_ns}

    def stop(_sig: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # listening before the name appears: whoever sees the name can connect
        sock.bind(listen + ".tmp")
        sock.listen(16)
        os.rename(listen + ".tmp", listen)
        while True:
            client, _ = sock.accept()
            logs.append({d: [] for d in DIRECTIONS})
            threading.Thread(target=_serve, args=(client, upstream, delays, logs[-1]),
                             daemon=True).start()
    finally:
        sock.close()
        with open(stats, "w", encoding="utf-8") as f:
            json.dump([{d: list(log[d]) for d in DIRECTIONS} for log in logs], f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("listen")
    p.add_argument("upstream")
    p.add_argument("in_ns", type=int)
    p.add_argument("out_ns", type=int)
    p.add_argument("stats")
    a = p.parse_args()
    serve(a.listen, a.upstream, a.in_ns, a.out_ns, a.stats)


# --- the test side ---------------------------------------------------------------------------


@dataclass
class DelayProxy:
    """A running proxy: ``dir`` is the host to give libpq. ``chunks``, once it has
    stopped: per connection (in accept order), per direction, the (arrival, send start)
    of each chunk it forwarded, CLOCK_MONOTONIC ns."""

    dir: str
    port: int
    chunks: list[dict[str, list[tuple[int, int]]]] = field(default_factory=list)


@contextlib.contextmanager
def delay_proxy(upstream: str, port: int, in_ns: int, out_ns: int,
                timeout: float = 30.0) -> Iterator[DelayProxy]:
    """Run the proxy in front of the Unix socket `upstream` while the block runs."""
    with tempfile.TemporaryDirectory(prefix="pgtrace-proxy-") as d:
        listen = os.path.join(d, f".s.PGSQL.{port}")
        stats = os.path.join(d, "chunks.json")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.delayproxy", listen, upstream,
             str(in_ns), str(out_ns), stats], cwd=ROOT, stdin=subprocess.DEVNULL)
        proxy = DelayProxy(d, port)
        try:
            wait_for(lambda: os.path.exists(listen) or proc.poll() is not None, timeout,
                     "the delaying proxy to listen")
            assert proc.poll() is None, f"the delaying proxy exited ({proc.returncode})"
            yield proxy
        finally:
            proc.terminate()
            proc.wait(timeout)
        with open(stats, encoding="utf-8") as f:
            proxy.chunks = [{k: [(a, b) for a, b in v] for k, v in c.items()}
                            for c in json.load(f)]


def forwarding_cost(chunks: list[tuple[int, int]], since: np.ndarray, until: np.ndarray,
                    delay_ns: int, direction: str) -> np.ndarray:
    """Per request, the proxy's own cost beyond the delay in one direction, ns.

    `chunks` is one connection's log in that direction. A request's chunk is, client ->
    server ("in"), the first to arrive at or after the send (`since`); server -> client
    ("out"), the last whose forwarding started before the driver had the reply (`until`).
    The cost is that forwarding start minus `since` (the send; the backend's send for
    "out") minus the delay: the proxy's wake-ups and its sleep's overshoot.
    """
    log = np.array(chunks, dtype=np.int64).reshape(-1, 2)
    if direction == "in":
        idx = np.searchsorted(log[:, 0], since, side="left")
    else:
        idx = np.searchsorted(log[:, 1], until, side="left") - 1
    assert ((idx >= 0) & (idx < len(log))).all(), f"a request without its {direction} chunk"
    assert len(np.unique(idx)) == len(idx), f"two requests matched to one {direction} chunk"
    return np.asarray(log[idx, 1] - since - delay_ns, dtype=np.int64)


if __name__ == "__main__":
    main()
