"""Identifiers: time-ordered UUIDs (version 7, RFC 9562) so ids sort by creation time in indexes and logs."""

from __future__ import annotations

import os
import time

__all__ = ["new_id", "new_ids"]

_RAND_BITS = 74
_RAND_BYTES = 10


def _format(value: int) -> str:
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_ids(count: int) -> list[str]:
    """``count`` new UUIDv7 strings (48 bits of Unix milliseconds, then 74 random bits), one entropy read for all."""
    ms = (time.time_ns() // 1_000_000) & 0xFFFF_FFFF_FFFF
    entropy = os.urandom(_RAND_BYTES * count)
    ids = []
    for i in range(count):
        rand = int.from_bytes(entropy[i * _RAND_BYTES : (i + 1) * _RAND_BYTES], "big") & ((1 << _RAND_BITS) - 1)
        # 48-bit time | version 7 | 12 random bits | variant 0b10 | 62 random bits
        value = ms << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
        ids.append(_format(value))
    return ids


def new_id() -> str:
    """A new UUIDv7 string."""
    return new_ids(1)[0]
