from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshkit.tracing.collector import SpanRecord, TraceStore

BASE = 1_700_000_000_000_000_000  # ns


def tid(n: int) -> str:
    return f"{n:032x}"


def sid(n: int) -> str:
    return f"{n:016x}"


def span(
    trace: int,
    span_id: int,
    parent: int | None,
    service: str,
    name: str,
    start_ms: float,
    end_ms: float,
    **more: Any,
) -> SpanRecord:
    """A span of trace ``trace`` (times in ms after BASE)."""
    return SpanRecord(
        trace_id=tid(trace),
        span_id=sid(span_id),
        parent_span_id=None if parent is None else sid(parent),
        name=name,
        service=service,
        start_ns=BASE + int(start_ms * 1e6),
        end_ns=BASE + int(end_ms * 1e6),
        **more,
    )


@pytest.fixture
async def store() -> AsyncIterator[TraceStore]:
    s = await TraceStore.open(":memory:", retention_seconds=None, max_spans=None)
    yield s
    await s.aclose()
