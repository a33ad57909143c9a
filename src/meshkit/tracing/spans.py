"""Spans: meshkit's OpenTelemetry instrumentation, and the tracer providers ``meshkit run`` gives services.

Every hop is a span with its parent: the gateway's request (server), a service's request (server, ``GET
/orders/{order_id}``), its calls to other services (client, ``POST payments``), the messages it publishes
(producer, ``order.created publish``) and each handler that receives one (consumer, ``order.created process``: a
child of the publish span, and linked to it). Names and attributes follow the OpenTelemetry semantic conventions
(``http.*``, ``server.*``, ``messaging.*``).

A service gets a tracer from its runner (:func:`provider` makes one per service, so spans carry the right
``service.name`` even when several services share a process); code that has none (``tracer=None``) pays nothing.
:func:`provider` exports over OTLP (HTTP/protobuf or gRPC) to ``endpoint`` (the built-in collector by default in
``meshkit run``; Jaeger, Tempo or any OpenTelemetry collector otherwise). Spans are recorded by
:mod:`meshkit.tracing._recorder`, OpenTelemetry's trace API implemented for speed, and exported by the SDK.
Sampling is parent-based and deterministic by trace id, so every service keeps or drops the same traces, and a
trace with an error is kept whatever the ratio (see :class:`ErrorKeepingProcessor`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meshkit._core.optional import require
from meshkit.tracing.export import otlp_exporter
from meshkit.tracing.propagation import extracted

__all__ = [
    "ErrorKeepingProcessor",
    "TraceLogFilter",
    "TracedFormatter",
    "console_logging",
    "current_links",
    "provider",
    "server_span",
    "span",
    "span_kind",
    "status_code_error",
]

_KINDS = ("internal", "server", "client", "producer", "consumer")


@functools.cache
def _api() -> Any:
    """OpenTelemetry's trace API module (imported once, on first use: ``import meshkit`` stays cheap)."""
    return require("opentelemetry.trace", "otel")


@functools.cache
def span_kind(kind: str) -> Any:
    """The OpenTelemetry ``SpanKind`` named ``kind`` (``server``, ``client``, ``producer``, ``consumer``)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown span kind {kind!r}; one of {', '.join(_KINDS)}")
    return getattr(_api().SpanKind, kind.upper())


def span(
    tracer: Any | None,
    name: str,
    *,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    context: Any = None,
    links: Sequence[Any] = (),
) -> contextlib.AbstractContextManager[Any]:
    """``with span(tracer, "GET /x", kind="server") as s:`` a current span (``None`` and no cost without a tracer).
    An exception leaving the block is recorded on the span and sets its status to error."""
    if tracer is None:
        return _NO_SPAN
    # positional, in the order of OpenTelemetry's Tracer.start_as_current_span (cheaper than keywords)
    result: contextlib.AbstractContextManager[Any] = tracer.start_as_current_span(
        name, context, span_kind(kind), attributes, links or None
    )
    return result


def server_span(
    tracer: Any | None, name: str, carried: Mapping[str, str], attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """``span(tracer, name, kind="server", attributes=attributes)`` as a child of the caller's span, which the
    trace headers ``carried`` (``traceparent``, ``tracestate``, ``baggage``; see :data:`TRACE_HEADERS`) name: they
    are extracted into the current context first (:func:`meshkit.tracing.extracted`). A service's requests take a
    short path for the common case before this one (the recorder's ``Tracer.start_request_span``)."""
    if tracer is None:
        return _NO_SPAN
    return _Extracted(carried, functools.partial(span, tracer, name, kind="server", attributes=attributes))


class _Extracted:
    """A span made and entered inside the trace context of headers (the slow, general path of
    :func:`server_span`): the span is made only once the context is current, since its parent comes from it."""

    __slots__ = ("_extracted", "_inner", "_make")

    def __init__(self, carried: Mapping[str, str], make: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self._extracted = extracted(carried)
        self._make = make
        self._inner: contextlib.AbstractContextManager[Any] | None = None

    def __enter__(self) -> Any:
        self._extracted.__enter__()
        try:
            self._inner = self._make()
            return self._inner.__enter__()
        except BaseException:
            self._extracted.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._inner is not None:
                self._inner.__exit__(*exc)
        finally:
            self._extracted.__exit__(None, None, None)


@functools.cache
def _recorder() -> Any:
    return require("meshkit.tracing._recorder", "otel")


_NO_SPAN: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def current_links() -> list[Any]:
    """A link to the current span (the publish span a message carried), for a consumer span to point back to."""
    trace = _api()
    context = trace.get_current_span().get_span_context()
    return [trace.Link(context)] if context.is_valid else []


def status_code_error() -> Any:
    """OpenTelemetry's ``StatusCode.ERROR``."""
    return _api().StatusCode.ERROR


def provider(
    service: str,
    *,
    endpoint: str | None = None,
    exporter: Any = None,
    protocol: str = "http/protobuf",
    headers: Mapping[str, str] | None = None,
    sample_ratio: float = 1.0,
    keep_errors: bool = True,
    batch: bool = True,
    attributes: Mapping[str, str] | None = None,
) -> Any:
    """A ``TracerProvider`` for ``service``: spans go to ``exporter``, or over OTLP to ``endpoint`` (``protocol``
    ``"http/protobuf"``: the collector's traces URL; ``"grpc"``: ``host:port``; see :mod:`meshkit.tracing.export`),
    with ``headers`` on every export. Call its ``shutdown()`` when the service stops (it flushes what is left)."""
    recorder = _recorder()
    resources = require("opentelemetry.sdk.resources", "otel")
    export = require("opentelemetry.sdk.trace.export", "otel")
    if exporter is None:
        if endpoint is None:
            raise ValueError("a tracer provider needs an endpoint or an exporter")
        exporter = otlp_exporter(endpoint, protocol=protocol, headers=headers)
    inner = (
        # a deep queue: a burst of requests must not drop spans while the exporter thread catches up; batches of
        # the SDK's default size (bigger ones keep more ended spans in memory, which costs the request path)
        recorder.BatchProcessor(exporter, max_queue_size=65536, max_export_batch_size=512, schedule_delay_millis=500)
        if batch
        else export.SimpleSpanProcessor(exporter)
    )
    keeping = keep_errors and sample_ratio < 1.0
    # keeping errors: every span is recorded (so an error later in a trace can still keep it), the processor
    # decides what leaves; otherwise parent-based ratio sampling decides at the trace's first span
    result = recorder.TracerProvider(
        resources.Resource.create({"service.name": service, **(attributes or {})}),
        ratio=None if keeping or sample_ratio >= 1.0 else sample_ratio,
    )
    result.add_span_processor(ErrorKeepingProcessor(inner, sample_ratio) if keeping else inner)
    return result


class ErrorKeepingProcessor:
    """Exports the spans of a ``ratio`` of traces (chosen by trace id, the same choice in every process) and every
    span of a trace in which a span ended with an error.

    Spans of a trace not (yet) chosen wait in a bounded buffer: when one of its spans fails, the trace's spans
    seen so far and all later ones are exported. Parents end after their children, so a failing call keeps the
    spans above it in this process; spans other processes already dropped stay dropped (their own error, if any,
    keeps them there).
    """

    _BOUND = (1 << 64) - 1

    def __init__(self, inner: Any, ratio: float, *, max_traces: int = 2048, max_spans_per_trace: int = 512) -> None:
        self._inner = inner
        self._threshold = int(max(0.0, min(1.0, ratio)) * self._BOUND)
        self._pending: collections.OrderedDict[int, list[Any]] = collections.OrderedDict()
        self._kept: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._max_traces = max_traces
        self._max_spans = max_spans_per_trace
        self._lock = threading.Lock()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self._inner.on_start(span, parent_context=parent_context)

    def _on_ending(self, span: Any) -> None:
        """The SDK's hook before ``on_end`` (newer SDKs call it on every processor); passed on."""
        hook = getattr(self._inner, "_on_ending", None)
        if hook is not None:
            hook(span)

    def on_end(self, span: Any) -> None:
        trace_id = span._trace_id if hasattr(span, "_trace_id") else span.context.trace_id
        if (trace_id & self._BOUND) <= self._threshold and self._threshold:
            self._inner.on_end(span)
            return
        failed = not span.status.is_ok and span.status.status_code.name == "ERROR"
        with self._lock:
            if trace_id in self._kept:
                flush = [span]
            elif failed:
                flush = [*self._pending.pop(trace_id, []), span]
                self._kept[trace_id] = None
                while len(self._kept) > self._max_traces:
                    self._kept.popitem(last=False)
            else:
                spans = self._pending.get(trace_id)
                if spans is None:
                    spans = self._pending[trace_id] = []
                    while len(self._pending) > self._max_traces:
                        self._pending.popitem(last=False)
                if len(spans) < self._max_spans:
                    spans.append(span)
                flush = []
        for done in flush:
            self._inner.on_end(done)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


class TraceLogFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, empty outside a span) to every log record, so logs and traces join.
    Install it on a handler: ``handler.addFilter(TraceLogFilter())``."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace_id = span_id = ""
        try:
            trace = require("opentelemetry.trace", "otel")
        except Exception:
            trace = None
        if trace is not None:
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                trace_id, span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
        record.trace_id = trace_id
        record.span_id = span_id
        return True


class TracedFormatter(logging.Formatter):
    """``LEVEL logger: message``, plus `` trace_id=...`` for a record made inside a trace (with
    :class:`TraceLogFilter` on the handler): the format ``meshkit run`` prints and its dashboard reads."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        return f"{text} trace_id={trace_id}" if trace_id else text


def console_logging(level: str = "INFO") -> logging.Handler:
    """Log to stderr as ``meshkit run`` does (:class:`TracedFormatter`), at ``level``, on the root logger. For
    programs (the runner, its children), not libraries. Returns the handler (remove it to undo)."""
    handler = logging.StreamHandler()
    handler.addFilter(TraceLogFilter())
    handler.setFormatter(TracedFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
