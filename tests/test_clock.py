from __future__ import annotations

import asyncio

import pytest

from meshkit._core.clock import Clock, MonotonicClock
from meshkit.testing import FakeClock, eventually


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(MonotonicClock(), Clock)
    assert isinstance(FakeClock(), Clock)


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(10.0, wall_start=1000.0)
    assert (clock.now(), clock.wall()) == (10.0, 1000.0)
    clock.sleep(2.5)  # a sync sleep advances at once and is recorded
    assert (clock.now(), clock.wall(), clock.sleeps) == (12.5, 1002.5, [2.5])
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)


@pytest.mark.anyio
async def test_fake_async_sleeps_wake_in_time_order_when_time_is_advanced() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.asleep(seconds)
        woke.append(f"{name}@{clock.now()}")

    tasks = [asyncio.ensure_future(sleeper(n, s)) for n, s in (("c", 3.0), ("a", 1.0), ("b", 2.0))]
    await clock.wait_for_sleepers(3)
    clock.advance(2.0)
    await asyncio.sleep(0)
    assert woke == ["a@2.0", "b@2.0"]  # woken in time order; `now` is read after the whole advance
    assert clock.pending == 1
    clock.advance(5.0)
    await asyncio.gather(*tasks)
    assert woke == ["a@2.0", "b@2.0", "c@7.0"]
    assert sorted(clock.sleeps) == [1.0, 2.0, 3.0]


@pytest.mark.anyio
async def test_auto_advance_returns_at_once() -> None:
    clock = FakeClock(auto_advance=True)
    await clock.asleep(100)
    assert clock.now() == 100


@pytest.mark.anyio
async def test_wait_for_sleepers_fails_loudly_when_nobody_sleeps() -> None:
    with pytest.raises(AssertionError, match="expected 1 sleepers"):
        await FakeClock().wait_for_sleepers(1, max_turns=10)


@pytest.mark.anyio
async def test_real_deadlines_fire_in_order_and_leave_no_armed_entries() -> None:
    clock = MonotonicClock()
    release = asyncio.Event()
    fired: list[float] = []

    async def wait(seconds: float) -> None:
        try:
            async with clock.deadline(seconds):
                await release.wait()
        except TimeoutError:
            fired.append(seconds)

    tasks = [asyncio.ensure_future(wait(s)) for s in (0.03, 0.01, 0.02, 30.0)]
    await eventually(lambda: len(fired) == 3, "three deadlines to fire")
    release.set()
    await asyncio.gather(*tasks)
    assert fired == [0.01, 0.02, 0.03]
    queues = clock._loops[asyncio.get_running_loop()]
    assert all(not q.entries for q in queues.values())


@pytest.mark.anyio
async def test_a_deadline_needs_a_task() -> None:
    clock = MonotonicClock()
    loop = asyncio.get_running_loop()

    def outside_a_task() -> None:
        clock.arm_deadline(1.0)

    future = loop.run_in_executor(None, outside_a_task)
    with pytest.raises(RuntimeError, match="no running event loop"):
        await future


@pytest.mark.anyio
async def test_an_outer_cancel_during_an_expiring_deadline_stays_a_cancel() -> None:
    clock = FakeClock()
    inner_started = asyncio.Event()

    async def body() -> None:
        async with clock.deadline(1.0):
            inner_started.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(body())
    await inner_started.wait()
    task.cancel()  # someone else cancels...
    clock.advance(1.0)  # ...and the deadline expires too: the outer cancel must win
    with pytest.raises(asyncio.CancelledError):
        await task
