"""A service's Prometheus metrics, served at ``/metrics`` by every :class:`~meshkit.runtime.Service`.

- ``meshkit_http_requests_total{service, method, route, status}`` and
  ``meshkit_http_request_duration_seconds{service, route}``: the requests the service answered (``route`` is the
  FastAPI route template, ``unmatched`` for a 404 without one);
- ``meshkit_messages_handled_total{service, topic, group, outcome}`` (``ok`` / ``error``) and
  ``meshkit_message_handling_seconds{service, topic}``;
- ``meshkit_client_breaker_state{service, downstream}``: 0 closed, 1 half-open, 2 open, for each service it calls;
- ``meshkit_dead_letters{service, topic, group}``: messages in the dead letter topic of each subscription (counted
  at scrape time, up to 10,000).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from meshkit._core.metrics import MetricSet
from meshkit.resilience import BreakerState

__all__ = ["ServiceMetrics"]

_STATES = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}
DLQ_COUNT_LIMIT = 10_000


class ServiceMetrics:
    def __init__(self, service: str) -> None:
        self.service = service
        self.set = MetricSet("service")
        self.requests = self.set.counter(
            "meshkit_http_requests", "HTTP requests answered", ("service", "method", "route", "status")
        )
        self.duration = self.set.histogram(
            "meshkit_http_request_duration_seconds", "Seconds to answer an HTTP request", ("service", "route")
        )
        self.handled = self.set.counter(
            "meshkit_messages_handled", "Messages handled", ("service", "topic", "group", "outcome")
        )
        self.handling = self.set.histogram(
            "meshkit_message_handling_seconds", "Seconds a handler took", ("service", "topic")
        )
        self.breakers: Callable[[], Iterable[tuple[str, Any]]] = tuple
        self.set.gauge(
            "meshkit_client_breaker_state",
            "The breaker of each service this one calls: 0 closed, 1 half-open, 2 open",
            ("service", "downstream"),
            lambda: [((service, name), _STATES.get(state, 0.0)) for name, state in self.breakers()],
        )
        self.dead_letters: dict[tuple[str, str], int] = {}
        self.set.gauge(
            "meshkit_dead_letters",
            "Messages in the dead letter topic of each subscription (counted at scrape time)",
            ("service", "topic", "group"),
            lambda: [((service, topic, group), float(n)) for (topic, group), n in self.dead_letters.items()],
        )

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.inc((self.service, method, route, str(status)))
        self.duration.observe((self.service, route), seconds)

    def message(self, topic: str, group: str, ok: bool, seconds: float) -> None:
        self.handled.inc((self.service, topic, group, "ok" if ok else "error"))
        self.handling.observe((self.service, topic), seconds)

    def render(self) -> bytes:
        return self.set.render()
