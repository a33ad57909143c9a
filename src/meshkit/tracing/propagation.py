"""Inject and extract W3C trace context (see the package docstring).

With OpenTelemetry's default propagators (``tracecontext`` and ``baggage``), :func:`current_headers` formats the
current span's ``traceparent`` itself, exactly as the W3C propagator does but without its intermediate objects (a
meshkit recorder span writes its own, without building a ``SpanContext``); on a traced call the propagator's
inject and extract cost about as much as recording both spans did. Baggage to write, or other propagators
configured with ``OTEL_PROPAGATORS``, go through OpenTelemetry's global propagator, as does every extraction
here; a service's requests (the recorder's ``start_request_span``, reading the ASGI headers) read a lone plain
``traceparent`` straight into a server span. A client writes its call's headers from its span (:func:`span_headers`).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
from collections.abc import Mapping, MutableMapping
from types import ModuleType, TracebackType
from typing import Any

from meshkit.tracing._w3c import parse_traceparent

__all__ = ["TRACE_HEADERS", "current_headers", "extracted", "inject", "span_headers"]

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")

_carried: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "meshkit_trace_headers", default=None
)


class _Otel:
    """The OpenTelemetry API pieces propagation uses, imported once."""

    def __init__(self) -> None:
        self.propagate: ModuleType = importlib.import_module("opentelemetry.propagate")
        self.context: ModuleType = importlib.import_module("opentelemetry.context")
        self.trace: ModuleType = importlib.import_module("opentelemetry.trace")
        self.baggage: ModuleType = importlib.import_module("opentelemetry.baggage")
        self.baggage_propagator: Any = importlib.import_module(
            "opentelemetry.baggage.propagation"
        ).W3CBaggagePropagator()
        # The current span is stored in the current Context under this key (found through the public API).
        self.span_key: str = next(iter(self.trace.set_span_in_context(self.trace.INVALID_SPAN, self.context.Context())))
        # Under the default runtime context, the current Context is the value of one ContextVar: reading and
        # setting it directly is what opentelemetry.context's get_current/attach/detach do, in one call instead of
        # three layers. Under any other runtime context (OTEL_PYTHON_CONTEXT) this is None and the API is used.
        self._textmap: Any = None
        self._default = False
        runtime = getattr(self.context, "_RUNTIME_CONTEXT", None)
        default = importlib.import_module("opentelemetry.context.contextvars_context").ContextVarsRuntimeContext
        var = getattr(runtime, "_current_context", None)
        self.var: contextvars.ContextVar[Any] | None = (
            var if type(runtime) is default and isinstance(var, contextvars.ContextVar) else None
        )

    def default_propagation(self) -> bool:
        """Whether the global propagator is OpenTelemetry's default (W3C trace context and baggage)."""
        textmap = self.propagate.get_global_textmap()
        if textmap is not self._textmap:  # (asked on every traced call: the answer is kept per propagator)
            self._textmap, self._default = textmap, is_default_textmap(textmap)
        return self._default


def is_default_textmap(textmap: Any) -> bool:
    """Whether ``textmap`` (a propagator) reads and writes what OpenTelemetry's default one does: W3C trace context
    and baggage."""
    fields = getattr(textmap, "fields", None)  # (a propagator without them is not the default one)
    return fields is not None and set(fields) == set(TRACE_HEADERS)


@functools.cache
def _otel() -> _Otel | None:
    """OpenTelemetry's API, or None when it is not installed."""
    try:
        return _Otel()
    except ImportError:
        return None


def current_headers() -> dict[str, str]:
    """The current trace context as headers (empty when there is none)."""
    carrier: dict[str, str] = {}
    otel = _otel()
    if otel is not None:
        if otel.default_propagation():
            var = otel.var
            context = var.get() if var is not None else otel.context.get_current()
            current = context.get(otel.span_key)
            if current is not None:
                own = getattr(current, "w3c_headers", None)  # meshkit's recorder spans format their own
                if own is not None:
                    own(carrier)
                elif isinstance(current, otel.trace.Span):
                    span_context = current.get_span_context()
                    if span_context.is_valid:
                        carrier["traceparent"] = "00-%032x-%016x-%02x" % (  # noqa: UP031 - twice as fast
                            span_context.trace_id,
                            span_context.span_id,
                            span_context.trace_flags,
                        )
                        if span_context.trace_state:
                            carrier["tracestate"] = span_context.trace_state.to_header()
            # a context holding nothing but the current span holds no baggage
            if len(context) > (current is not None) and otel.baggage.get_all(context):
                otel.baggage_propagator.inject(carrier, context)
        else:
            otel.propagate.inject(carrier)
            carrier = {k: v for k, v in carrier.items() if k in TRACE_HEADERS}
    if "traceparent" not in carrier:
        carrier.update(_carried.get() or {})
    return carrier


def span_headers(span: Any) -> dict[str, str]:
    """:func:`current_headers`, for a caller holding the current span (a client writing its call's headers): a
    meshkit recorder span writes them itself when it can (see ``Span.call_headers``)."""
    own = getattr(span, "call_headers", None)
    made: dict[str, str] | None = own() if own is not None else None
    return made if made is not None else current_headers()


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current ``traceparent`` / ``tracestate`` / ``baggage`` to ``headers`` (a publisher's explicit ones
    win)."""
    for key, value in current_headers().items():
        headers.setdefault(key, value)


def otel_runtime() -> tuple[contextvars.ContextVar[Any] | None, str]:
    """OpenTelemetry's current-Context variable (None under a runtime context other than its default one: use
    ``opentelemetry.context`` then), and the key the current span is stored under in a Context. Needs
    OpenTelemetry's API installed."""
    otel = _otel()
    if otel is None:
        raise ImportError("opentelemetry-api is not installed")
    return otel.var, otel.span_key


class extracted:
    """Run the block inside the trace context ``headers`` carry (no-op when they carry none)."""

    __slots__ = ("_carried", "_otel_token", "_token")

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._carried = {k: headers[k] for k in TRACE_HEADERS if k in headers}
        self._token: contextvars.Token[Mapping[str, str] | None] | None = None
        self._otel_token: Any = None

    def __enter__(self) -> None:
        carried = self._carried
        if not carried:
            return
        self._token = _carried.set(carried)
        otel = _otel()
        if otel is None:
            return
        context = None
        if len(carried) == 1 and otel.default_propagation():  # a lone traceparent: what the W3C propagator reads
            ids = parse_traceparent(carried.get("traceparent", ""))
            if ids is not None:
                trace = otel.trace
                parent = trace.SpanContext(ids[0], ids[1], is_remote=True, trace_flags=trace.TraceFlags(ids[2]))
                context = otel.context.Context({otel.span_key: trace.NonRecordingSpan(parent)})
        self._otel_token = otel.context.attach(context if context is not None else otel.propagate.extract(carried))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._otel_token is not None:
            otel = _otel()
            assert otel is not None
            otel.context.detach(self._otel_token)
            self._otel_token = None
        if self._token is not None:
            _carried.reset(self._token)
            self._token = None
