"""Retry with backoff and jitter: the seed's ``call_with_retry``, as an immutable, composable policy."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshkit._core.clock import Clock, MonotonicClock
from meshkit.errors import Rejected, Unavailable
from meshkit.resilience._engine import CALL, ErrorFilter, Invocation, Layer, Plan, Sleep, matches
from meshkit.resilience.backoff import Backoff, Exponential
from meshkit.resilience.events import Events, Listener, RetryAttempt, RetryGaveUp

__all__ = ["TRANSIENT_ERRORS", "Retry", "retry_after_hint"]

#: What :class:`Retry` retries by default: failures that another try may not meet (network errors, timeouts, an
#: unavailable downstream, load shed by a bulkhead or rate limit). Programming errors (``TypeError``, ``KeyError``,
#: ...) are never retried unless asked for.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, Unavailable, Rejected)


def retry_after_hint(error: BaseException | None, result: object) -> float | None:
    """The default hint reader: the ``retry_after`` attribute of the error (meshkit errors carry one)."""
    hint = getattr(error, "retry_after", None)
    return float(hint) if isinstance(hint, int | float) else None


def _not_sent(error: BaseException) -> bool:
    """True when the error proves the operation never started, so retrying cannot run it twice."""
    return getattr(error, "request_sent", True) is False or isinstance(error, ConnectionRefusedError)


@dataclass(frozen=True, slots=True, repr=False)
class Retry(Layer):
    """Call again after a failure, waiting longer each time.

    - ``attempts``: the most calls in all (``None``: no limit but ``max_delay``).
    - ``backoff``: the wait schedule (default ``Exponential(0.1, cap=30, jitter="full")``).
    - ``max_delay``: the most seconds spent waiting in all; a retry whose wait would pass it is not made.
    - ``on``: which errors to retry: types, or a predicate (default :data:`TRANSIENT_ERRORS`).
    - ``on_result``: a predicate that marks a *result* as worth retrying (e.g. an HTTP 503 response); when the
      tries run out the last result is returned.
    - ``retry_after``: reads a server's hint (seconds) from the error or result; the wait is at least the hint.
    - ``retry_non_idempotent``: operations marked ``idempotent=False`` are retried only for errors that prove
      nothing was sent (``CircuitOpen``, ``BulkheadFull``, ``ConnectionRefusedError``...) unless this is True.
    """

    attempts: int | None = 3
    backoff: Backoff = field(default_factory=Exponential)
    max_delay: float | None = None
    on: ErrorFilter = TRANSIENT_ERRORS
    on_result: Callable[[Any], bool] | None = None
    retry_after: Callable[[BaseException | None, object], float | None] = retry_after_hint
    retry_non_idempotent: bool = False
    name: str = "retry"
    clock: Clock = field(default_factory=MonotonicClock, repr=False, compare=False)
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)
    listeners: Sequence[Listener] = field(default=(), repr=False, compare=False)
    events: Events = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts is None and self.max_delay is None:
            raise ValueError("Retry needs attempts or max_delay (or both), or it could retry forever")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be >= 1; got {self.attempts}")
        if self.max_delay is not None and not self.max_delay >= 0:
            raise ValueError(f"max_delay must be >= 0; got {self.max_delay}")
        object.__setattr__(self, "events", Events(self.listeners))

    def plan(self, invocation: Invocation) -> Plan:
        attempt = 1
        slept = 0.0
        previous = 0.0
        while True:
            error: Exception | None = None
            result: Any = None
            try:
                result = yield CALL
            except Exception as exc:
                if not matches(self.on, exc):
                    raise
                if not (invocation.idempotent or self.retry_non_idempotent or _not_sent(exc)):
                    self._gave_up(attempt, "operation is not idempotent", exc)
                    raise
                error = exc
            else:
                if self.on_result is None or not self.on_result(result):
                    return result

            if self.attempts is not None and attempt >= self.attempts:
                self._gave_up(attempt, f"{self.attempts} attempts made", error)
                if error is not None:
                    raise error
                return result
            delay = self.backoff.delay(attempt, previous, self.rng)
            hint = self.retry_after(error, result)
            if hint is not None and hint > delay:
                delay = hint
            if self.max_delay is not None and slept + delay > self.max_delay:
                self._gave_up(attempt, f"next wait would pass max_delay={self.max_delay:g}s", error)
                if error is not None:
                    raise error
                return result
            if self.events:
                self.events.emit(RetryAttempt(self.name, attempt, delay, error, result))
            if delay > 0:
                yield Sleep(delay, self.clock)
            slept += delay
            previous = delay
            attempt += 1

    def _gave_up(self, attempts: int, reason: str, error: BaseException | None) -> None:
        if self.events:
            self.events.emit(RetryGaveUp(self.name, attempts, reason, error))
