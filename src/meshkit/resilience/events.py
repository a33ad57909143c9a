"""Observability hooks: what the policies report, without importing any telemetry library.

Every policy owns an :class:`Events` hub. Listeners are plain callables taking one event; tracing and metrics
layers (and tests) subscribe to it. A listener that raises is logged and otherwise ignored: observing a call must
never change its outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from threading import Lock

__all__ = [
    "BreakerState",
    "BreakerTransition",
    "CallRejected",
    "Event",
    "Events",
    "FallbackUsed",
    "Listener",
    "RetryAttempt",
    "RetryGaveUp",
    "TimedOut",
]

log = logging.getLogger("meshkit.resilience")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class RetryAttempt:
    """A call failed and will be tried again after ``delay`` seconds."""

    policy: str
    attempt: int
    delay: float
    error: BaseException | None
    result: object = None


@dataclass(frozen=True, slots=True)
class RetryGaveUp:
    """The last attempt failed and no retry is left (``reason`` says why)."""

    policy: str
    attempts: int
    reason: str
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """A circuit breaker changed state at clock time ``at``."""

    policy: str
    from_state: BreakerState
    to_state: BreakerState
    at: float
    failure_rate: float
    slow_call_rate: float


@dataclass(frozen=True, slots=True)
class CallRejected:
    """A call was refused before it started (``kind``: circuit_open, bulkhead_full, rate_limited)."""

    policy: str
    kind: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class TimedOut:
    policy: str
    timeout: float


@dataclass(frozen=True, slots=True)
class FallbackUsed:
    policy: str
    error: BaseException


Event = RetryAttempt | RetryGaveUp | BreakerTransition | CallRejected | TimedOut | FallbackUsed
Listener = Callable[[Event], None]


class Events:
    """A small, thread-safe listener registry."""

    __slots__ = ("_listeners", "_lock")

    def __init__(self, listeners: Iterable[Listener] = ()) -> None:
        self._listeners: tuple[Listener, ...] = tuple(listeners)
        self._lock = Lock()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add ``listener``; returns a function that removes it again."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)

        return unsubscribe

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def emit(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("resilience event listener failed", extra={"event": type(event).__name__})
