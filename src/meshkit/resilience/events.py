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
from typing import Generic, ParamSpec

__all__ = [
    "BreakerState",
    "BreakerTransition",
    "CallRejected",
    "Event",
    "Events",
    "FallbackUsed",
    "Listener",
    "Listeners",
    "RetryAttempt",
    "RetryGaveUp",
    "TimedOut",
]

log = logging.getLogger("meshkit.resilience")

P = ParamSpec("P")


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


class Listeners(Generic[P]):
    """A small, thread-safe list of listeners: :meth:`emit` calls each with its arguments. A listener that raises
    is logged (as ``what``) and the others are still called."""

    __slots__ = ("_listeners", "_lock", "_log", "_what")

    def __init__(
        self,
        listeners: Iterable[Callable[P, None]] = (),
        *,
        what: str = "a listener",
        logger: logging.Logger | None = None,
    ) -> None:
        self._listeners: tuple[Callable[P, None], ...] = tuple(listeners)
        self._lock = Lock()
        self._what = what
        self._log = logger or log

    def subscribe(self, listener: Callable[P, None]) -> Callable[[], None]:
        """Add ``listener``; returns a function that removes this subscription (the listener stays subscribed
        as often as it was subscribed otherwise). Calling it again does nothing."""
        with self._lock:
            self._listeners = (*self._listeners, listener)
        done = False

        def unsubscribe() -> None:
            nonlocal done
            with self._lock:
                if done:
                    return
                done = True
                listeners = self._listeners
                for at, x in enumerate(listeners):
                    if x is listener:
                        self._listeners = listeners[:at] + listeners[at + 1 :]
                        return

        return unsubscribe

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def emit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        for listener in self._listeners:
            try:
                listener(*args, **kwargs)
            except Exception:
                self._log.exception("%s failed", self._what, extra={"event": type(args[0]).__name__} if args else None)


class Events(Listeners[[Event]]):
    """The listeners of a policy's events."""

    __slots__ = ()

    def __init__(self, listeners: Iterable[Listener] = ()) -> None:
        super().__init__(listeners, what="resilience event listener")
