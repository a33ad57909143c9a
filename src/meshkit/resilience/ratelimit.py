"""Rate limiting: a token bucket.

``RateLimiter(rate=100, burst=20)`` lets 100 calls a second through on average, and up to 20 at once after a quiet
spell. A caller that finds the bucket empty waits for its token if that takes at most ``max_wait`` seconds, else
gets :class:`~meshkit.errors.RateLimited` with ``retry_after`` set to when a token will be there.

The bucket itself (:class:`TokenBucket`) is sans-I/O and usable on its own (the gateway keeps one per consumer).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshkit._core.clock import Clock, MonotonicClock
from meshkit.errors import RateLimited
from meshkit.resilience._engine import CALL, Invocation, Layer, Plan, Sleep
from meshkit.resilience.events import CallRejected, Events, Listener

__all__ = ["RateLimiter", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` stored. Thread-safe. Time comes from the caller."""

    __slots__ = ("_lock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"rate must be > 0 and burst >= 1; got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now
        self._lock = threading.Lock()

    def reserve(self, now: float, *, max_wait: float = 0.0, tokens: float = 1.0) -> float:
        """Take ``tokens``; returns how long to wait before using them (0: now).

        If the wait would be longer than ``max_wait`` nothing is taken and the (positive) wait is returned as a
        negative number, so ``reserve(...) < 0`` means "refused; retry after ``-result`` seconds".
        """
        with self._lock:
            if now > self._stamp:
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
            missing = tokens - self._tokens
            wait = missing / self.rate if missing > 0 else 0.0
            if wait > max_wait:
                return -wait
            self._tokens -= tokens
            return wait

    def available(self, now: float) -> float:
        with self._lock:
            elapsed = max(now - self._stamp, 0.0)
            return min(self.burst, self._tokens + elapsed * self.rate)


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class RateLimiter(Layer):
    """Admit calls at ``rate`` per second with bursts of ``burst`` (see the module docstring)."""

    rate: float
    burst: int = 1
    max_wait: float = 0.0
    name: str = "ratelimit"
    clock: Clock = field(default_factory=MonotonicClock, repr=False)
    listeners: Sequence[Listener] = field(default=(), repr=False)
    events: Events = field(init=False, repr=False)
    bucket: TokenBucket = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0; got {self.max_wait}")
        object.__setattr__(self, "events", Events(self.listeners))
        object.__setattr__(self, "bucket", TokenBucket(self.rate, self.burst, now=self.clock.now()))

    def plan(self, invocation: Invocation) -> Plan:
        wait = self.bucket.reserve(self.clock.now(), max_wait=self.max_wait)
        if wait < 0:
            self.events.emit(CallRejected(self.name, "rate_limited", -wait))
            raise RateLimited(self.name, retry_after=-wait)
        if wait > 0:
            yield Sleep(wait, self.clock)
        return (yield CALL)
