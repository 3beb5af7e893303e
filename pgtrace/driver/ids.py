"""Client-generated keys: RFC 9562 UUIDv7 and ULID, both time-ordered 128-bit values."""

from __future__ import annotations

import os
import threading
import time
import uuid

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class _Monotonic:
    """48-bit ms timestamp + N random bits; within one ms the random part counts up."""

    def __init__(self, rand_bits: int) -> None:
        self.rand_bits = rand_bits
        self.last_ms = -1
        self.last_rand = 0
        self.lock = threading.Lock()

    def next(self, now_ms: int | None = None) -> tuple[int, int]:
        """(ms, rand): strictly increasing as a pair across calls in this process."""
        ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with self.lock:
            if ms > self.last_ms:
                # leave headroom so increments within the ms rarely overflow
                rand = int.from_bytes(os.urandom((self.rand_bits + 7) // 8)) >> (
                    ((self.rand_bits + 7) // 8) * 8 - self.rand_bits + 1
                )
            else:
                ms = self.last_ms
                rand = self.last_rand + 1
                if rand >> self.rand_bits:
                    ms, rand = ms + 1, 0
            self.last_ms, self.last_rand = ms, rand
            return ms & ((1 << 48) - 1), rand


_v7 = _Monotonic(74)
_ulid = _Monotonic(80)


def uuid7(now_ms: int | None = None) -> uuid.UUID:
    """RFC 9562 UUIDv7: unix_ts_ms(48) ver=7(4) rand_a(12) var=0b10(2) rand_b(62).

    The 74 random bits are a monotonic random value (RFC 9562 6.2, method 2), so ids
    from one process are strictly increasing even within a millisecond.
    """
    ms, rand = _v7.next(now_ms)
    rand_a = rand >> 62
    rand_b = rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def ulid(now_ms: int | None = None) -> uuid.UUID:
    """ULID as 128 bits in a uuid: ms timestamp(48) then randomness(80), monotonic.

    Stored in a PostgreSQL ``uuid`` column (16 bytes, same sort order as the ULID);
    ``ulid_text`` gives the canonical 26-character Crockford base32 form.
    """
    ms, rand = _ulid.next(now_ms)
    return uuid.UUID(int=(ms << 80) | rand)


def ulid_text(value: uuid.UUID) -> str:
    """Canonical Crockford base32 (26 chars) of a ULID held in a uuid."""
    n = value.int
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in range(25, -1, -1))
