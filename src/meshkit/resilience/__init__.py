"""Resilience policies: retry with backoff and jitter, circuit breaker, bulkheads, timeout, rate limit, fallback.

Policies are immutable values composed with ``|`` into a pipeline; the leftmost is the outermost::

    pipeline = Fallback(value=None) | Retry(attempts=3) | CircuitBreaker() | Timeout(2.0) | Bulkhead(10)
    result = await pipeline.acall(fetch, order_id)      # or pipeline.call(blocking_fetch, order_id)

The order above is the one we recommend: the fallback sees the final outcome; each retry passes through the
breaker (so an open circuit stops retries early) and gets its own timeout; the bulkhead bounds concurrency
innermost, so waiting for a slot does not eat into the breaker's slow-call timing. ``Timeout`` outside ``Retry``
instead bounds the whole operation, retries included. Every policy runs sync and async from one decision core
(``meshkit.resilience._engine``) and takes its time from an injectable :class:`~meshkit._core.clock.Clock`.
"""

from meshkit.resilience._engine import Bound, Invocation, Pipeline, Policy
from meshkit.resilience.backoff import Backoff, Constant, Exponential, Jitter, Linear
from meshkit.resilience.breaker import BreakerMetrics, BreakerState, CircuitBreaker
from meshkit.resilience.bulkhead import Bulkhead, BulkheadMetrics, ThreadPoolBulkhead
from meshkit.resilience.events import (
    BreakerTransition,
    CallRejected,
    Event,
    Events,
    FallbackUsed,
    Listener,
    Listeners,
    RetryAttempt,
    RetryGaveUp,
    TimedOut,
)
from meshkit.resilience.fallback import Fallback
from meshkit.resilience.ratelimit import RateLimiter, TokenBucket
from meshkit.resilience.retry import TRANSIENT_ERRORS, Retry
from meshkit.resilience.timeout import Timeout

__all__ = [
    "TRANSIENT_ERRORS",
    "Backoff",
    "Bound",
    "BreakerMetrics",
    "BreakerState",
    "BreakerTransition",
    "Bulkhead",
    "BulkheadMetrics",
    "CallRejected",
    "CircuitBreaker",
    "Constant",
    "Event",
    "Events",
    "Exponential",
    "Fallback",
    "FallbackUsed",
    "Invocation",
    "Jitter",
    "Linear",
    "Listener",
    "Listeners",
    "Pipeline",
    "Policy",
    "RateLimiter",
    "Retry",
    "RetryAttempt",
    "RetryGaveUp",
    "ThreadPoolBulkhead",
    "TimedOut",
    "Timeout",
    "TokenBucket",
]
