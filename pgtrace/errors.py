"""Errors pgtrace raises; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class PgtraceError(Exception):
    """Base error: a message, an optional fix hint, an exit code."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """The one line the CLI prints."""
        if self.hint:
            return f"pgtrace: {self.message} ({self.hint})"
        return f"pgtrace: {self.message}"


class UsageError(PgtraceError):
    """Bad arguments the parser could not catch."""

    exit_code = 2


class NotRootError(PgtraceError):
    """Tracing needs root (effective uid 0; see preflight.py)."""

    exit_code = 77


class TargetError(PgtraceError):
    """The pid is absent, not PostgreSQL, or a kernel thread."""

    exit_code = 3


class UnsupportedError(TargetError):
    """A server pgtrace does not trace: a version below 13, or a binary for another arch."""

    exit_code = 8


class NoProbesError(PgtraceError):
    """The binary has no .note.stapsdt: built without --enable-dtrace."""

    exit_code = 4


class SetupError(PgtraceError):
    """The machine lacks something pgtrace needs (headers, tracefs, bcc, a server, kaleido)."""

    exit_code = 5


class BccMissingError(SetupError):
    """bcc's Python module cannot be imported."""


class KernelHeadersError(SetupError):
    """bcc cannot find kernel headers to compile against."""


class AbiMismatchError(SetupError):
    """The compiled BPF records differ from pgtrace's Python mirror of them."""


class CaptureError(PgtraceError):
    """A capture file is missing, corrupt or truncated."""

    exit_code = 6


class ServerError(PgtraceError):
    """The PostgreSQL server refused, vanished or failed."""

    exit_code = 7


class OutputError(PgtraceError):
    """An output file cannot be written: checked before tracing, or failed at the end."""

    exit_code = 9


class Interrupted(PgtraceError):
    """Ctrl-C (SIGINT) or SIGTERM before tracing started: everything detached, nothing written."""

    exit_code = 130
