from __future__ import annotations

import asyncio

import pytest

from meshkit.errors import CircuitOpen, RateLimited, TimeoutExceeded
from meshkit.resilience import CallRejected, Fallback, FallbackUsed, RateLimiter, TokenBucket
from meshkit.resilience.events import Event
from meshkit.testing import FakeClock


def test_token_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.reserve(0.0) == pytest.approx(-0.1)  # refused: a token in 0.1 s
    assert bucket.reserve(0.1) == 0.0
    assert bucket.available(10.0) == 5  # never more than the burst
    assert bucket.reserve(10.0, tokens=5) == 0.0
    assert bucket.reserve(10.0, max_wait=0.25) == pytest.approx(0.1)  # reserved ahead, wait 0.1 s
    assert bucket.available(10.0) == pytest.approx(-1.0)


def test_rate_limiter_refuses_with_a_retry_after_and_recovers() -> None:
    clock = FakeClock()
    events: list[Event] = []
    limiter = RateLimiter(rate=2, burst=2, clock=clock, listeners=[events.append])
    assert [limiter.call(lambda: "ok") for _ in range(2)] == ["ok", "ok"]
    with pytest.raises(RateLimited) as info:
        limiter.call(lambda: "no")
    assert info.value.retry_after == pytest.approx(0.5)
    assert info.value.request_sent is False
    assert len(events) == 1
    assert isinstance(events[0], CallRejected)
    assert events[0].kind == "rate_limited"
    assert events[0].retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert limiter.call(lambda: "again") == "again"


@pytest.mark.anyio
async def test_rate_limiter_waits_for_a_token_within_max_wait() -> None:
    clock = FakeClock(auto_advance=True)
    limiter = RateLimiter(rate=4, burst=1, max_wait=1.0, clock=clock)

    async def ok() -> int:
        return 1

    assert sum([await limiter.acall(ok) for _ in range(4)]) == 4
    assert clock.sleeps == pytest.approx([0.25, 0.25, 0.25])


def test_fallback_replaces_meshkit_errors_but_not_bugs() -> None:
    events: list[Event] = []
    fallback = Fallback(value=[], listeners=[events.append])

    def circuit_open() -> list[int]:
        raise CircuitOpen("recommendations")

    assert fallback.call(circuit_open) == []
    assert isinstance(events[0], FallbackUsed) and isinstance(events[0].error, CircuitOpen)
    with pytest.raises(KeyError):
        fallback.call(lambda: dict[str, list[int]]()["missing"])


@pytest.mark.anyio
async def test_fallback_handler_sees_the_error() -> None:
    fallback = Fallback(handler=lambda exc: f"cached ({type(exc).__name__})", on=(TimeoutExceeded, CircuitOpen))

    async def slow() -> str:
        raise TimeoutExceeded("slow", timeout=1)

    assert await fallback.acall(slow) == "cached (TimeoutExceeded)"
    assert await fallback.acall(asyncio.sleep, 0, "fresh") == "fresh"


def test_fallback_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Fallback()
    with pytest.raises(ValueError, match="exactly one"):
        Fallback(value=1, handler=lambda e: 2)


def test_bad_rate_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        RateLimiter(rate=0)
    with pytest.raises(ValueError, match="max_wait"):
        RateLimiter(rate=1, max_wait=-1)
