from __future__ import annotations

import asyncio

import pytest

from meshkit._core.clock import MonotonicClock
from meshkit.errors import TimeoutExceeded
from meshkit.resilience import Constant, Retry, TimedOut, Timeout
from meshkit.resilience.events import Event
from meshkit.testing import FakeClock


@pytest.mark.anyio
async def test_async_calls_are_cancelled_when_the_time_is_up() -> None:
    clock = FakeClock()
    events: list[Event] = []
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.ensure_future(Timeout(2.0, clock=clock, listeners=[events.append]).acall(hangs))
    await clock.wait_for_sleepers(1)
    clock.advance(1.999)
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(0.001)
    with pytest.raises(TimeoutExceeded, match="longer than 2s") as info:
        await task
    assert isinstance(info.value, TimeoutError)
    assert info.value.timeout == 2.0
    assert cancelled.is_set()
    assert events == [TimedOut("timeout", 2.0)]


@pytest.mark.anyio
async def test_real_clock_timeout_interrupts_a_long_sleep() -> None:
    with pytest.raises(TimeoutExceeded):
        await Timeout(0.05).acall(asyncio.sleep, 3600)


@pytest.mark.anyio
async def test_many_concurrent_deadlines_fire_only_for_the_slow_calls() -> None:
    timeout = Timeout(0.2)
    release = asyncio.Event()

    async def fast(i: int) -> int:
        return i

    async def slow(i: int) -> int:
        await release.wait()
        return i

    slow_tasks = [asyncio.ensure_future(timeout.acall(slow, i)) for i in range(50)]
    assert [await timeout.acall(fast, i) for i in range(200)] == list(range(200))
    results = await asyncio.gather(*slow_tasks, return_exceptions=True)
    assert all(isinstance(r, TimeoutExceeded) for r in results)


@pytest.mark.anyio
async def test_an_inner_timeout_error_is_not_ours_and_passes_unchanged() -> None:
    async def raises() -> None:
        raise TimeoutError("from the driver")

    with pytest.raises(TimeoutError, match="from the driver") as info:
        await Timeout(5.0).acall(raises)
    assert not isinstance(info.value, TimeoutExceeded)


@pytest.mark.anyio
async def test_outside_cancellation_stays_a_cancellation() -> None:
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(Timeout(60.0).acall(hangs))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.anyio
async def test_nested_timeouts_report_the_one_that_fired() -> None:
    clock = FakeClock()
    outer = Timeout(1.0, name="outer", clock=clock)
    inner = Timeout(5.0, name="inner", clock=clock)
    task = asyncio.ensure_future((outer | inner).acall(asyncio.Event().wait))
    await clock.wait_for_sleepers(2)
    clock.advance(1.0)
    with pytest.raises(TimeoutExceeded, match="outer"):
        await task


@pytest.mark.anyio
async def test_each_retry_gets_its_own_timeout() -> None:
    clock = FakeClock()
    attempts = 0
    gate = asyncio.Event()

    async def first_hangs() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await gate.wait()
        return "second try"

    policy = Retry(attempts=2, backoff=Constant(0), clock=clock) | Timeout(1.0, clock=clock)
    task = asyncio.ensure_future(policy.acall(first_hangs))
    await clock.wait_for_sleepers(1)
    clock.advance(1.0)
    assert await task == "second try"
    assert attempts == 2


def test_sync_timeout_is_optimistic_and_discards_late_results() -> None:
    clock = FakeClock()
    timeout = Timeout(2.0, clock=clock)

    def slow() -> str:
        clock.advance(2.5)
        return "late"

    with pytest.raises(TimeoutExceeded):
        timeout.call(slow)
    assert timeout.call(lambda: "quick") == "quick"

    def slow_and_failing() -> None:
        clock.advance(3)
        raise KeyError("its own error")

    with pytest.raises(KeyError):  # a late error is more telling than a timeout: it passes
        timeout.call(slow_and_failing)


@pytest.mark.anyio
async def test_deadline_scope_on_the_real_clock() -> None:
    clock = MonotonicClock()
    with pytest.raises(TimeoutError):
        async with clock.deadline(0.01):
            await asyncio.sleep(3600)
    async with clock.deadline(10) as scope:
        await asyncio.sleep(0)
    assert not scope.expired


def test_bad_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="seconds > 0"):
        Timeout(0)
