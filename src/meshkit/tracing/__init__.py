"""Trace context: W3C ``traceparent`` / ``tracestate`` and ``baggage`` carried across every hop: service calls,
requests, messages and the gateway.

This is the first piece of meshkit's tracing layer: propagation. ``inject`` writes the current context into a
message's headers; ``extracted`` runs code (a handler) inside the context a message carried. With the
OpenTelemetry API installed (``pip install 'meshkit[otel]'``) its global propagator and context are used, so
meshkit's messages join the traces of any OpenTelemetry-instrumented code; without it, the context still flows
from a handler to the messages it publishes, through a context variable.
"""

from meshkit.tracing.propagation import TRACE_HEADERS, current_headers, extracted, inject

__all__ = ["TRACE_HEADERS", "current_headers", "extracted", "inject"]
