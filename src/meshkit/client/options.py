"""The settings of a :class:`~meshkit.client.ServiceClient`, as one immutable value.

The defaults are the ones docs/client.md explains: power-of-two-choices balancing, 10 s per attempt, 3 attempts
with short full-jitter backoff (idempotent calls only), a breaker per instance and one per service (open at 50 %
failures over the last 20 calls, at least 10, probe again after 10 s), 100 calls in flight per service, and
outlier ejection after 5 errors in a row (30 s, growing with each ejection).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshkit._core.clock import Clock
from meshkit.client.balancers import BALANCERS, Balancer
from meshkit.discovery.health import OutlierPolicy
from meshkit.errors import ConfigurationError
from meshkit.resilience import CircuitBreaker, Exponential, Retry

__all__ = ["BreakerFactory", "ClientOptions", "default_breaker", "default_retry", "is_server_error"]

BreakerFactory = Callable[[str, Clock], CircuitBreaker]
"""Makes one new breaker: called with its name (``payments`` for the service, ``payments@host:port`` for an
instance) and the client's clock."""


def is_server_error(result: Any) -> bool:
    """A 5xx response: what breakers, outlier detection and retries count as a failed call."""
    status = getattr(result, "status", None)
    return isinstance(status, int) and status >= 500


def default_breaker(name: str, clock: Clock) -> CircuitBreaker:
    """Opens at 50 % failed calls (errors or 5xx) over the last 20, once 10 are in; probes 3 calls after 10 s."""
    return CircuitBreaker(
        name=name,
        failure_rate_threshold=50.0,
        window_size=20,
        minimum_calls=10,
        wait_in_open=10.0,
        half_open_calls=3,
        failure_result=is_server_error,
        clock=clock,
    )


def default_retry() -> Retry:
    """3 attempts in all, waiting up to 25 ms, 50 ms (full jitter) between them: the next attempt goes to another
    instance, so there is little reason to wait long. ``max_delay`` bounds the waiting a hint (``retry_after``)
    could ask for: a call is never held for long between attempts."""
    return Retry(attempts=3, backoff=Exponential(0.025, cap=1.0, jitter="full"), max_delay=2.0)


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How a :class:`~meshkit.client.ServiceClient` balances and protects its calls.

    - ``balancer``: ``"p2c"`` (default), ``"round_robin"``, ``"random"``, ``"least_outstanding"``, or a
      :class:`~meshkit.client.Balancer` object. A name gives each client a balancer of its own; an object is
      shared by every client given these options.
    - ``timeout``: seconds for each attempt (``None``: no limit). A call's ``timeout=`` overrides it.
    - ``retry``: the :class:`~meshkit.resilience.Retry` for idempotent calls (``None``: one attempt). Calls that
      are not idempotent are retried only when nothing was sent (a refused connection, an open circuit).
    - ``breaker``: a :data:`BreakerFactory` for the per-instance and per-service breakers (``None``: none).
    - ``bulkhead``: the most calls in flight to the service (``None``: no limit); ``bulkhead_wait``: seconds a
      call may wait for a slot before :class:`~meshkit.errors.BulkheadFull`.
    - ``outlier``: the :class:`~meshkit.discovery.health.OutlierPolicy` of passive ejection (``None``: off).
    """

    balancer: str | Balancer = "p2c"
    timeout: float | None = 10.0
    retry: Retry | None = field(default_factory=default_retry)
    breaker: BreakerFactory | None = default_breaker
    bulkhead: int | None = 100
    bulkhead_wait: float = 1.0
    outlier: OutlierPolicy | None = field(default_factory=OutlierPolicy)

    def __post_init__(self) -> None:
        if isinstance(self.balancer, str) and self.balancer not in (*BALANCERS, "power_of_two"):
            raise ConfigurationError(
                f"unknown balancer {self.balancer!r}", hint=f"use one of {', '.join(BALANCERS)}, or a Balancer"
            )
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigurationError(f"timeout must be positive or None, not {self.timeout!r}")
        if self.bulkhead is not None and self.bulkhead < 1:
            raise ConfigurationError(f"bulkhead must be at least 1 or None, not {self.bulkhead!r}")
        if not self.bulkhead_wait >= 0:
            raise ConfigurationError(f"bulkhead_wait must be >= 0, not {self.bulkhead_wait!r}")
