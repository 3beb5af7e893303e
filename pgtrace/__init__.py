"""pgtrace: per-request PostgreSQL latency attribution with eBPF."""

__version__ = "0.1.0"
