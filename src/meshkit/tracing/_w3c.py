"""The W3C ``traceparent`` header read on every traced request: one module, so that release wheels compile it with
the span recorder (mypyc) and the recorder calls it natively. No OpenTelemetry import: ``propagation`` uses it
without OpenTelemetry installed."""

from __future__ import annotations

from typing import Final

__all__ = ["parse_traceparent"]

_isascii: Final = str.isascii  # (compiled, value.isascii() looks the method up by name on every call)


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """``(trace_id, span_id, flags)`` of a plain, valid version-00 ``traceparent`` (``00-``, 32 and 16 lower-case
    hex digits, 2 hex digits, ids not zero); None for anything else (the W3C propagator then decides what it means:
    future versions, whitespace, invalid ids).

    Checked with string methods mypyc compiles to loops of its own, not a regular expression (compiled, about half
    the instructions). ``int(text, 16)`` also takes upper case, a sign, underscores, surrounding whitespace, a
    ``0x`` prefix and non-ASCII digits: ASCII, alphanumeric fields, no upper case and no ``x`` leave it only
    lower-case hex digits, and the letters after ``f``, which it refuses.
    """
    if len(value) != 55 or not value.startswith("00-") or value[35] != "-" or value[52] != "-":
        return None
    trace_hex, span_hex, flags_hex = value[3:35], value[36:52], value[53:]
    if (
        not (trace_hex.isalnum() and span_hex.isalnum() and flags_hex.isalnum())
        or not _isascii(value)
        or value.lower() != value
        or "x" in value
    ):
        return None
    try:
        trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
        flags = 1 if flags_hex == "01" else int(flags_hex, 16)
    except ValueError:  # a letter after f
        return None
    return (trace_id, span_id, flags) if trace_id and span_id else None
