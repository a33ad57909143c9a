"""What the gateway tells operators: Prometheus metrics and a structured JSON access log.

Metrics (one registry per gateway, served by the admin API at ``/metrics``):

- ``meshkit_gateway_requests_total{route, upstream, status}``: answered requests;
- ``meshkit_gateway_request_duration_seconds{route}``: time from the request head to the last byte written;
- ``meshkit_gateway_upstream_errors_total{route, upstream, kind}``: ``connect``, ``reset``, ``timeout``,
  ``protocol``;
- ``meshkit_gateway_breaker_state{route}``: 0 closed, 1 half-open, 2 open (read at scrape time).

The access log is a plugin (``- access_log: {}``) writing one JSON object per request to a stream (stdout,
stderr or a file), buffered and flushed at least every half second: a request costs one ``json.dumps`` and an
append, not a logging round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import IO, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from meshkit._core.metrics import MetricSet
from meshkit._core.optional import require
from meshkit.gateway.plugin import Plugin, PluginContext, ProxyRequest
from meshkit.tracing import TRACE_HEADERS

__all__ = ["AccessLog", "GatewaySpans", "Metrics"]


class Metrics:
    """Prometheus metrics of one gateway (its own registry: two gateways in one process do not mix). Recording a
    request finds its series in one dictionary and adds to them (see :mod:`meshkit._core.metrics`)."""

    def __init__(self) -> None:
        self.set = MetricSet("gateway")
        self._requests = self.set.counter(
            "meshkit_gateway_requests", "Requests answered", ("route", "upstream", "status")
        )
        self._duration = self.set.histogram(
            "meshkit_gateway_request_duration_seconds",
            "Seconds from the request head to the last byte of the answer",
            ("route",),
        )
        self._errors = self.set.counter(
            "meshkit_gateway_upstream_errors",
            "Upstream attempts that failed without an answer",
            ("route", "upstream", "kind"),
        )
        # per (route, upstream, status): its requests counter's series and its route's duration series, kept so
        # that a request builds no label tuple or string and looks up neither series
        self._series: dict[tuple[str, str, int], tuple[list[float], list[float]]] = {}
        self.breaker_states: Callable[[], Iterable[tuple[str, int]]] = tuple
        self.set.gauge(
            "meshkit_gateway_breaker_state",
            "0 closed, 1 half-open, 2 open",
            ("route",),
            lambda: [((route,), float(state)) for route, state in self.breaker_states()],
        )

    def request_done(self, route: str, upstream: str, status: int, elapsed: float) -> None:
        series = self._series.get((route, upstream, status))
        if series is None:  # the first request of its kind: its series made and kept for the next ones
            requests = self._requests.series((route, upstream, str(status)))
            series = self._series[route, upstream, status] = (requests, self._duration.series((route,)))
        series[0][0] += 1.0
        self._duration.add(series[1], elapsed)

    def upstream_error(self, route: str, upstream: str, kind: str) -> None:
        self._errors.inc((route, upstream, kind))

    def render(self) -> bytes:
        return self.set.render()


class AccessLogOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = "stdout"  # stdout, stderr or a file path (appended to)
    headers: list[str] = []  # request headers to include (lower-case names)


class AccessLog(Plugin):
    """One JSON line per request: time, client, consumer, method, path, route, status, duration (ms), trace."""

    name: ClassVar[str] = "access_log"
    Options: ClassVar[type[BaseModel]] = AccessLogOptions

    def __init__(self, options: Any = None, context: PluginContext | None = None) -> None:
        opts = options if isinstance(options, AccessLogOptions) else AccessLogOptions()
        self._headers = tuple(h.lower() for h in opts.headers)
        self._buffer: list[str] = []
        self._stream: IO[str]
        self._owned = False
        if opts.to == "stdout":
            self._stream = sys.stdout
        elif opts.to == "stderr":
            self._stream = sys.stderr
        else:
            folder = context.folder if context is not None else "."
            path = opts.to if opts.to.startswith("/") else f"{folder}/{opts.to}"
            self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the context's on_close
            self._owned = True
        self._flusher: asyncio.TimerHandle | None = None
        if context is not None:
            context.on_close(self.aclose)

    def done(self, req: ProxyRequest, status: int, elapsed: float) -> None:
        entry: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "client": req.client,
            "method": req.method,
            "path": req.path,
            "route": req.route,
            "status": status,
            "ms": round(elapsed * 1000, 3),
        }
        if req.consumer is not None:
            entry["consumer"] = req.consumer
        if req.query:
            entry["query"] = req.query
        trace = req.headers.get("traceparent")
        if trace is not None:
            entry["traceparent"] = trace
        for name in self._headers:
            value = req.headers.get(name)
            if value is not None:
                entry[name] = value
        self._buffer.append(json.dumps(entry, separators=(",", ":")))
        if len(self._buffer) >= 512:
            self.flush()
        elif self._flusher is None:
            try:
                self._flusher = asyncio.get_running_loop().call_later(0.5, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._buffer:
            lines, self._buffer = self._buffer, []
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()

    async def aclose(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()


class GatewaySpans:
    """A server span per request (``GET orders``: method and route), continuing the caller's trace; the upstream
    and the BFF calls receive its context. Used when the gateway is given a tracer."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self._propagate = require("opentelemetry.propagate", "otel")
        self._trace = require("opentelemetry.trace", "otel")
        self._server = self._trace.SpanKind.SERVER
        self._error = self._trace.StatusCode.ERROR

    def start(self, req: ProxyRequest) -> Any:
        carrier = {k: v for k, v in req.headers.items() if k in TRACE_HEADERS}
        context = self._propagate.extract(carrier) if carrier else None
        return self.tracer.start_span(
            f"{req.method} {req.route}" if req.route else req.method,
            context=context,
            kind=self._server,
            attributes={
                "http.request.method": req.method,
                "url.path": req.path,
                "url.scheme": req.scheme,
                "client.address": req.client,
                "http.route": req.route,
            },
        )

    def traceparent(self, span: Any) -> str:
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def activate(self, span: Any) -> contextlib.AbstractContextManager[Any]:
        manager: contextlib.AbstractContextManager[Any] = self._trace.use_span(span, end_on_exit=False)
        return manager

    def end(self, span: Any, req: ProxyRequest, status: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if req.consumer is not None:
            span.set_attribute("enduser.id", req.consumer)
        if status >= 500 or status == 0:
            span.set_status(self._error, f"HTTP {status}" if status else "no answer")
        span.end()
