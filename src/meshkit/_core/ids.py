"""Identifiers: time-ordered UUIDs (version 7, RFC 9562) so ids sort by creation time in indexes and logs."""

from __future__ import annotations

import os
import time

__all__ = ["new_id", "new_ids"]

# The fourth group starts with the variant bits 0b10 and two random bits: one random hex digit maps to 8, 9, a or b.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_ids(count: int) -> list[str]:
    """``count`` new UUIDv7 strings (48 bits of Unix milliseconds, then 74 random bits), one entropy read for all.

    Built from hex text (one ``bytes.hex()`` for all): slicing strings costs far less than 128-bit integer
    arithmetic and formatting per id (a publish builds hundreds of ids).
    """
    ms = (time.time_ns() // 1_000_000) & 0xFFFF_FFFF_FFFF
    stamp = f"{ms:012x}"
    head = f"{stamp[:8]}-{stamp[8:]}-7"  # 48-bit time, version 7
    rand = os.urandom(10 * count).hex()  # 20 random hex digits per id: 12 + 2 (after the variant) + 60 bits used
    variant = _VARIANT
    return [
        f"{head}{rand[i : i + 3]}-{variant[rand[i + 3]]}{rand[i + 4 : i + 7]}-{rand[i + 7 : i + 19]}"
        for i in range(0, 20 * count, 20)
    ]


def new_id() -> str:
    """A new UUIDv7 string."""
    return new_ids(1)[0]
