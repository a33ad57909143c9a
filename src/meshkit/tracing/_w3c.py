"""The W3C ``traceparent`` header read on every traced request: one module, so that release wheels compile it with
the span recorder (mypyc) and the recorder calls it natively. No OpenTelemetry import: ``propagation`` uses it
without OpenTelemetry installed."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["parse_traceparent"]

_TRACEPARENT: Final = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")  # groups would cost more than slices
_fullmatch: Final = _TRACEPARENT.fullmatch  # bound once: compiled, a method call looks its name up each time


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """``(trace_id, span_id, flags)`` of a plain, valid version-00 ``traceparent``; None for anything else (the W3C
    propagator then decides what it means: future versions, whitespace, invalid ids)."""
    if _fullmatch(value) is None:
        return None
    trace_id, span_id = int(value[3:35], 16), int(value[36:52], 16)
    return (trace_id, span_id, int(value[53:], 16)) if trace_id and span_id else None
