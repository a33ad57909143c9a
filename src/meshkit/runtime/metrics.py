"""A service's Prometheus metrics, served at ``/metrics`` by every :class:`~meshkit.runtime.Service`.

- ``meshkit_http_requests_total{service, method, route, status}`` and
  ``meshkit_http_request_duration_seconds{service, route}``: the requests the service answered (``route`` is the
  FastAPI route template, ``unmatched`` for a 404 without one);
- ``meshkit_messages_handled_total{service, topic, group, outcome}`` (``ok`` / ``error``) and
  ``meshkit_message_handling_seconds{service, topic}``;
- ``meshkit_client_breaker_state{service, downstream}``: 0 closed, 1 half-open, 2 open, for each service it calls;
- ``meshkit_dead_letters{service, topic, group}``: messages in the dead letter topic of each subscription (counted
  at scrape time, up to 10,000);
- ``meshkit_consumer_lag{service, topic, group, state}``: how far each subscription's group is behind (asked of the
  broker at scrape time, :meth:`meshkit.messaging.Broker.lag`): ``state="waiting"`` (published, not yet delivered)
  and ``state="in_flight"`` (delivered, not yet acknowledged); a state the broker cannot tell is left out (RabbitMQ
  has no in-flight count, Kafka tells only the sum, exported as ``state="total"``).

And what ``/_meshkit/resilience`` answers (:func:`client_policies`, :class:`PolicyLog`): the state of each client's
circuit breaker with its recent transitions, and the calls its bulkhead refused. The gateway's rows (built by the
runner) come from the same functions, so a breaker looks the same wherever it lives.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Protocol

from meshkit._core.clock import Clock
from meshkit._core.metrics import MetricSet
from meshkit.client import ServiceClient
from meshkit.resilience import BreakerState, BreakerTransition, CallRejected, CircuitBreaker, Event, Events

__all__ = ["PolicyLog", "ServiceMetrics", "Watchable", "breaker_json", "client_policies", "client_watches"]

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
        self.lag: dict[tuple[str, str, str], int] = {}  # (topic, group, state) -> messages
        self.set.gauge(
            "meshkit_consumer_lag",
            "Messages a subscription's group is behind, by state: waiting, in_flight (total when only that is known)",
            ("service", "topic", "group", "state"),
            lambda: [((service, *key), float(n)) for key, n in self.lag.items()],
        )

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.inc((self.service, method, route, str(status)))
        self.duration.observe((self.service, route), seconds)

    def message(self, topic: str, group: str, ok: bool, seconds: float) -> None:
        self.handled.inc((self.service, topic, group, "ok" if ok else "error"))
        self.handling.observe((self.service, topic), seconds)

    def render(self) -> bytes:
        return self.set.render()


# -- resilience: what /_meshkit/resilience answers ---------------------------------------------------------------


class Watchable(Protocol):
    """A policy that reports events: a :class:`~meshkit.resilience.CircuitBreaker`, a bulkhead, a rate limiter."""

    @property
    def clock(self) -> Clock: ...

    @property
    def events(self) -> Events: ...


class PolicyLog:
    """What resilience policies reported: each breaker's last ``history`` state changes, and per kind of rejection
    (``circuit_open``, ``bulkhead_full``, ``rate_limited``) how many calls a policy refused and when it last did.

    :meth:`watch` listens to one policy's events under a ``key`` (unique in this log: two clients' breakers may
    share a name) until the function it returns is called. Times are Unix seconds: a transition's clock time is
    converted with the policy's clock when the event arrives. Listeners may run on any thread (a sync pipeline's),
    so the log takes a lock; it is bounded by the number of keys watched (see :meth:`retain`).
    """

    def __init__(self, history: int = 20) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, not {history}")
        self.history = history
        self._lock = threading.Lock()
        self._transitions: dict[str, deque[dict[str, Any]]] = {}
        self._rejected: dict[str, dict[str, tuple[int, float]]] = {}  # key -> kind -> (count, last time)

    def watch(self, key: str, policy: Watchable) -> Callable[[], None]:
        """Record ``policy``'s transitions and rejections under ``key``; returns the function that stops it."""
        clock = policy.clock

        def listen(event: Event) -> None:
            if isinstance(event, BreakerTransition):
                at = clock.wall() - max(clock.now() - event.at, 0.0)
                self._transition(key, event, at)
            elif isinstance(event, CallRejected):
                self._rejection(key, event.kind, clock.wall())

        return policy.events.subscribe(listen)

    def _transition(self, key: str, event: BreakerTransition, at: float) -> None:
        row = {
            "time": at,
            "from": str(event.from_state),
            "to": str(event.to_state),
            "failure_rate": event.failure_rate,
            "slow_call_rate": event.slow_call_rate,
        }
        with self._lock:
            kept = self._transitions.get(key)
            if kept is None:
                kept = self._transitions[key] = deque(maxlen=self.history)
            kept.append(row)

    def _rejection(self, key: str, kind: str, at: float) -> None:
        with self._lock:
            kinds = self._rejected.setdefault(key, {})
            count, _ = kinds.get(kind, (0, 0.0))
            kinds[kind] = (count + 1, at)

    def transitions(self, key: str) -> list[dict[str, Any]]:
        """The recent state changes recorded under ``key``, oldest first."""
        with self._lock:
            return [dict(t) for t in self._transitions.get(key, ())]

    def rejected(self, key: str) -> dict[str, tuple[int, float]]:
        """``{kind: (calls refused, Unix time of the last)}`` recorded under ``key``."""
        with self._lock:
            return dict(self._rejected.get(key, {}))

    def last_rejected(self, key: str, kind: str) -> float | None:
        """When the policy under ``key`` last refused a call for ``kind`` (``None``: not since it was watched)."""
        with self._lock:
            found = self._rejected.get(key, {}).get(kind)
        return found[1] if found is not None else None

    def retain(self, keys: Collection[str]) -> None:
        """Forget what was recorded under any other key (policies that are gone)."""
        with self._lock:
            for table in (self._transitions, self._rejected):
                for key in [k for k in table if k not in keys]:
                    del table[key]


def breaker_json(key: str, breaker: CircuitBreaker, log: PolicyLog, **labels: Any) -> dict[str, Any]:
    """One breaker as the dashboard shows it: ``labels`` (``name``, ``kind``, where it lives), its state and the
    counts of :meth:`~meshkit.resilience.CircuitBreaker.metrics`, when it last refused a call, and the recent
    ``transitions`` recorded under ``key``."""
    m = breaker.metrics()
    return {
        **labels,
        "policy": breaker.name,
        "state": str(m.state),
        "failure_rate": m.failure_rate,
        "slow_call_rate": m.slow_call_rate,
        "calls": m.calls,
        "failed": m.failed_calls,
        "slow": m.slow_calls,
        "not_permitted": m.not_permitted_calls,
        "last_rejected": log.last_rejected(key, "circuit_open"),
        "transitions": log.transitions(key),
    }


def client_watches(prefix: str, clients: Mapping[str, ServiceClient]) -> list[tuple[str, Watchable]]:
    """The policies of ``clients`` (by the name each is known under) to watch, with their keys in a log."""
    out: list[tuple[str, Watchable]] = []
    for name, client in clients.items():
        if client.breaker is not None:
            out.append((f"{prefix}{name} breaker", client.breaker))
        if client.bulkhead is not None:
            out.append((f"{prefix}{name} bulkhead", client.bulkhead))
    return out


def client_policies(
    prefix: str, clients: Mapping[str, ServiceClient], log: PolicyLog, *, kind: str = "client", **labels: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The breaker rows and the rejection rows of ``clients`` (watched with :func:`client_watches` and the same
    ``prefix``), each row carrying ``labels`` (where the clients live: ``service``, ``instance``, ``route``).

    A breaker row is :func:`breaker_json` with ``name`` (the client's name), ``kind``, ``client`` and
    ``downstream`` (the service it calls). A rejection row is one per bulkhead: ``kind`` ``bulkhead_full``,
    ``count`` (calls refused since the client was made), ``last`` (when the last one was), ``in_flight``,
    ``waiting`` and ``limit``."""
    breakers: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    for name, client in sorted(clients.items()):
        where = {**labels, "client": name, "downstream": client.service}
        if client.breaker is not None:
            key = f"{prefix}{name} breaker"
            breakers.append(breaker_json(key, client.breaker, log, name=name, kind=kind, **where))
        if client.bulkhead is not None:
            m = client.bulkhead.metrics()
            rejections.append(
                {
                    **where,
                    "policy": client.bulkhead.name,
                    "kind": "bulkhead_full",
                    "count": m.rejected,
                    "last": log.last_rejected(f"{prefix}{name} bulkhead", "bulkhead_full"),
                    "in_flight": m.in_flight,
                    "waiting": m.waiting,
                    "limit": m.max_concurrent,
                }
            )
    return breakers, rejections
