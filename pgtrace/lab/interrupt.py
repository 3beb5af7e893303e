"""Ctrl-C and SIGTERM during a lab run: note them, stop the driver, let cleanup finish.

While installed, SIGINT/SIGTERM only set a flag (so cleanup itself cannot be cut
short); the run in progress is ended by passing SIGINT to the driver processes,
and the engine raises LabInterrupted at its next check, undoing what it did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import TypeVar

from pgtrace.errors import PgtraceError
from pgtrace.proc import argv, children, cmdline

T = TypeVar("T")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class LabInterrupted(PgtraceError):
    """The run was interrupted; the cluster was put back as it was."""

    exit_code = 130


def driver_children() -> list[int]:
    """Our child processes that are driver workers (`python -m pgtrace load`)."""
    out = []
    for pid in children(os.getpid()):
        args = argv(cmdline(pid))
        if "pgtrace" in args and "load" in args:
            out.append(pid)
    return out


class Interrupt:
    """A context that turns SIGINT/SIGTERM into a flag (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}
        self._told: set[int] = set()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in _SIGNALS}
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]

    def check(self) -> None:
        """Raise LabInterrupted if a signal came."""
        if self.requested:
            raise LabInterrupted("interrupted; the cluster was put back as it was")

    def stop_driver(self) -> None:
        """Pass SIGINT on to the driver workers (once each)."""
        for pid in driver_children():
            if pid not in self._told:
                self._told.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)

    def run(self, fn: Callable[[], T], tick: Callable[[], None], every_s: float = 0.25,
            on_interrupt: Callable[[], None] | None = None) -> T:
        """fn() in a thread; tick() every `every_s` while it runs.

        On a signal: stop the driver, and call on_interrupt once (e.g. cancel a query).
        """
        box: dict[str, object] = {}

        def body() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=body, name="pgtrace-lab-run", daemon=True)
        worker.start()
        cancelled = False
        while worker.is_alive():
            worker.join(every_s)
            tick()
            if self.requested:
                self.stop_driver()
                if on_interrupt is not None and not cancelled:
                    cancelled = True
                    on_interrupt()
        self.check()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]
