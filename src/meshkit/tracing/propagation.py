"""Inject and extract W3C trace context (see the package docstring)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from collections.abc import Iterator, Mapping, MutableMapping
from types import ModuleType

__all__ = ["TRACE_HEADERS", "current_headers", "extracted", "inject"]

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")

_carried: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "meshkit_trace_headers", default=None
)


@functools.cache
def _otel() -> tuple[ModuleType, ModuleType] | None:
    """OpenTelemetry's ``propagate`` and ``context`` modules, or None when the API is not installed."""
    try:
        return importlib.import_module("opentelemetry.propagate"), importlib.import_module("opentelemetry.context")
    except ImportError:
        return None


def current_headers() -> dict[str, str]:
    """The current trace context as headers (empty when there is none)."""
    carrier: dict[str, str] = {}
    otel = _otel()
    if otel is not None:
        otel[0].inject(carrier)
    if "traceparent" not in carrier:
        carrier.update(_carried.get() or {})
    return {k: v for k, v in carrier.items() if k in TRACE_HEADERS}


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current ``traceparent`` / ``tracestate`` / ``baggage`` to ``headers`` (a publisher's explicit ones
    win)."""
    for key, value in current_headers().items():
        headers.setdefault(key, value)


@contextlib.contextmanager
def extracted(headers: Mapping[str, str]) -> Iterator[None]:
    """Run the block inside the trace context ``headers`` carry (no-op when they carry none)."""
    carried = {k: headers[k] for k in TRACE_HEADERS if k in headers}
    if not carried:
        yield
        return
    token = _carried.set(carried)
    otel = _otel()
    otel_token = otel[1].attach(otel[0].extract(carried)) if otel is not None else None
    try:
        yield
    finally:
        if otel is not None:
            otel[1].detach(otel_token)
        _carried.reset(token)
