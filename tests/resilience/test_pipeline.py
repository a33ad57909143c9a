from __future__ import annotations

import asyncio
import contextvars
import threading
from dataclasses import replace

import pytest

from meshkit.errors import CircuitOpen
from meshkit.resilience import (
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    Constant,
    Fallback,
    Pipeline,
    Retry,
    RetryAttempt,
    ThreadPoolBulkhead,
    Timeout,
)
from meshkit.resilience.events import Event
from meshkit.testing import FakeClock


def test_composition_flattens_and_keeps_order() -> None:
    r, b, t, k = Retry(), CircuitBreaker(), Timeout(1.0), Bulkhead(2)
    pipeline = (r | b) | (t | k)
    assert isinstance(pipeline, Pipeline)
    assert pipeline.layers == (r, b, t, k)
    assert (r | b | t | k) == pipeline
    assert repr(pipeline).count(" | ") == 3 and repr(pipeline).startswith("Retry(")


def test_policies_are_immutable_values() -> None:
    r = Retry(attempts=3)
    with pytest.raises(AttributeError):
        r.attempts = 5  # type: ignore[misc]
    assert Retry(attempts=3) == r
    assert replace(r, attempts=5).attempts == 5 and r.attempts == 3
    b = CircuitBreaker(name="x")
    fresh = replace(b, wait_in_open=1.0)
    assert fresh._core is not b._core  # a new breaker gets its own state


def test_retry_outside_a_breaker_stops_once_the_circuit_opens() -> None:
    clock = FakeClock()
    events: list[Event] = []
    breaker = CircuitBreaker(minimum_calls=3, window_size=3, wait_in_open=60, clock=clock)
    retry = Retry(attempts=10, backoff=Constant(0.1), max_delay=5.0, clock=clock, listeners=[events.append])
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    with pytest.raises(CircuitOpen) as info:
        (retry | breaker).call(down)
    # three real calls (t=0, 0.1, 0.2) opened the circuit; the 4th attempt (t=0.3) failed fast with a hint of
    # 59.9 s, which does not fit max_delay, so the retries ended there
    assert calls == 3
    assert breaker.state is BreakerState.OPEN
    assert info.value.retry_after == pytest.approx(60 - 0.1)
    assert [e.attempt for e in events if isinstance(e, RetryAttempt)] == [1, 2, 3]


def test_fallback_sees_the_final_outcome_of_the_retries() -> None:
    clock = FakeClock()
    calls = 0

    def down() -> str:
        nonlocal calls
        calls += 1
        raise CircuitOpen("svc")

    pipeline = Fallback(value="default") | Retry(attempts=3, backoff=Constant(0), clock=clock)
    assert pipeline.call(down) == "default"
    assert calls == 3


@pytest.mark.anyio
async def test_the_full_pipeline_in_the_recommended_order_async() -> None:
    clock = FakeClock(auto_advance=True)
    breaker = CircuitBreaker(minimum_calls=5, window_size=5, clock=clock)
    pipeline = (
        Fallback(value="fallback")
        | Retry(attempts=3, backoff=Constant(0.01), max_delay=1.0, clock=clock)
        | breaker
        | Timeout(1.0, clock=clock)
        | Bulkhead(4)
    )
    outcomes: list[str | Exception] = [ConnectionError(), "ok-1", ConnectionError(), ConnectionError(), "ok-2"]

    async def service() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert [await pipeline.acall(service) for _ in range(2)] == ["ok-1", "ok-2"]
    m = breaker.metrics()
    assert (m.calls, m.failed_calls, m.state) == (5, 3, BreakerState.OPEN)  # 3/5 = 60% >= 50%
    assert await pipeline.acall(service) == "fallback"  # open: fails fast, no call made
    assert clock.sleeps == [0.01, 0.01, 0.01]  # the open circuit's 30 s hint does not fit max_delay: no wait


def test_thread_pool_bulkhead_in_a_sync_pipeline_runs_the_inner_layers_on_its_threads() -> None:
    with ThreadPoolBulkhead(max_workers=2, name="orders") as pool:
        pipeline = Retry(attempts=2, backoff=Constant(0)) | pool
        assert pipeline.call(lambda: threading.current_thread().name).startswith("meshkit-orders")


@pytest.mark.anyio
async def test_context_variables_reach_the_pool_thread() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    request_id.set("r-42")
    with ThreadPoolBulkhead(max_workers=1) as pool:
        # a pipeline ending in a thread pool takes a blocking callable (see ThreadPoolBulkhead.acall)
        assert await (Timeout(5.0) | pool).acall(request_id.get) == "r-42"  # type: ignore[arg-type]


def test_an_empty_pipeline_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Pipeline(())


@pytest.mark.anyio
async def test_cancelling_a_half_open_probe_frees_its_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(minimum_calls=1, window_size=1, wait_in_open=1.0, half_open_calls=1, clock=clock)
    with pytest.raises(ConnectionError):
        breaker.call(_fail)
    clock.advance(1.0)
    assert breaker.metrics().state is BreakerState.HALF_OPEN
    started = asyncio.Event()

    async def probe() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(breaker.acall(probe))
    await started.wait()
    with pytest.raises(CircuitOpen):  # the one probe slot is taken
        breaker.call(lambda: None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.call(lambda: "probe") == "probe"  # the slot came back; the probe closed the circuit
    assert breaker.state is BreakerState.CLOSED


def _fail() -> None:
    raise ConnectionError("x")
