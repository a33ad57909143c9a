"""The span recorder behind :func:`meshkit.tracing.spans.provider`: OpenTelemetry's trace API, implemented lean.

Why not the SDK's ``Tracer``: on the benchmark machine one SDK span (``start_as_current_span``, two attributes, a
``BatchSpanProcessor``) costs 40 to 70 µs of Python, mostly generality meshkit's spans do not use (sampler and
span-limit objects, attribute cleaning, metrics hooks, two generator context managers per span). A traced service
call makes two spans and the untraced call takes about 165 µs, so the SDK alone adds about 90 %; the issue's budget
is 10 %. This recorder makes the same spans for a fraction of that:

- :class:`Span` implements ``opentelemetry.trace.Span`` (so ``trace.get_current_span()``, propagators, links and
  the log filter work on it unchanged) and reads as an SDK ``ReadableSpan``: ended spans go to the SDK's span
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
- The hot paths of a traced call are single compiled calls: :meth:`Tracer.start_request_span` makes a service
  request's server span straight from its ASGI headers (under a lone plain ``traceparent``), and
  :meth:`Span.call_headers` writes a client span's headers; both leave anything else (``tracestate``, baggage,
  other propagators) to OpenTelemetry's propagation API.
- :class:`BatchProcessor` queues ended spans for a thread to export, as the SDK's ``BatchSpanProcessor`` does,
  with a deque append per span (the SDK's checks the process id, a system call, on every span).

Release wheels compile this module with mypyc (``[tool.hatch.build.targets.wheel.hooks.mypyc]``): its classes are
native classes, so none subclasses an OpenTelemetry class (a native class cannot). ``Span``, ``Tracer`` and
``TracerProvider`` are registered as virtual subclasses of the API's ABCs (``isinstance`` holds); ``Span`` has
every attribute and method of a ``ReadableSpan`` but is not one; ``BatchProcessor`` has ``SpanProcessor``'s
methods. Keep the module compilable: no ``__dict__`` writes, attributes set in ``__init__``, no weak references
to its objects (``benchmarks/tracing.py --native`` measures the compiled build).

Attributes: values meshkit sets are primitives; a value a user sets that OpenTelemetry cannot carry (not a str,
bool, int, float or a sequence of one of them) is dropped with a debug log, as the SDK drops it with a warning.
There are no span limits (the SDK's default cap of 128 attributes and events per span is not applied).
"""

from __future__ import annotations

import collections
import contextvars
import functools
import logging
import os
import random
import threading
import time
import traceback
import weakref
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, Final, cast

from opentelemetry import context as context_api
from opentelemetry import propagate as propagate_api
from opentelemetry import trace as trace_api
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS_INSTRUMENTATION
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from meshkit.tracing._w3c import parse_traceparent
from meshkit.tracing.propagation import is_default_textmap, otel_runtime

__all__ = ["BatchProcessor", "Span", "Tracer", "TracerProvider"]

log = logging.getLogger(__name__)

# (Final: compiled, a C static rather than a lookup in the module's namespace)
_UNSET: Final = Status(StatusCode.UNSET)
_EMPTY_STATE: Final = TraceState()
_LOW_64: Final = (1 << 64) - 1
_PRIMITIVES: Final = (str, bool, int, float)
_SERVER: Final = SpanKind.SERVER
_set_span_in_context: Final = trace_api.set_span_in_context
_attach: Final = context_api.attach
_detach: Final = context_api.detach
_time_ns: Final = time.time_ns
_bytes_hex: Final = bytes.hex  # (compiled, b.hex() looks the method up by name on every call)
_bits: Final = random.getrandbits
_get_textmap: Final = propagate_api.get_global_textmap
# (compiled, a name imported from a module that is not compiled is looked up in this module's namespace on every
# use: what the hot path calls is bound to a C static once)
_Context: Final = Context
# OpenTelemetry's current-Context variable (None: a runtime context other than the default, used through the API;
# not Final: tests replace it, and tracers read it once, into Tracer.direct) and the key of the current span in a
# Context; see meshkit.tracing.propagation.otel_runtime.
_CONTEXT, _SPAN_KEY_FOUND = otel_runtime()
_SPAN_KEY: Final = _SPAN_KEY_FOUND
# its methods, bound once (compiled, a call to a bound method skips looking its name up on every span); a variable
# of our own stands in under another runtime context, where they are not called
_VAR: Final = _CONTEXT if _CONTEXT is not None else contextvars.ContextVar[Any]("meshkit_unused")
_var_get: Final = _VAR.get
_var_set: Final = _VAR.set
_var_reset: Final = _VAR.reset


def _clean(value: Any) -> Any:
    """``value`` as an OpenTelemetry attribute value, or None when it cannot be one."""
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = tuple(value)
        kinds = {type(item) for item in items}
        if len(kinds) <= 1 and all(isinstance(item, _PRIMITIVES) for item in items):
            return items
    return None


class Span:
    """A span being recorded, and once ended what exporters receive: it reads as an SDK ``ReadableSpan`` (every
    property and method of one; it is not a subclass, so that mypyc compiles it to a native class). Made by
    :class:`Tracer`; registered as an ``opentelemetry.trace.Span``."""

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        kind: SpanKind,
        trace_id: int,
        flags: int,
        trace_state: TraceState,
        parent: SpanContext | Span | int | None,
        attributes: dict[str, Any],
        links: Sequence[Link],
        start_time: int,
        recording: bool,
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> None:
        self._name = name
        self._kind = kind
        self._parent_ref = parent
        self._attributes = attributes
        self._links: Sequence[Link] = links if links else ()
        self._events: Sequence[Event] = ()  # a list of its own once the span has an event
        self._start_time = start_time
        # 0 until the span ends (compiled, an int field holds a time unboxed; int | None would box it)
        self._end_time = 0
        self._status: Status = _UNSET
        self._tracer = tracer
        self._trace_id = trace_id
        self._span_id: int = _bits(64) or 1
        self._flags = flags
        self._trace_state = trace_state
        self._recording = recording
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception
        self._activate = False  # start_as_current_span's: the span becomes current in __enter__
        self._end_on_exit = True
        self._token: object = None
        self._built: SpanContext | None = None  # the SpanContext, once something asked for it
        # A traceparent of this span's trace (the caller's header, or one this span or its parent wrote): its
        # characters 3-35 are the trace id in hex, which every traceparent a span of the trace writes repeats
        # (formatting it costs as much as the rest of the header).
        self._trace_header: str | None = None

    # -- what exporters read (ReadableSpan's interface) --------------------------------------------------------

    @property
    def context(self) -> SpanContext:
        """The span's ``SpanContext``, made on first access."""
        built = self._built
        if built is None:
            built = self._built = SpanContext(
                self._trace_id,
                self._span_id,
                is_remote=False,
                trace_flags=TraceFlags(self._flags),
                trace_state=self._trace_state,
            )
        return built

    def get_span_context(self) -> SpanContext:
        return self.context

    @property
    def parent(self) -> SpanContext | None:
        """The parent's ``SpanContext`` (a parent in this process is kept as its span, a remote one as its span id,
        until this is asked)."""
        parent = self._parent_ref
        if isinstance(parent, Span):
            return parent.context
        if isinstance(parent, int):  # the caller's span id, read from its traceparent: built once, when asked
            built = SpanContext(self._trace_id, parent, is_remote=True, trace_flags=TraceFlags(self._flags))
            self._parent_ref = built
            return built
        return parent

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> SpanKind:
        return self._kind

    @property
    def start_time(self) -> int | None:
        return self._start_time

    @property
    def end_time(self) -> int | None:
        return self._end_time or None

    @property
    def status(self) -> Status:
        return self._status

    @property
    def attributes(self) -> Mapping[str, Any]:
        return MappingProxyType(self._attributes)

    @property
    def events(self) -> Sequence[Event]:
        return tuple(self._events)

    @property
    def links(self) -> Sequence[Link]:
        return tuple(self._links)

    @property
    def resource(self) -> Resource:
        return self._tracer.resource

    @property
    def instrumentation_scope(self) -> InstrumentationScope:
        return self._tracer.scope

    @property
    def instrumentation_info(self) -> None:
        """Deprecated in the SDK (``instrumentation_scope`` replaces it); None, as the SDK's spans have now."""
        return None

    @property
    def dropped_attributes(self) -> int:
        return 0  # no span limits: nothing is dropped

    @property
    def dropped_events(self) -> int:
        return 0

    @property
    def dropped_links(self) -> int:
        return 0

    def to_json(self, indent: int | None = 4) -> str:
        """The span as the SDK's ``ReadableSpan.to_json`` writes it (``ConsoleSpanExporter``'s format)."""
        readable = ReadableSpan(
            self._name,
            self.context,
            self.parent,
            self._tracer.resource,
            self._attributes,
            self._events,
            self._links,
            self._kind,
            None,
            self._status,
            self._start_time,
            self._end_time or None,
            self._tracer.scope,
        )
        return str(readable.to_json(indent))

    def w3c_headers(self, carrier: dict[str, str]) -> None:
        """Write this span's W3C ``traceparent`` (and ``tracestate``, if any) into ``carrier``, as the W3C
        propagator would, without building its ``SpanContext``."""
        # ids as hex through bytes.hex(n.to_bytes()): compiled, about 40 % cheaper than one "%032x-%016x" format
        flags = self._flags
        known = self._trace_header
        trace_hex = known[3:35] if known is not None else _bytes_hex(self._trace_id.to_bytes(16, "big"))
        header = (
            f"00-{trace_hex}-{_bytes_hex(self._span_id.to_bytes(8, 'big'))}-"
            f"{'01' if flags == 1 else _bytes_hex(flags.to_bytes(1, 'big'))}"
        )
        carrier["traceparent"] = header
        if known is None:
            self._trace_header = header  # spans started under this one from now on take the trace id from it
        state = self._trace_state
        if state is not _EMPTY_STATE and state:
            carrier["tracestate"] = state.to_header()

    def call_headers(self) -> dict[str, str] | None:
        """The trace headers of a call made while this span is the current one, as OpenTelemetry's default
        propagators write them; None when they must come from the propagation API (other propagators, or a
        context holding more than this span, such as baggage, or this span not current)."""
        if not self._tracer.direct:
            return None
        values = _var_get()
        if len(values) != 1 or _SPAN_KEY not in values or values[_SPAN_KEY] is not self:
            return None
        if not self._tracer.w3c_propagation():
            return None
        carrier: dict[str, str] = {}
        self.w3c_headers(carrier)
        return carrier

    # -- opentelemetry.trace.Span ------------------------------------------------------------------------------

    def is_recording(self) -> bool:
        return self._recording and not self._end_time

    def set_attribute(self, key: object, value: Any) -> None:
        # (key: object, not str: compiled, a str annotation would raise TypeError, and the API must not raise)
        if not self._recording or self._end_time:  # an ended span is read-only, as in the SDK
            return
        if type(key) is not str:
            log.debug("span attribute dropped: its key %r is not a str", key)
            return
        kind = type(value)
        # (identity tests: compiled, "type(value) in a tuple" compares the types with ==, two rich comparisons
        # for an int)
        if kind is not str and kind is not int and kind is not float and kind is not bool:
            cleaned = _clean(value)
            if cleaned is None:
                log.debug("span attribute %r dropped: %r is not a valid attribute value", key, type(value).__name__)
                return
            value = cleaned
        self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if isinstance(attributes, dict):  # compiled, a dict's items are iterated natively
            for key, value in attributes.items():
                self.set_attribute(key, value)
        else:
            for key, value in attributes.items():
                self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None) -> None:
        if self._recording and not self._end_time:
            self._events = [*self._events, Event(name, dict(attributes or {}), timestamp or _time_ns())]

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if self._recording and not self._end_time and context.is_valid:
            self._links = [*self._links, Link(context, dict(attributes) if attributes else None)]

    def update_name(self, name: str) -> None:
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._status.status_code is StatusCode.OK or self._end_time:  # final, as in the SDK
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
        if not self._recording or self._end_time:
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
        if self._end_time:
            return
        self._end_time = end_time or _time_ns()
        if self._recording:
            for processor in self._tracer.processors:
                if isinstance(processor, BatchProcessor):  # compiled, a direct call (not a method looked up by name)
                    processor.on_end(self)
                else:
                    processor.on_end(self)

    # -- the current span, as start_as_current_span's context manager ------------------------------------------

    def __enter__(self) -> Span:
        if self._activate:
            if self._tracer.direct:  # what context.attach(trace.set_span_in_context(self)) does
                # (a plain dict first: Context refuses item assignment, and dict's own __setitem__ called through
                # the class costs more, compiled, than building the dict)
                self._token = _var_set(_Context({**_var_get(), _SPAN_KEY: self}))
            else:
                self._token = _attach(_set_span_in_context(cast("Any", self)))
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
                if not self._tracer.direct:
                    _detach(cast("Any", token))
                else:
                    try:
                        _var_reset(cast("Any", token))
                    except (ValueError, RuntimeError):  # made in another context: logged, as context.detach does
                        log.exception("failed to detach the span %r from the current context", self._name)
            if self._end_on_exit:
                self.end()


trace_api.Span.register(Span)


_SHUTDOWN_SECONDS = 30.0  # the SDK's batch processor waits as long


class BatchProcessor:
    """Sampled spans wait in a queue and a thread of the processor exports them, ``max_export_batch_size`` at a
    time: when that many are waiting, every ``schedule_delay_millis`` otherwise, and on :meth:`force_flush` and
    :meth:`shutdown`. The SDK's ``BatchSpanProcessor`` does the same; this one is cheaper per span, where it counts
    (a span's end on the request path is an append to a deque: the SDK's checks the process id, a system call, and
    several flags per span). When ``max_queue_size`` spans are waiting, new ones are dropped and counted (a warning
    says how many). In a forked child the queue starts empty with a new thread. The exporter runs with
    instrumentation suppressed, so its own HTTP calls make no spans. The export thread leaves the spans of its last
    batch to be freed by the spans that end after them (two each, on their own thread): a processor holds at most one
    batch of exported spans, until later spans end or the thread's next round (``schedule_delay_millis``)."""

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
        self._queue: collections.deque[Any] = collections.deque()
        # exported spans, released by the thread that ends spans (see on_end)
        self._exported: collections.deque[Any] = collections.deque()
        self._enqueue = self._queue.append  # bound once: compiled, a method call looks its name up each time
        self._dropped = 0
        self._stopping = False
        self._start()
        # A forked child inherits the queue but not the thread: it starts over (the parent exports what it held).
        # The hook holds a weak reference (to a partial: compiled, the processor itself takes none), so that it
        # keeps no processor alive; the partial lives as long as the processor.
        self._restart = functools.partial(BatchProcessor._start, self)
        os.register_at_fork(after_in_child=functools.partial(_restart_if_alive, weakref.ref(self._restart)))

    def _start(self) -> None:
        self._queue.clear()
        self._exported.clear()
        # guards _flushes, _stopping and _dropped (a forked child gets a new lock: a parent's may be held)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._flushes: list[threading.Event] = []
        # (not "_thread": compiled, the name clashes with C's __thread keyword)
        self._worker = threading.Thread(target=self._work, name="meshkit-span-export", daemon=True)
        self._worker.start()

    def on_start(self, span: Any, parent_context: context_api.Context | None = None) -> None:
        return None

    def _on_ending(self, span: Any) -> None:
        """What the SDK's spans call on every processor as they end (``SpanProcessor``'s hook, a no-op here: this
        processor works in an SDK ``TracerProvider`` too)."""

    def on_end(self, span: Any) -> None:
        exported = self._exported
        if exported:  # release up to two exported spans here, where they were made (see _export_queued)
            try:
                exported.popleft()
                if exported:
                    exported.popleft()
            except IndexError:  # another thread ending spans emptied it meanwhile
                pass
        if isinstance(span, Span):
            if not span._flags & 1:
                return
        elif span.context is None or not span.context.trace_flags.sampled:
            return
        queue = self._queue
        if len(queue) >= self._max_queue or self._stopping:
            with self._lock:  # (rare: a full queue) the export thread swaps the count under the same lock
                self._dropped += 1
            return
        self._enqueue(span)
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
        self._worker.join(_SHUTDOWN_SECONDS)
        if not self._worker.is_alive():
            self._export_queued()  # a span that ended while the thread finished (on_end saw it running)
        else:  # an exporter stuck on an unreachable endpoint: the daemon thread is left
            log.warning("span export still running %.0f s into shutdown; spans left are dropped", _SHUTDOWN_SECONDS)
        self._exported.clear()
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
            self._exported.clear()  # what ending spans did not release since the last round (a quiet service)
            self._export_queued()
            for done in flushes:
                done.set()
            if stopping:
                return

    def _export_queued(self) -> None:
        """Export the spans queued now (not those that arrive meanwhile: under a load the exporter cannot keep up
        with, the loop still comes round to flushes and to saying how many spans were dropped)."""
        queue = self._queue
        take = queue.popleft  # bound once (see _enqueue)
        left = len(queue)
        while left > 0:
            batch = [take() for _ in range(min(left, self._max_batch))]
            left -= len(batch)
            try:
                self._exporter.export(batch)
            except Exception:
                log.exception("exporting %d spans failed", len(batch))
            # The spans of the last batch are freed by the threads that end spans, two per span they end, not here:
            # freed on this thread, a batch's memory moved between the two threads' processor caches and back,
            # which cost the request path more than the freeing itself. Earlier batches of this round (a backlog)
            # and what is left at the next round are freed here.
            exported = self._exported
            exported.clear()
            exported.extend(batch)
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.warning("%d spans dropped: the export queue was full (%d spans)", dropped, self._max_queue)


def _restart_if_alive(restart: weakref.ref[functools.partial[None]]) -> None:
    """After a fork, in the child: start a processor's thread again, unless the processor is gone."""
    made = restart()
    if made is not None:
        made()


# processors' on_start methods known to do nothing: spans do not call them
_NO_START: Final = (SpanProcessor.on_start, BatchProcessor.on_start)


class Tracer:
    """Makes :class:`Span` objects for one instrumentation scope of a :class:`TracerProvider`."""

    def __init__(self, provider: TracerProvider, scope: InstrumentationScope) -> None:
        self.resource = provider.resource
        self.scope = scope
        self.processors: list[Any] = provider.processors  # the provider's lists: processors added later are seen
        self.starters: list[Any] = provider.starters
        self._bound: int | None = provider.bound
        self.direct = _CONTEXT is not None  # OpenTelemetry's default runtime context: its variable is used directly
        self._textmap: object = None  # the global propagator w3c_propagation saw last, and its answer
        self._w3c = False

    def w3c_propagation(self) -> bool:
        """Whether OpenTelemetry's global propagator is its default one (W3C trace context and baggage), so that
        this tracer's spans read and write ``traceparent`` themselves (asked per request: the answer is kept until
        the propagator changes)."""
        textmap = _get_textmap()
        if textmap is not self._textmap:
            answer = is_default_textmap(textmap)  # (before the textmap is kept: another thread may ask meanwhile)
            self._w3c = answer
            self._textmap = textmap
            return answer
        return self._w3c

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
        current: Any
        if context is not None:
            current = context.get(_SPAN_KEY)
        else:
            values = _var_get() if self.direct else context_api.get_current()
            # not values.get(): compiled, that looks the method up by name on every span
            current = values[_SPAN_KEY] if _SPAN_KEY in values else None  # noqa: SIM401
        parent: SpanContext | Span | int | None
        trace_id: int
        flags: int
        state: TraceState
        header: str | None = None
        if isinstance(current, Span):  # a parent in this process: no SpanContext to build
            trace_id, flags, state = current._trace_id, current._flags, current._trace_state
            recording = bool(flags & 1)
            parent = current
            header = current._trace_header  # the same trace: the parent's header (if it wrote one) serves
        else:
            context_of: SpanContext | None = (  # (None first: isinstance against the ABC is the slow part)
                current.get_span_context() if current is not None and isinstance(current, trace_api.Span) else None
            )
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
            [link for link in links if link.context.is_valid] if links else (),
            start_time or _time_ns(),
            recording,
            record_exception,
            set_status_on_exception,
        )
        span._trace_header = header
        if recording and self.starters:
            self._started(span, context)
        return span

    def _started(self, span: Span, context: context_api.Context | None) -> None:
        """Tell the processors that look at a span's start (only recorded spans reach them)."""
        for processor in self.starters:
            processor.on_start(cast("Any", span), context)

    def start_request_span(self, headers: Iterable[Any], name: str, attributes: dict[str, Any]) -> Span | None:
        """A server span for an ASGI request with these ``headers``: what ``start_as_current_span(name,
        kind=SERVER, attributes=attributes)`` makes under the caller's span (``attributes`` becomes the span's, not
        copied). The caller's span is named by the request's lone, plain version-00 ``traceparent``, or is the
        current span when the request carries none. None when the request needs OpenTelemetry's propagators
        (``tracestate``, ``baggage``, a repeated or unusual ``traceparent``: the caller then uses
        :func:`meshkit.tracing.spans.server_span`), or when the global propagator is not the default one."""
        if not self.w3c_propagation():
            return None
        found: object = None
        key: object
        value: object
        for pair in headers:  # ASGI: two-item iterables (compiled, a tuple or list indexed: no iterator per pair)
            if type(pair) is tuple or type(pair) is list:
                key, value = pair[0], pair[1]
            else:
                key, value = pair
            if key == b"traceparent":
                if found is not None:
                    return None
                found = value
            elif key == b"tracestate" or key == b"baggage":  # noqa: PLR1714 - compiled, cheaper than hashing key
                return None
        if found is None:
            root = self.start_span(name, None, _SERVER, attributes)
            root._activate = True
            return root
        if not isinstance(found, bytes):  # not what ASGI promises: the general path decides
            return None
        traceparent = found.decode("latin-1")
        ids = parse_traceparent(traceparent)
        if ids is None:
            return None
        trace_id, span_id, flags = ids
        recording = bool(flags & 1)
        span = Span(
            self, name, _SERVER, trace_id, flags, _EMPTY_STATE, span_id, attributes, (), _time_ns(),
            recording, True, True,
        )  # fmt: skip
        span._activate = True
        span._trace_header = traceparent
        if recording and self.starters:
            self._started(span, None)
        return span

    def start_as_current_span(  # a context manager object, not a generator
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


trace_api.Tracer.register(Tracer)


class TracerProvider:
    """Tracers for one service (``resource``), sampling a ``ratio`` of traces by trace id (parent-based), or
    recording every span (``ratio=None``: a processor chooses what to keep). Spans go to the processors added
    with :meth:`add_span_processor`; :meth:`shutdown` flushes and stops them."""

    def __init__(self, resource: Resource, *, ratio: float | None = None) -> None:
        self.resource = resource
        self.processors: list[Any] = []  # SpanProcessor's interface (BatchProcessor has it, not as a subclass)
        self.starters: list[Any] = []  # those of processors whose on_start does something
        self.bound: int | None = None if ratio is None else TraceIdRatioBased.get_bound_for_rate(ratio)

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

    def add_span_processor(self, processor: Any) -> None:
        self.processors.append(processor)
        if getattr(type(processor), "on_start", None) not in _NO_START:
            self.starters.append(processor)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(processor.force_flush(timeout_millis) for processor in self.processors)

    def shutdown(self) -> None:
        processors, self.processors[:], self.starters[:] = list(self.processors), [], []
        for processor in processors:
            processor.shutdown()


trace_api.TracerProvider.register(TracerProvider)
