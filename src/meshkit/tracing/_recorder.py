"""The span recorder behind :func:`meshkit.tracing.spans.provider`: OpenTelemetry's trace API, implemented lean.

Why not the SDK's ``Tracer``: on the benchmark machine one SDK span (``start_as_current_span``, two attributes, a
``BatchSpanProcessor``) costs 40 to 70 µs of Python, mostly generality meshkit's spans do not use (sampler and
span-limit objects, attribute cleaning, metrics hooks, two generator context managers per span). A traced service
call makes two spans and the untraced call takes about 165 µs, so the SDK alone adds about 90 %; the issue's budget
is 10 %. This recorder makes the same spans for a fraction of that:

- :class:`Span` implements ``opentelemetry.trace.Span`` (so ``trace.get_current_span()``, propagators, links and
  the log filter work on it unchanged) and *is* an SDK ``ReadableSpan``: ended spans go to the SDK's span
  processors and exporters as they are (``BatchSpanProcessor``, the OTLP exporters, ``InMemorySpanExporter``), no
  copy. Its ``SpanContext`` is built once, when something asks for it.
- :class:`Tracer` decides sampling the way ``ParentBased(TraceIdRatioBased(ratio))`` does (same bound, same trace-id
  bits: a trace is kept or dropped alike by meshkit and by any SDK-instrumented process), or records every span
  when an error-keeping processor decides later (see :class:`meshkit.tracing.spans.ErrorKeepingProcessor`).
- ``start_as_current_span`` returns the span itself as its context manager (no generator), which attaches it to the
  OpenTelemetry context on enter and, on exit, records an escaping exception (``exception`` event, error status),
  detaches and ends it, as the SDK's ``use_span`` does. The span starts when ``start_as_current_span`` is called
  (the SDK's starts when its block is entered: the same for ``with tracer.start_as_current_span(...)``), and it is
  not usable as a decorator.

- A span made current is stored straight into OpenTelemetry's current-Context variable (what ``context.attach``
  does under the default runtime context, without its three layers of calls); another runtime context
  (``OTEL_PYTHON_CONTEXT``) goes through the API.
- :class:`BatchProcessor` queues ended spans for a thread to export, as the SDK's ``BatchSpanProcessor`` does,
  with a deque append per span (the SDK's checks the process id, a system call, on every span).

Attributes: values meshkit sets are primitives; a value a user sets that OpenTelemetry cannot carry (not a str,
bool, int, float or a sequence of one of them) is dropped with a debug log, as the SDK drops it with a warning.
There are no span limits (the SDK's default cap of 128 attributes and events per span is not applied).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
import traceback
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, cast

from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS_INSTRUMENTATION
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from meshkit.tracing.propagation import otel_runtime, parse_traceparent

__all__ = ["BatchProcessor", "Span", "Tracer", "TracerProvider"]

log = logging.getLogger(__name__)

_UNSET = Status(StatusCode.UNSET)
_EMPTY_STATE = TraceState()
_LOW_64 = (1 << 64) - 1
_PRIMITIVES = (str, bool, int, float)
_set_span_in_context = trace_api.set_span_in_context
_attach = context_api.attach
_detach = context_api.detach
_time_ns = time.time_ns
_bits = random.getrandbits
# OpenTelemetry's current-Context variable (None: a runtime context other than the default, used through the API)
# and the key of the current span in a Context; see meshkit.tracing.propagation.otel_runtime.
_CONTEXT, _SPAN_KEY = otel_runtime()


def _clean(value: Any) -> Any:
    """``value`` as an OpenTelemetry attribute value, or None when it cannot be one."""
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = tuple(value)
        kinds = {type(item) for item in items}
        if len(kinds) <= 1 and all(isinstance(item, _PRIMITIVES) for item in items):
            return items
    return None


class _LazyContext:
    """``span.context``: the span's ``SpanContext``, made on first access and then stored on the span, where later
    reads find it as a plain attribute (``functools.cached_property`` does the same behind a lock on 3.11)."""

    def __get__(self, span: Span | None, owner: type | None = None) -> SpanContext:
        if span is None:
            raise AttributeError("context")  # a span's, not the class's
        made = span.__dict__["context"] = SpanContext(
            span._trace_id,
            span._span_id,
            is_remote=False,
            trace_flags=TraceFlags(span._flags),
            trace_state=span._trace_state,
        )
        return made


class RemoteParent:
    """The caller's span, named by a plain version-00 ``traceparent``: a parent for a server span, read straight
    from the header. Its ``SpanContext`` (remote) is built only when an exporter asks for the child's parent."""

    __slots__ = ("__weakref__", "_built", "_flags", "_span_id", "_trace_id")

    def __init__(self, trace_id: int, span_id: int, flags: int) -> None:
        self._trace_id, self._span_id, self._flags = trace_id, span_id, flags
        self._built: SpanContext | None = None

    @classmethod
    def parse(cls, traceparent: str) -> RemoteParent | None:
        """The parent ``traceparent`` names, or None when it is not a plain, valid version-00 value (see
        :func:`meshkit.tracing.propagation.parse_traceparent`)."""
        ids = parse_traceparent(traceparent)
        return cls(*ids) if ids is not None else None

    @property
    def context(self) -> SpanContext:
        if self._built is None:
            self._built = SpanContext(
                self._trace_id, self._span_id, is_remote=True, trace_flags=TraceFlags(self._flags)
            )
        return self._built


class Span(trace_api.Span, ReadableSpan):
    """A span being recorded, and once ended the ``ReadableSpan`` exporters receive. Made by :class:`Tracer`."""

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        kind: SpanKind,
        trace_id: int,
        flags: int,
        trace_state: TraceState,
        parent: SpanContext | Span | RemoteParent | None,
        attributes: dict[str, Any],
        links: list[Link],
        start_time: int,
        recording: bool,
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> None:
        # ReadableSpan's fields, set directly (its __init__ would build a Resource when given none); the fields
        # every new span has the same value for are class attributes below, replaced when they change
        self._name = name
        self._kind = kind
        self._parent_ref = parent
        self._attributes = attributes
        if links:
            self._links = links
        self._start_time = start_time
        self._tracer = tracer
        self._trace_id = trace_id
        self._span_id = _bits(64) or 1
        self._flags = flags
        self._trace_state = trace_state
        self._recording = recording
        if not record_exception:
            self._record_exception = False
        if not set_status_on_exception:
            self._set_status_on_exception = False

    _parent = None  # see the parent property: ours may be a span, resolved when asked
    _events: Sequence[Event] = ()  # a list of its own once the span has an event
    _links: Sequence[Link] = ()
    _end_time: int | None = None
    _status = _UNSET
    _instrumentation_info = None
    _record_exception = True
    _set_status_on_exception = True
    _activate = False  # start_as_current_span's: the span becomes current in __enter__
    _end_on_exit = True
    _token: object = None

    @property
    def _resource(self) -> Resource:  # type: ignore[override]  # ReadableSpan's resource reads it
        return self._tracer.resource

    @property
    def _instrumentation_scope(self) -> InstrumentationScope:  # type: ignore[override]
        return self._tracer.scope

    # -- the span context, built on first use, then a plain attribute -----------------------------------------

    context = _LazyContext()  # ReadableSpan's is a read-only property

    def get_span_context(self) -> SpanContext:
        return self.context

    @property
    def parent(self) -> SpanContext | None:
        """The parent's ``SpanContext`` (a parent in this process is kept as its span until this is asked)."""
        parent = self._parent_ref
        return parent.context if isinstance(parent, Span | RemoteParent) else parent

    def w3c_headers(self, carrier: dict[str, str]) -> None:
        """Write this span's W3C ``traceparent`` (and ``tracestate``, if any) into ``carrier``, as the W3C
        propagator would, without building its ``SpanContext``."""
        carrier["traceparent"] = "00-%032x-%016x-%02x" % (self._trace_id, self._span_id, self._flags)  # noqa: UP031 - faster
        state = self._trace_state
        if state is not _EMPTY_STATE and state:
            carrier["tracestate"] = state.to_header()

    @property
    def _context(self) -> SpanContext:  # type: ignore[override]  # what ReadableSpan.to_json reads
        return self.context

    # -- opentelemetry.trace.Span ------------------------------------------------------------------------------

    def is_recording(self) -> bool:
        return self._recording and self._end_time is None

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._recording:
            return
        if type(value) not in _PRIMITIVES:
            cleaned = _clean(value)
            if cleaned is None:
                log.debug("span attribute %r dropped: %r is not a valid attribute value", key, type(value).__name__)
                return
            value = cleaned
        self._attributes[key] = value  # type: ignore[index]  # ours is a dict

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None) -> None:
        if self._recording:
            self._events = [*self._events, Event(name, dict(attributes or {}), timestamp or _time_ns())]

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if self._recording and context.is_valid:
            self._links = [*self._links, Link(context, dict(attributes) if attributes else None)]

    def update_name(self, name: str) -> None:
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._status.status_code is StatusCode.OK:  # final, as in the SDK
            return
        if isinstance(status, Status):
            self._status = status
        else:
            self._status = Status(status, description if status is StatusCode.ERROR else None)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        if not self._recording:
            return
        kind = type(exception)
        module = kind.__module__
        values: dict[str, Any] = {
            "exception.type": f"{module}.{kind.__qualname__}" if module and module != "builtins" else kind.__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            values.update(attributes)
        self.add_event("exception", values, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time or _time_ns()
        if self._recording:
            for processor in self._tracer.processors:
                processor.on_end(self)

    # -- the current span, as start_as_current_span's context manager ------------------------------------------

    def __enter__(self) -> Span:
        if self._activate:
            if _CONTEXT is not None:  # what context.attach(trace.set_span_in_context(self)) does
                values = Context(_CONTEXT.get())
                dict.__setitem__(values, _SPAN_KEY, self)  # Context refuses item assignment, as a frozen mapping
                self._token = _CONTEXT.set(values)
            else:
                self._token = _attach(_set_span_in_context(self))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc is not None and self._recording:
                if self._record_exception:
                    self.record_exception(exc, escaped=True)
                if self._set_status_on_exception:
                    self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            token = self._token
            if token is not None:
                self._token = None
                if _CONTEXT is None:
                    _detach(token)  # type: ignore[arg-type]
                else:
                    try:
                        _CONTEXT.reset(token)  # type: ignore[arg-type]
                    except (ValueError, RuntimeError):  # made in another context: logged, as context.detach does
                        log.exception("failed to detach the span %r from the current context", self._name)
            if self._end_on_exit:
                self.end()


_SHUTDOWN_SECONDS = 30.0  # the SDK's batch processor waits as long


class BatchProcessor(SpanProcessor):
    """Sampled spans wait in a queue and a thread of the processor exports them, ``max_export_batch_size`` at a
    time: when that many are waiting, every ``schedule_delay_millis`` otherwise, and on :meth:`force_flush` and
    :meth:`shutdown`. The SDK's ``BatchSpanProcessor`` does the same; this one is cheaper per span, where it counts
    (a span's end on the request path is an append to a deque: the SDK's checks the process id, a system call, and
    several flags per span). When ``max_queue_size`` spans are waiting, new ones are dropped and counted (a warning
    says how many). In a forked child the queue starts empty with a new thread. The exporter runs with
    instrumentation suppressed, so its own HTTP calls make no spans."""

    def __init__(
        self,
        exporter: Any,
        *,
        max_queue_size: int = 2048,
        max_export_batch_size: int = 512,
        schedule_delay_millis: float = 5000,
    ) -> None:
        if max_queue_size < 1 or max_export_batch_size < 1 or schedule_delay_millis <= 0:
            raise ValueError("max_queue_size, max_export_batch_size and schedule_delay_millis must be positive")
        if max_export_batch_size > max_queue_size:
            raise ValueError("max_export_batch_size must not exceed max_queue_size")
        self._exporter = exporter
        self._max_queue = max_queue_size
        self._max_batch = max_export_batch_size
        self._delay = schedule_delay_millis / 1000
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._dropped = 0
        self._stopping = False
        self._start()
        # A forked child inherits the queue but not the thread: it starts over (the parent exports what it held).
        method = weakref.WeakMethod(self._start)
        os.register_at_fork(after_in_child=lambda: (restart := method()) is not None and restart())

    def _start(self) -> None:
        self._queue.clear()
        self._lock = threading.Lock()
        self._drops = threading.Lock()  # guards _dropped (a forked child gets new locks: a parent's may be held)
        self._wake = threading.Event()
        self._flushes: list[threading.Event] = []
        self._thread = threading.Thread(target=self._work, name="meshkit-span-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: context_api.Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if type(span) is Span:
            if not span._flags & 1:
                return
        elif span.context is None or not span.context.trace_flags.sampled:
            return
        queue = self._queue
        if len(queue) >= self._max_queue or self._stopping:
            with self._drops:  # (rare: a full queue) the export thread swaps the count under the same lock
                self._dropped += 1
            return
        queue.append(span)
        if len(queue) >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export every span queued so far; False if that took longer than ``timeout_millis``."""
        done = threading.Event()
        with self._lock:
            if self._stopping:
                return not self._queue
            self._flushes.append(done)
        self._wake.set()
        return done.wait(timeout_millis / 1000)

    def shutdown(self) -> None:
        """Export what is queued, stop the thread, shut the exporter down. Spans ending later are dropped."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._wake.set()
        self._thread.join(_SHUTDOWN_SECONDS)
        if not self._thread.is_alive():
            self._export_queued()  # a span that ended while the thread finished (on_end saw it running)
        else:  # an exporter stuck on an unreachable endpoint: the daemon thread is left
            log.warning("span export still running %.0f s into shutdown; spans left are dropped", _SHUTDOWN_SECONDS)
        self._exporter.shutdown()

    def _work(self) -> None:
        context_api.attach(context_api.set_value(_SUPPRESS_INSTRUMENTATION, True))  # this thread's context only
        while True:
            if len(self._queue) < self._max_batch:  # else a full batch waits already: no pause
                self._wake.wait(self._delay)
            self._wake.clear()
            with self._lock:
                flushes, self._flushes = self._flushes, []
                stopping = self._stopping
            self._export_queued()
            for done in flushes:
                done.set()
            if stopping:
                return

    def _export_queued(self) -> None:
        """Export the spans queued now (not those that arrive meanwhile: under a load the exporter cannot keep up
        with, the loop still comes round to flushes and to saying how many spans were dropped)."""
        queue = self._queue
        left = len(queue)
        while left > 0:
            batch = [queue.popleft() for _ in range(min(left, self._max_batch))]
            left -= len(batch)
            try:
                self._exporter.export(batch)
            except Exception:
                log.exception("exporting %d spans failed", len(batch))
        with self._drops:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.warning("%d spans dropped: the export queue was full (%d spans)", dropped, self._max_queue)


# processors' on_start methods known to do nothing: spans do not call them
_NO_START = (SpanProcessor.on_start, BatchProcessor.on_start)


class Tracer(trace_api.Tracer):
    """Makes :class:`Span` objects for one instrumentation scope of a :class:`TracerProvider`."""

    def __init__(self, provider: TracerProvider, scope: InstrumentationScope) -> None:
        self.resource = provider.resource
        self.scope = scope
        self.processors = provider.processors  # the provider's lists: processors added later are seen
        self.starters = provider.starters
        self._bound = provider.bound

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        if context is not None:
            current = context.get(_SPAN_KEY)
        else:
            current = (_CONTEXT.get() if _CONTEXT is not None else context_api.get_current()).get(_SPAN_KEY)
        parent: SpanContext | Span | RemoteParent | None
        if type(current) is Span:  # a parent in this process: no SpanContext to build
            trace_id, flags, state = current._trace_id, current._flags, current._trace_state
            recording = bool(flags & 1)
            parent = current
        else:
            context_of = current.get_span_context() if isinstance(current, trace_api.Span) else None
            if context_of is not None and context_of.is_valid:
                trace_id, flags, state = context_of.trace_id, context_of.trace_flags, context_of.trace_state
                recording = bool(flags & 1)  # parent-based: the trace's first span decided
                parent = context_of
            else:
                trace_id = _bits(128) or 1
                bound = self._bound
                recording = bound is None or (trace_id & _LOW_64) < bound
                flags, state, parent = (1 if recording else 0), _EMPTY_STATE, None
        span = Span(
            self,
            name,
            kind,
            trace_id,
            flags,
            state,
            parent,
            dict(attributes) if attributes else {},
            [link for link in links if link.context.is_valid] if links else [],
            start_time or _time_ns(),
            recording,
            record_exception,
            set_status_on_exception,
        )
        if recording and self.starters:
            self._started(span, context)
        return span

    def _started(self, span: Span, context: context_api.Context | None) -> None:
        """Tell the processors that look at a span's start (only recorded spans reach them)."""
        for processor in self.starters:
            processor.on_start(cast("Any", span), context)

    def start_child_of_remote(
        self, parent: RemoteParent, name: str, kind: SpanKind, attributes: Mapping[str, Any] | None
    ) -> Span:
        """``start_as_current_span(name, kind=kind, attributes=attributes)`` under the caller's span ``parent``
        (what a server span of a request carrying only a ``traceparent`` needs: no context to extract first)."""
        flags = parent._flags
        attributes = dict(attributes) if attributes else {}
        trace_id, recording = parent._trace_id, bool(flags & 1)
        span = Span(
            self, name, kind, trace_id, flags, _EMPTY_STATE, parent, attributes, [], _time_ns(), recording, True, True
        )  # fmt: skip
        span._activate = True
        if recording and self.starters:
            self._started(span, None)
        return span

    def start_as_current_span(  # type: ignore[override]  # a context manager object, not a generator
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Span:
        span = self.start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )
        span._activate = True
        span._end_on_exit = end_on_exit
        return span


class TracerProvider(trace_api.TracerProvider):
    """Tracers for one service (``resource``), sampling a ``ratio`` of traces by trace id (parent-based), or
    recording every span (``ratio=None``: a processor chooses what to keep). Spans go to the processors added
    with :meth:`add_span_processor`; :meth:`shutdown` flushes and stops them."""

    def __init__(self, resource: Resource, *, ratio: float | None = None) -> None:
        self.resource = resource
        self.processors: list[SpanProcessor] = []
        self.starters: list[SpanProcessor] = []  # those of processors whose on_start does something
        self.bound = None if ratio is None else TraceIdRatioBased.get_bound_for_rate(ratio)

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Tracer:
        scope = InstrumentationScope(
            instrumenting_module_name, instrumenting_library_version, schema_url, dict(attributes or {})
        )
        return Tracer(self, scope)

    def add_span_processor(self, processor: SpanProcessor) -> None:
        self.processors.append(processor)
        if getattr(type(processor), "on_start", None) not in _NO_START:
            self.starters.append(processor)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(processor.force_flush(timeout_millis) for processor in self.processors)

    def shutdown(self) -> None:
        processors, self.processors[:], self.starters[:] = list(self.processors), [], []
        for processor in processors:
            processor.shutdown()
