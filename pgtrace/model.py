"""The attribution model as data: bucket names, their order, lock types, counters.

Every bucket name is defined here once; pgtrace/collect/events.py generates the
C indices the probes use (B_*, CTX_*, C_*, FLAG_*, NLOCKTYPES) from these orders.
"""

from __future__ import annotations

#: Server buckets, in the order of req_event.buckets (B_*).
SERVER_BUCKETS: tuple[str, ...] = (
    "cpu",
    "runqueue",
    "fsync",
    "wal_write",
    "lwlock",
    "lock",
    "io_read",
    "io_write",
    "other_wait",
)

UNEXPLAINED = "unexplained"

#: Buckets as reported, with the remainder last.
REPORT_BUCKETS: tuple[str, ...] = (*SERVER_BUCKETS, UNEXPLAINED)

#: LockTagType names as pg_locks spells them, by enum value (storage/lock.h).
LOCK_TYPES: tuple[str, ...] = (
    "relation",
    "extend",
    "frozenid",
    "page",
    "tuple",
    "transactionid",
    "virtualxid",
    "spectoken",
    "object",
    "userlock",
    "advisory",
    "other",
)

#: Counters kept in the kernel (C_*). `aborted`: requests whose backend
#: exited inside them (recorded, flagged); `partial`: requests in flight at attach
#: (recorded and flagged, or only counted where the backend's status entry was
#: unreadable); `unanswered`: receives that opened no request, because the server
#: answered them without a ReadyForQuery (a Flush read alone): the backend went back
#: to waiting for its client with its status entry still idle (request.bpf.c).
COUNTERS: tuple[str, ...] = (
    "requests",
    "lost",
    "unmatched",
    "overflow",
    "aborted",
    "forks",
    "badarg",
    "retried",
    "deferred",
    "client_lost",
    "resynced",
    "partial",
    "unanswered",
)

#: Wait contexts (CTX_*), naming the runqueue:<context> columns:
#: run-queue time split by the context it interrupted.
CONTEXTS: tuple[str, ...] = (
    "none",
    "fsync",
    "wal_write",
    "lwlock",
    "lock",
    "io_read",
    "io_write",
)

RUNQUEUE_PREFIX = "runqueue:"

#: Per-request flags, as capture columns (FLAG_*, bit i): began before attach,
#: its backend exited inside it.
FLAGS: tuple[str, ...] = ("partial", "aborted")

#: Per-request counts of events, as capture columns (the u32 fields of req_event, in order).
COUNTS: tuple[str, ...] = (
    "n_lwlock",
    "n_lock",
    "n_fsync",
    "n_wal_write",
    "n_read",
    "n_write",
    "n_vcsw",
    "n_ivcsw",
)

#: Where a backend's time went beside the buckets (req_event, after rq_ctx): on CPU inside
#: a wait context (part of that context's bucket: a flush's own CPU work, say); then the
#: gap before the request (since the previous request's end): all of it, on CPU, waiting
#: for a CPU. The gap is outside the server time and its buckets.
ACCOUNT_COLUMNS: tuple[str, ...] = ("ctx_cpu_ns", "idle_ns", "idle_cpu_ns", "idle_runq_ns")

LWLOCK_PREFIX = "lwlock:"
LOCK_PREFIX = "lock:"

#: End-to-end buckets of a driver request (client latency), in report order.
E2E_BUCKETS: tuple[str, ...] = (
    "client_queue",
    "request_transit",
    "server_wakeup",
    *SERVER_BUCKETS,
    "response_transit",
    "client_wakeup",
    UNEXPLAINED,
)
