"""A batch consumer of a BPF ring buffer: mmap + numpy, no per-record callback.

The kernel maps the data area twice in a row, so a run of records that wraps
around is contiguous in our mapping. Records here all have one size; a run is
read as one numpy array and the consumer position advanced past it.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from typing import Any

import numpy as np

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8


class RingReader:
    """Reads fixed-size records from a BPF_MAP_TYPE_RINGBUF map fd."""

    def __init__(self, map_fd: int, data_size: int, record_size: int) -> None:
        page = mmap.PAGESIZE
        self.size = data_size
        self.stride = (HDR_SIZE + record_size + 7) & ~7
        self.record_size = record_size
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=0)
        self._prod = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=page)
        self._page = page

    def read(self) -> bytes:
        """Every committed record since the last read, concatenated (records only)."""
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        avail = prod - cons
        if avail <= 0:
            return b""
        start = self._page + (cons % self.size)
        n = avail // self.stride
        buf = memoryview(self._prod)[start:start + n * self.stride]
        lens = np.frombuffer(buf, dtype=np.dtype("<u4"), count=n * (self.stride // 4))
        hdr = lens[:: self.stride // 4]
        busy = np.nonzero(hdr & BUSY_BIT)[0]
        if len(busy):
            n = int(busy[0])
        hdr = hdr[:n]
        if np.any((hdr & ~np.uint32(BUSY_BIT | DISCARD_BIT)) != self.record_size):
            raise RuntimeError("ring buffer holds a record of an unexpected size")
        recs = np.frombuffer(buf, dtype=np.uint8, count=n * self.stride).reshape(n, self.stride)
        keep = (hdr & DISCARD_BIT) == 0
        if keep.all():  # no mask: one copy, not two
            out = recs[:, HDR_SIZE:HDR_SIZE + self.record_size].tobytes()
        else:
            out = recs[keep, HDR_SIZE:HDR_SIZE + self.record_size].tobytes()
        struct.pack_into("<Q", self._cons, 0, cons + n * self.stride)
        return out

    def close(self) -> None:
        """Unmap."""
        for m in (self._cons, self._prod):
            with contextlib.suppress(BufferError):
                m.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
