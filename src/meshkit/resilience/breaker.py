"""The circuit breaker: closed, open, half-open (the seed's state diagram), with Resilience4j's knobs.

::

    CLOSED --(failure or slow-call rate >= threshold over >= minimum_calls in the window)--> OPEN
    OPEN --(wait_in_open elapsed; checked on the next call or state read)--> HALF_OPEN
    HALF_OPEN --(half_open_calls probes done, rates below thresholds)--> CLOSED
    HALF_OPEN --(half_open_calls probes done, a rate at or above its threshold)--> OPEN

While OPEN, and in HALF_OPEN once every probe slot is taken, calls fail fast with :class:`~meshkit.errors.CircuitOpen`
and the wrapped function is not called.

Windows: ``window="count"`` keeps the outcomes of the last ``window_size`` calls; ``window="time"`` keeps the calls
of the last ``window_size`` seconds in one-second buckets (a call at clock time ``t`` lives in bucket ``floor(t)``;
the window is the buckets ``floor(now) - window_size + 1 .. floor(now)``).

A call admitted in one state and finished after the breaker moved on is not counted (each state has a
generation), so a slow call from before a trip can never close or re-open the circuit.

The steady state costs no lock: while the circuit is CLOSED with a full count window and calls are not timed, a
success cannot change the verdict (it replaces the oldest outcome: the number of calls stays, the failed count can
only fall), so it is only counted, by one ``next()`` on an ``itertools.count`` (atomic under the GIL). Whatever
next looks at or changes the window under the lock first adds those successes to it, in order, so every figure
and transition is the one recording them one by one would give.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meshkit._core.clock import Clock, MonotonicClock
from meshkit.errors import CircuitOpen, Rejected
from meshkit.resilience._engine import CALL, ErrorFilter, Invocation, Layer, Plan, matches
from meshkit.resilience.events import BreakerState, BreakerTransition, CallRejected, Event, Events, Listener

__all__ = ["BreakerMetrics", "BreakerState", "CircuitBreaker"]

_CLOSED, _OPEN, _HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN  # hot-path lookups


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """A snapshot. In CLOSED the counts are the window's; in OPEN, those that tripped it; in HALF_OPEN, the
    probes' so far. ``not_permitted_calls`` counts every call refused since the breaker was made."""

    state: BreakerState
    failure_rate: float
    slow_call_rate: float
    calls: int
    failed_calls: int
    slow_calls: int
    not_permitted_calls: int


class _CountWindow:
    __slots__ = ("_failed", "_head", "_n", "_ring", "_size", "_slow")

    def __init__(self, size: int) -> None:
        self._size = size
        self.reset()

    def reset(self) -> None:
        self._ring = [0] * self._size
        self._head = self._n = self._failed = self._slow = 0

    def record(self, now: float, failed: bool, slow: bool) -> tuple[int, int, int]:
        """Add one outcome; returns the window's (calls, failed, slow)."""
        head = self._head
        if self._n == self._size:
            old = self._ring[head]
            if old:
                self._failed -= old & 1
                self._slow -= old >> 1
        else:
            self._n += 1
        code = failed | slow << 1
        self._ring[head] = code
        if code:
            self._failed += failed
            self._slow += slow
        self._head = head + 1 if head + 1 < self._size else 0
        return self._n, self._failed, self._slow

    def add_successes(self, count: int) -> None:
        """Add ``count`` successes that were not slow (the lock-free path's, see the module). Past ``size`` of
        them the window holds only successes, so at most ``size`` are recorded."""
        for _ in range(min(count, self._size)):
            self.record(0.0, False, False)  # a count window ignores the time

    def totals(self, now: float) -> tuple[int, int, int]:
        return self._n, self._failed, self._slow


class _TimeWindow:
    __slots__ = ("_buckets", "_calls", "_failed", "_latest", "_size", "_slow")

    def __init__(self, size: int) -> None:
        self._size = size
        self.reset()

    def reset(self) -> None:
        # bucket = [epoch second, calls, failed, slow]; slot = epoch % size
        self._buckets = [[-math.inf, 0, 0, 0] for _ in range(self._size)]
        self._calls = self._failed = self._slow = 0
        self._latest = -math.inf

    def _evict(self, second: float) -> None:
        if second <= self._latest:
            return
        self._latest = second
        for bucket in self._buckets:
            if bucket[0] <= second - self._size and bucket[1]:
                self._calls -= int(bucket[1])
                self._failed -= int(bucket[2])
                self._slow -= int(bucket[3])
                bucket[1] = bucket[2] = bucket[3] = 0

    def record(self, now: float, failed: bool, slow: bool) -> tuple[int, int, int]:
        """Add one outcome; returns the window's (calls, failed, slow)."""
        second = math.floor(now)
        self._evict(second)
        bucket = self._buckets[second % self._size]
        if bucket[0] != second:
            bucket[0] = second
            bucket[1] = bucket[2] = bucket[3] = 0
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self._calls += 1
        self._failed += failed
        self._slow += slow
        return self._calls, self._failed, self._slow

    def totals(self, now: float) -> tuple[int, int, int]:
        self._evict(math.floor(now))
        return self._calls, self._failed, self._slow


def _rate(part: int, whole: int) -> float:
    return part * 100.0 / whole if whole else 0.0


class _BreakerCore:
    """The state machine. Every method takes the lock, but for :meth:`record`'s lock-free success path.

    Events are queued under the lock, in the order the state changed, and emitted after it is released by
    whichever thread gets the emission lock first, oldest first: listeners never see ``OPEN -> HALF_OPEN``
    before the ``CLOSED -> OPEN`` that preceded it, and a slow listener never holds the state lock.
    """

    def __init__(self, policy: CircuitBreaker) -> None:
        self.p = policy
        self.lock = threading.Lock()
        self.outbox: deque[Event] = deque()
        self.emit_lock = threading.RLock()  # re-entrant: a listener may call through the breaker
        self.state = BreakerState.CLOSED
        self.generation = 0
        self.opened_at = 0.0
        self.window: _CountWindow | _TimeWindow = (
            _CountWindow(policy.window_size) if policy.window == "count" else _TimeWindow(policy.window_size)
        )
        self.min_calls = (
            min(policy.minimum_calls, policy.window_size) if policy.window == "count" else policy.minimum_calls
        )
        self.tripped = (0, 0, 0)  # the window totals that opened the circuit
        self.probes_admitted = self.probes_done = self.probes_failed = self.probes_slow = 0
        self.not_permitted = 0
        self.timed = policy.slow_call_duration is not None
        self.time_window = policy.window == "time"
        # The lock-free success path (see the module docstring): ``successes`` is counted by calls of
        # ``generation`` while the count window ``counts`` is full, the circuit CLOSED and calls untimed; None
        # otherwise. ``folded``: what ``next(successes)`` gave when they were last added to the window, plus one.
        self.counts = self.window if isinstance(self.window, _CountWindow) and not self.timed else None
        self.successes: Iterator[int] | None = None
        self.folded = 0

    def _flush(self) -> None:
        with self.emit_lock:
            while self.outbox:
                try:
                    event = self.outbox.popleft()
                except IndexError:  # another thread emitted it between the check and the pop
                    return
                self.p.events.emit(event)

    # -- transitions (lock held) ------------------------------------------------------------------------------
    def _fold(self) -> None:
        """Add the successes counted without the lock to the window (before anything reads or changes it)."""
        successes, counts = self.successes, self.counts
        if successes is not None and counts is not None:
            taken = next(successes)
            if taken > self.folded:
                counts.add_successes(taken - self.folded)
            self.folded = taken + 1

    def _stop_counting(self) -> None:
        """End the lock-free path (before the generation changes: a call that still finds the old counter adds
        to a counter nobody reads, as a call of a past generation should)."""
        self.successes = None

    def _move(self, to: BreakerState, now: float, totals: tuple[int, int, int]) -> BreakerTransition:
        event = BreakerTransition(
            self.p.name, self.state, to, now, _rate(totals[1], totals[0]), _rate(totals[2], totals[0])
        )
        self.outbox.append(event)
        self._stop_counting()  # (leaving CLOSED: record has added the lock-free successes to the window already)
        self.state = to
        self.generation += 1
        if to is BreakerState.OPEN:
            self.opened_at = now
            self.tripped = totals
        elif to is BreakerState.HALF_OPEN:
            self.probes_admitted = self.probes_done = self.probes_failed = self.probes_slow = 0
        else:
            self.window.reset()
        return event

    def _refresh(self, now: float) -> BreakerTransition | None:
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.p.wait_in_open:
            return self._move(BreakerState.HALF_OPEN, now, self.tripped)
        return None

    def _too_bad(self, calls: int, failed: int, slow: int, minimum: int) -> bool:
        # multiplied out (not divided) so integer counts compare exactly against the percentage thresholds
        p = self.p
        return calls >= max(minimum, 1) and (
            failed * 100.0 >= p.failure_rate_threshold * calls or slow * 100.0 >= p.slow_call_rate_threshold * calls
        )

    # -- called by the plan ---------------------------------------------------------------------------------
    def acquire(self, clock: Clock) -> int:
        if self.state is _CLOSED:  # the fast path: no clock read, no lock
            return self.generation
        now = clock.now()
        with self.lock:
            event = self._refresh(now)
            generation = self.generation
            admitted = self.state is BreakerState.CLOSED
            if self.state is BreakerState.HALF_OPEN and self.probes_admitted < self.p.half_open_calls:
                self.probes_admitted += 1
                admitted = True
            retry_after: float | None = None
            if not admitted:
                self.not_permitted += 1
                if self.state is BreakerState.OPEN:
                    retry_after = max(self.opened_at + self.p.wait_in_open - now, 0.0)
                self.outbox.append(CallRejected(self.p.name, "circuit_open", retry_after))
        if event is not None or not admitted:
            self._flush()
        if admitted:
            return generation
        raise CircuitOpen(self.p.name, retry_after=retry_after)

    def record(self, generation: int, clock: Clock, failed: bool, started: float) -> None:
        """Count one finished call admitted in ``generation`` (which started at ``started`` if calls are timed)."""
        successes = self.successes  # read BEFORE the generation: the order is what makes this safe (_stop_counting)
        if successes is not None and not failed and generation == self.generation:
            next(successes)  # the steady state, without the lock: see the module docstring
            return
        p = self.p
        now = clock.now() if self.timed or self.time_window else 0.0
        slow = self.timed and now - started > p.slow_call_duration  # type: ignore[operator]
        event = None
        with self.lock:
            if generation != self.generation:
                return
            if self.state is _CLOSED:
                self._fold()
                totals = self.window.record(now, failed, slow)
                if totals[0] >= self.min_calls and self._too_bad(*totals, self.min_calls):
                    event = self._move(BreakerState.OPEN, clock.now(), totals)
                elif self.successes is None and self.counts is not None and totals[0] == p.window_size:
                    self.successes = itertools.count()  # the window is full: successes may skip the lock now
                    self.folded = 0
            elif self.state is BreakerState.HALF_OPEN:
                self.probes_done += 1
                self.probes_failed += failed
                self.probes_slow += slow
                if self.probes_done >= p.half_open_calls:
                    totals = (self.probes_done, self.probes_failed, self.probes_slow)
                    bad = self._too_bad(*totals, 1)
                    event = self._move(BreakerState.OPEN if bad else BreakerState.CLOSED, clock.now(), totals)
        if event is not None:
            self._flush()

    def abandon(self, generation: int) -> None:
        """A call ended without an outcome to count (cancelled, or an ignored error): free its probe slot."""
        with self.lock:
            if generation == self.generation and self.state is BreakerState.HALF_OPEN:
                self.probes_admitted -= 1

    def read(self, now: float) -> BreakerMetrics:
        with self.lock:
            event = self._refresh(now)
            if self.state is BreakerState.CLOSED:
                self._fold()
                calls, failed, slow = self.window.totals(now)
            elif self.state is BreakerState.OPEN:
                calls, failed, slow = self.tripped
            else:
                calls, failed, slow = self.probes_done, self.probes_failed, self.probes_slow
            metrics = BreakerMetrics(
                self.state, _rate(failed, calls), _rate(slow, calls), calls, failed, slow, self.not_permitted
            )
        if event is not None:
            self._flush()
        return metrics

    def reset(self, now: float) -> None:
        with self.lock:
            event = self._move(BreakerState.CLOSED, now, (0, 0, 0)) if self.state is not BreakerState.CLOSED else None
            self._stop_counting()
            self.window.reset()
        if event is not None:
            self._flush()


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class CircuitBreaker(Layer):
    """Fail fast while a downstream is failing; probe it again after a while.

    The configuration is immutable; the state (window, counts) belongs to this instance, so one breaker shared by
    several pipelines guards one downstream. ``dataclasses.replace`` gives a new breaker with fresh state.

    - ``failure_rate_threshold`` / ``slow_call_rate_threshold``: percentages (0-100] that open the circuit.
    - ``slow_call_duration``: seconds after which a call counts as slow (``None``: calls are not timed).
    - ``window`` / ``window_size``: ``"count"`` (last N calls) or ``"time"`` (last N seconds).
    - ``minimum_calls``: no verdict before this many calls are in the window.
    - ``wait_in_open``: seconds in OPEN before probing; ``half_open_calls``: probes allowed in HALF_OPEN.
    - ``failure_on``: which errors count as failures (others count as successes); ``ignore``: errors that count
      as neither (by default the ``Rejected`` family: a full bulkhead inside the breaker is not the downstream's
      fault); ``failure_result``: a predicate marking results as failures (e.g. HTTP 5xx).
    """

    name: str = "breaker"
    failure_rate_threshold: float = 50.0
    slow_call_rate_threshold: float = 100.0
    slow_call_duration: float | None = None
    window: Literal["count", "time"] = "count"
    window_size: int = 20
    minimum_calls: int = 10
    wait_in_open: float = 30.0
    half_open_calls: int = 3
    failure_on: ErrorFilter = Exception
    ignore: tuple[type[BaseException], ...] = (Rejected,)
    failure_result: Callable[[Any], bool] | None = None
    clock: Clock = field(default_factory=MonotonicClock, repr=False)
    listeners: Sequence[Listener] = field(default=(), repr=False)
    events: Events = field(init=False, repr=False)
    _core: _BreakerCore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window not in ("count", "time"):
            raise ValueError(f"window must be 'count' or 'time'; got {self.window!r}")
        if self.window_size < 1 or self.minimum_calls < 1 or self.half_open_calls < 1:
            raise ValueError("window_size, minimum_calls and half_open_calls must be >= 1")
        for knob in ("failure_rate_threshold", "slow_call_rate_threshold"):
            value = getattr(self, knob)
            if not 0 < value <= 100:
                raise ValueError(f"{knob} is a percentage in (0, 100]; got {value}")
        if not self.wait_in_open >= 0:
            raise ValueError(f"wait_in_open must be >= 0; got {self.wait_in_open}")
        object.__setattr__(self, "events", Events(self.listeners))
        object.__setattr__(self, "_core", _BreakerCore(self))

    @property
    def state(self) -> BreakerState:
        """The current state (reading it moves OPEN to HALF_OPEN once the wait is over)."""
        return self._core.read(self.clock.now()).state

    def metrics(self) -> BreakerMetrics:
        return self._core.read(self.clock.now())

    def reset(self) -> None:
        """Close the circuit and forget the window (an operator's override)."""
        self._core.reset(self.clock.now())

    # -- the same breaker without a pipeline (a proxy's callback-driven fast path) ------------------------------

    def try_acquire(self) -> int:
        """Ask to make one call: a ticket for :meth:`on_result` / :meth:`release`, or
        :class:`~meshkit.errors.CircuitOpen` when the circuit refuses it. Every ticket must be given back once."""
        return self._core.acquire(self.clock)

    def on_result(self, ticket: int, *, failed: bool, started: float = 0.0) -> None:
        """Count the call of ``ticket``: ``failed`` or not; ``started`` (clock time) when calls are timed."""
        self._core.record(ticket, self.clock, failed, started)

    def release(self, ticket: int) -> None:
        """The call of ``ticket`` ended with nothing to count (it was never made, or cancelled)."""
        self._core.abandon(ticket)

    def plan(self, invocation: Invocation) -> Plan:
        core = self._core
        clock = self.clock
        generation = core.acquire(clock)
        started = clock.now() if core.timed else 0.0
        try:
            result = yield CALL
        except Exception as exc:
            if isinstance(exc, self.ignore):
                core.abandon(generation)
            else:
                core.record(generation, clock, matches(self.failure_on, exc), started)
            raise
        except BaseException:
            core.abandon(generation)
            raise
        core.record(generation, clock, self.failure_result is not None and bool(self.failure_result(result)), started)
        return result
