"""Files pgtrace writes: checked before any work, owner-only (0600), never half written.

A regular file (or a new one) is written to a temporary file in the same directory and
renamed over the path only once it is complete: a failure leaves what was there. A
symlink at the path is replaced, not followed. A path that is not a regular file (a
FIFO, /dev/stdout to a terminal or a pipe) is written in place.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any, BinaryIO, TextIO, cast

from pgtrace.errors import OutputError

MODE = 0o600


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: dict[str, str | None], inputs: Iterable[str] = ()) -> None:
    """Refuse, before any work, an output that cannot be written or would clobber an input.

    ``outputs`` maps an option name (``-o``) to its path (None: not asked for).
    """
    given = [(opt, path) for opt, path in outputs.items() if path is not None]
    ins = list(inputs)
    for i, (opt, path) in enumerate(given):
        if not path:
            raise OutputError(f"{opt}: an empty path")
        for src in ins:
            if os.path.exists(path) and _same(path, src):
                raise OutputError(f"{opt} {path} is also an input: it would be overwritten")
        for other_opt, other in given[:i]:
            if _same(path, other):
                raise OutputError(f"{opt} and {other_opt} are the same file ({path})")
        check_writable(opt, path)


def check_writable(opt: str, path: str) -> None:
    """The path's directory exists and we may create files in it; the path is no directory."""
    if os.path.isdir(path):
        raise OutputError(f"{opt} {path} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"{opt} {path}: no directory {parent}")
    if _in_place(path):
        if not os.access(path, os.W_OK):
            raise OutputError(f"{opt} {path}: not writable")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{opt} {path}: cannot create files in {parent}")


def _in_place(path: str) -> bool:
    """True for an existing path that is neither a regular file nor a symlink to replace."""
    try:
        lst = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISREG(lst.st_mode):
        return False
    if stat.S_ISLNK(lst.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            return False  # dangling: replaced
        return not stat.S_ISREG(target.st_mode) or path.startswith(("/dev/", "/proc/"))
    return True


@contextmanager
def _private(path: str, binary: bool) -> Iterator[IO[Any]]:
    """A stream for `path`, mode 0600, renamed into place on success; on an exception
    nothing at `path` changes. OS errors become OutputError."""
    mode = "wb" if binary else "w"
    encoding = None if binary else "utf-8"
    if _in_place(path):
        try:
            with open(path, mode, encoding=encoding) as f:
                yield f
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        return
    parent = os.path.dirname(os.path.abspath(path))
    try:  # a new file (O_EXCL, random name): never one somebody placed there
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=parent)
        os.fchmod(fd, MODE)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with open(fd, mode, encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp)
        raise


@contextmanager
def private_text(path: str) -> Iterator[TextIO]:
    """A text stream (UTF-8) that becomes `path`, mode 0600, once the block succeeds."""
    with _private(path, binary=False) as f:
        yield cast(TextIO, f)


@contextmanager
def private_binary(path: str) -> Iterator[BinaryIO]:
    """A binary stream that becomes `path`, mode 0600, once the block succeeds."""
    with _private(path, binary=True) as f:
        yield cast(BinaryIO, f)


def write_private(path: str, data: str | bytes) -> None:
    """Write `data` to `path` as private_output does."""
    with _private(path, binary=isinstance(data, bytes)) as f:
        f.write(data)


def _unlink(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)
