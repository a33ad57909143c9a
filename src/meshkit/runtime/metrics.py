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
circuit breakers (the one for the whole downstream service and one per instance of it) with their recent
transitions, and the calls its bulkhead refused. The gateway's rows (built by the runner) come from the same
functions, so a breaker looks the same wherever it lives.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from meshkit._core.clock import Clock
from meshkit._core.metrics import MetricSet
from meshkit.client import ServiceClient
from meshkit.discovery import Instance
from meshkit.resilience import BreakerState, BreakerTransition, CallRejected, CircuitBreaker, Event, Events

__all__ = [
    "BreakerGroup",
    "PolicyLog",
    "ServiceMetrics",
    "Watchable",
    "breaker_json",
    "client_policies",
    "client_watches",
    "instance_key",
]

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


@runtime_checkable
class BreakerGroup(Protocol):
    """Breakers that come and go: a :class:`~meshkit.client.ServiceClient`'s, one per instance of its downstream
    (:meth:`~meshkit.client.ServiceClient.instance_breakers`: by instance id, with the instance)."""

    def instance_breakers(self) -> Mapping[str, tuple[Instance, CircuitBreaker]]: ...

    def on_instance_breaker(self, told: Callable[[], None]) -> Callable[[], None]: ...


def instance_key(key: str, instance_id: str) -> str:
    """The key in a :class:`PolicyLog` of the breaker of instance ``instance_id`` of a group watched under ``key``."""
    return f"{key} @{instance_id}"


class _Group:
    """A :class:`BreakerGroup` a log follows, and the breakers of it the log listens to (by instance id)."""

    __slots__ = ("key", "source", "watched")

    def __init__(self, key: str, source: BreakerGroup) -> None:
        self.key = key
        self.source = source
        self.watched: dict[str, tuple[CircuitBreaker, Callable[[], None]]] = {}


class PolicyLog:
    """What resilience policies reported: each breaker's last ``history`` state changes, and per kind of rejection
    (``circuit_open``, ``bulkhead_full``, ``rate_limited``) how many calls a policy refused and when it last did.

    :meth:`watch` listens to one policy's events under a ``key`` (unique in this log: two clients' breakers may
    share a name) until the function it returns is called. Times are Unix seconds: a transition's clock time is
    converted with the policy's clock when the event arrives. Listeners may run on any thread (a sync pipeline's),
    so the log takes a lock; it is bounded by the number of keys watched (see :meth:`retain`).

    A :class:`BreakerGroup` (a client's per-instance breakers) is watched as one: each of its breakers under
    :func:`instance_key` of ``key``. The log listens to the breakers the group has when it is watched, to each new
    one as the client makes it (before its first call), and forgets those of instances that left or moved, as the
    group tells it (``on_instance_breaker``).
    """

    def __init__(self, history: int = 20) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, not {history}")
        self.history = history
        self._lock = threading.Lock()
        self._transitions: dict[str, deque[dict[str, Any]]] = {}
        self._rejected: dict[str, dict[str, tuple[int, float]]] = {}  # key -> kind -> (count, last time)
        self._follow_lock = threading.Lock()  # the groups and what is watched of them
        self._groups: dict[int, _Group] = {}

    def watch(self, key: str, policy: Watchable | BreakerGroup) -> Callable[[], None]:
        """Record ``policy``'s transitions and rejections under ``key`` (a group's: each breaker's under
        :func:`instance_key`); returns the function that stops it."""
        if isinstance(policy, BreakerGroup):
            return self._follow(key, policy)
        clock = policy.clock

        def listen(event: Event) -> None:
            if isinstance(event, BreakerTransition):
                at = clock.wall() - max(clock.now() - event.at, 0.0)
                self._transition(key, event, at)
            elif isinstance(event, CallRejected):
                self._rejection(key, event.kind, clock.wall())

        return policy.events.subscribe(listen)

    def _follow(self, key: str, source: BreakerGroup) -> Callable[[], None]:
        group = _Group(key, source)
        with self._follow_lock:
            self._groups[id(group)] = group
            self._sync(group)

        def changed() -> None:  # a breaker made (listened to before its first call) or dropped
            with self._follow_lock:
                if id(group) in self._groups:
                    self._sync(group)

        stop_told = source.on_instance_breaker(changed)

        def stop() -> None:
            stop_told()
            with self._follow_lock:
                self._groups.pop(id(group), None)
                watched, group.watched = group.watched, {}
                for _, unsubscribe in watched.values():
                    unsubscribe()

        return stop

    def _sync(self, group: _Group) -> None:  # (under the follow lock)
        current = group.source.instance_breakers()
        for iid in list(group.watched):
            now = current.get(iid)
            breaker, unsubscribe = group.watched[iid]
            if now is None or now[1] is not breaker:  # gone, or moved to another address (a new breaker)
                del group.watched[iid]
                unsubscribe()
                self._forget(instance_key(group.key, iid))
        for iid, (_, breaker) in current.items():
            if iid not in group.watched:
                group.watched[iid] = (breaker, self.watch(instance_key(group.key, iid), breaker))

    def _forget(self, key: str) -> None:
        with self._lock:
            self._transitions.pop(key, None)
            self._rejected.pop(key, None)

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
        """Forget what was recorded under any other key (policies that are gone), but for the breakers of the
        groups still watched."""
        with self._follow_lock:
            kept = {instance_key(g.key, iid) for g in self._groups.values() for iid in g.watched}
        with self._lock:
            for table in (self._transitions, self._rejected):
                for key in [k for k in table if k not in keys and k not in kept]:
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


def client_watches(prefix: str, clients: Mapping[str, ServiceClient]) -> list[tuple[str, Watchable | BreakerGroup]]:
    """The policies of ``clients`` (by the name each is known under) to watch, with their keys in a log: each
    client's breaker and bulkhead, and the client itself as the :class:`BreakerGroup` of its instance breakers."""
    out: list[tuple[str, Watchable | BreakerGroup]] = []
    for name, client in clients.items():
        if client.breaker is not None:
            out.append((f"{prefix}{name} breaker", client.breaker))
        if client.options.breaker is not None:
            out.append((_instances_key(prefix, name), client))
        if client.bulkhead is not None:
            out.append((f"{prefix}{name} bulkhead", client.bulkhead))
    return out


def _instances_key(prefix: str, name: str) -> str:
    return f"{prefix}{name} instance breakers"


def client_policies(
    prefix: str, clients: Mapping[str, ServiceClient], log: PolicyLog, *, kind: str = "client", **labels: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The breaker rows and the rejection rows of ``clients`` (watched with :func:`client_watches` and the same
    ``prefix``), each row carrying ``labels`` (where the clients live: ``service``, ``instance``, ``route``).

    A breaker row is :func:`breaker_json` with ``name`` (the client's name), ``kind``, ``client`` and
    ``downstream`` (the service it calls). Each client's row is followed by one per instance of the downstream
    that the client keeps a breaker for (by instance id), ``kind`` ``"<kind> instance"``, with
    ``downstream_instance`` (the instance's id) and ``downstream_address`` (``host:port``); ``instance`` stays
    where the client lives. A rejection row is one per bulkhead: ``kind`` ``bulkhead_full``, ``count`` (calls
    refused since the client was made), ``last`` (when the last one was), ``in_flight``, ``waiting`` and
    ``limit``."""
    breakers: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    for name, client in sorted(clients.items()):
        where = {**labels, "client": name, "downstream": client.service}
        if client.breaker is not None:
            key = f"{prefix}{name} breaker"
            breakers.append(breaker_json(key, client.breaker, log, name=name, kind=kind, **where))
        group = _instances_key(prefix, name)
        for iid, (instance, breaker) in sorted(client.instance_breakers().items()):
            breakers.append(
                breaker_json(
                    instance_key(group, iid),
                    breaker,
                    log,
                    name=name,
                    kind=f"{kind} instance",
                    **where,
                    downstream_instance=iid,
                    downstream_address=instance.address,
                )
            )
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
