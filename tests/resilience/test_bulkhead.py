from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit.errors import BulkheadFull, ConfigurationError
from meshkit.resilience import Bulkhead, CallRejected, ThreadPoolBulkhead
from meshkit.resilience.events import Event
from meshkit.testing import FakeClock, eventually
from tests.helpers import Gauge, wait_until


async def _run_tasks(bulkhead: Bulkhead, n: int, gate: asyncio.Event, gauge: Gauge) -> list[asyncio.Task[str]]:
    async def work() -> str:
        gauge.enter()
        try:
            await gate.wait()
            return "ok"
        finally:
            gauge.leave()

    return [asyncio.ensure_future(bulkhead.acall(work)) for _ in range(n)]


@pytest.mark.anyio
@pytest.mark.parametrize(("limit", "queue", "callers"), [(1, 0, 5), (3, 2, 10), (4, None, 12), (5, 5, 5)])
async def test_tasks_reject_exactly_when_slots_and_queue_are_full(limit: int, queue: int | None, callers: int) -> None:
    events: list[Event] = []
    bulkhead = Bulkhead(limit, max_wait=60.0, max_queue=queue, clock=FakeClock(), listeners=[events.append])
    gate, gauge = asyncio.Event(), Gauge()
    tasks = await _run_tasks(bulkhead, callers, gate, gauge)
    expected_waiting = min(callers - limit, queue if queue is not None else callers) if callers > limit else 0
    expected_rejected = max(callers - limit - expected_waiting, 0)
    await eventually(lambda: sum(t.done() for t in tasks) == expected_rejected, "rejections")
    await eventually(lambda: gauge.now == min(limit, callers), "slots to fill")
    m = bulkhead.metrics()
    assert (m.in_flight, m.waiting, m.rejected) == (min(limit, callers), expected_waiting, expected_rejected)
    assert all(isinstance(t.exception(), BulkheadFull) for t in tasks if t.done())
    assert sum(isinstance(e, CallRejected) for e in events) == expected_rejected
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == callers - expected_rejected
    assert gauge.most == min(limit, callers)
    assert bulkhead.metrics().in_flight == 0


@pytest.mark.anyio
async def test_waiters_are_admitted_in_arrival_order() -> None:
    bulkhead = Bulkhead(1, max_wait=60.0, clock=FakeClock())
    order: list[int] = []
    gate = asyncio.Event()

    async def work(i: int) -> None:
        order.append(i)
        if i == 0:
            await gate.wait()

    tasks = [asyncio.ensure_future(bulkhead.acall(work, i)) for i in range(6)]
    await eventually(lambda: bulkhead.metrics().waiting == 5, "five waiters")
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4, 5]


@pytest.mark.anyio
async def test_a_waiter_gives_up_after_max_wait_and_a_cancelled_waiter_leaves_the_queue() -> None:
    clock = FakeClock()
    bulkhead = Bulkhead(1, max_wait=2.0, clock=clock)
    gate = asyncio.Event()
    holder = asyncio.ensure_future(bulkhead.acall(gate.wait))
    await eventually(lambda: bulkhead.metrics().in_flight == 1, "holder inside")
    waiter = asyncio.ensure_future(bulkhead.acall(gate.wait))
    cancelled = asyncio.ensure_future(bulkhead.acall(gate.wait))
    await eventually(lambda: bulkhead.metrics().waiting == 2, "two waiters")
    cancelled.cancel()
    await eventually(lambda: bulkhead.metrics().waiting == 1, "cancelled waiter gone")
    clock.advance(1.5)
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(0.5)
    with pytest.raises(BulkheadFull):
        await waiter
    gate.set()
    assert await holder is True
    m = bulkhead.metrics()
    assert (m.in_flight, m.waiting, m.rejected) == (0, 0, 1)


@settings(max_examples=15, deadline=None)
@given(limit=st.integers(1, 6), queue=st.integers(0, 6), callers=st.integers(1, 24))
def test_threads_never_exceed_the_limit_and_reject_exactly_when_the_queue_is_full(
    limit: int, queue: int, callers: int
) -> None:
    bulkhead = Bulkhead(limit, max_wait=60.0, max_queue=queue)
    gate = threading.Event()
    gauge = Gauge()

    def work() -> str:
        gauge.enter()
        try:
            gate.wait(60)
            return "ok"
        finally:
            gauge.leave()

    def call() -> str:
        try:
            return bulkhead.call(work)
        except BulkheadFull:
            return "rejected"

    waiting = min(max(callers - limit, 0), queue)
    rejected = max(callers - limit - waiting, 0)
    with ThreadPoolExecutor(callers) as pool:
        futures = [pool.submit(call) for _ in range(callers)]
        wait_until(lambda: sum(f.done() for f in futures) == rejected, "rejections")
        wait_until(lambda: bulkhead.metrics().waiting == waiting and gauge.now == min(limit, callers), "queue")
        gate.set()
        results = [f.result() for f in futures]
    assert results.count("rejected") == rejected
    assert results.count("ok") == callers - rejected
    assert gauge.most <= limit
    assert bulkhead.metrics().in_flight == 0


def test_threads_under_load_stay_within_the_limit() -> None:
    bulkhead = Bulkhead(4, max_wait=60.0)
    gauge = Gauge()

    def work() -> None:
        gauge.enter()
        for _ in range(200):  # a little real work, so threads overlap
            pass
        gauge.leave()

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda _: bulkhead.call(work), range(2000)))
    assert gauge.done == 2000
    assert 1 <= gauge.most <= 4


def test_thread_pool_bulkhead_bounds_threads_and_queue_and_closes() -> None:
    pool = ThreadPoolBulkhead(max_workers=2, max_queue=3, name="users")
    gate = threading.Event()
    gauge = Gauge()
    names: set[str] = set()

    def blocking() -> str:
        gauge.enter()
        names.add(threading.current_thread().name)
        gate.wait(60)
        gauge.leave()
        return "ok"

    def call() -> str:
        try:
            return pool.call(blocking)
        except BulkheadFull:
            return "rejected"

    with ThreadPoolExecutor(10) as callers:
        futures = [callers.submit(call) for _ in range(10)]
        wait_until(lambda: sum(f.done() for f in futures) == 5, "five rejections")
        m = pool.metrics()
        assert (m.in_flight, m.waiting, m.rejected) == (2, 3, 5)
        # in_flight counts a call its worker has taken; the worker may not have entered it yet
        wait_until(lambda: gauge.now == 2, "both workers inside their calls")
        gate.set()
        results = [f.result() for f in futures]
    assert results.count("ok") == 5
    assert gauge.most == 2
    assert names and all(n.startswith("meshkit-users") for n in names)
    pool.close()
    with pytest.raises(ConfigurationError, match="closed"):
        pool.call(blocking)


@pytest.mark.anyio
async def test_thread_pool_bulkhead_runs_blocking_calls_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    with ThreadPoolBulkhead(max_workers=1) as pool:
        assert await pool.acall(threading.get_ident) != loop_thread

        async def not_blocking() -> None:
            pass

        with pytest.raises(TypeError, match="use Bulkhead"):
            await pool.acall(not_blocking)  # type: ignore[unused-coroutine]


def test_bad_bulkhead_values_are_refused() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        Bulkhead(0)
    with pytest.raises(ValueError, match="max_wait"):
        Bulkhead(1, max_wait=-1)
    with pytest.raises(ValueError, match="max_queue"):
        Bulkhead(1, max_queue=-1)
    with pytest.raises(ValueError, match="max_workers"):
        ThreadPoolBulkhead(0)
