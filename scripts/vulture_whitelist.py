"""Names vulture reports as unused that are used where it cannot see (scripts/test.sh "dead code").

Each line names the reason. Anything else vulture reports is dead: delete it, do not add it here.
"""
# ruff: noqa: B018, F821
# Signal handlers and __exit__ take these by protocol.
signum
exc_type
tb
# click commands, registered by decorator; click.ParamType's override; the `quiet` option is
# read by the shared driver options decorator (driver/options.py) from the kwargs.
probes
doctor
attach
list_
get_metavar
quiet
# Enum members: collect/events.py writes every member into the generated C ABI header.
_.RUNQ
_.NONE
_.BUSY
_.PROBE
_.SYSCALL
_.SCHED
# ctypes prototypes and BPF map values (read by libbcc and the BPF programs).
_.restype
_.argtypes
_.wal_fd
_.req
_.last_ts
_.is_client
_.init_fd
_.off_kstack
_.off_ustack
_.recv_fd
# psycopg's pq.PGconn property (sets the libpq connection non-blocking).
_.nonblocking
# Dataclass field, part of the measurement record even where no reader uses it.
_.wal_records
# Public helpers kept for their tests: the ULID text form (the spec's test vectors) and the
# version parser target.py keeps importable.
ulid_text
parse_version
