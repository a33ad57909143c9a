"""The breaker's bookkeeping under real concurrency: threads and tasks racing through every state."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from meshkit.errors import CircuitOpen
from meshkit.resilience import BreakerState, BreakerTransition, CircuitBreaker
from meshkit.resilience.events import Event


@pytest.mark.usefixtures("tiny_switch_interval")
def test_threads_racing_through_the_breaker_keep_its_counts_consistent() -> None:
    transitions: list[Event] = []
    # no wait in open, one probe, a small window: transitions come thick and fast
    breaker = CircuitBreaker(
        window_size=4, minimum_calls=2, wait_in_open=0.0, half_open_calls=1, listeners=[transitions.append]
    )
    refused = 0
    lock = threading.Lock()

    def worker(seed: int) -> None:
        nonlocal refused
        rng = random.Random(seed)
        for _ in range(2000):

            def call() -> None:
                if rng.random() < 0.5:
                    raise ConnectionError("down")

            try:
                breaker.call(call)
            except ConnectionError:
                pass
            except CircuitOpen:
                with lock:
                    refused += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))

    m = breaker.metrics()
    assert m.not_permitted_calls == refused > 0
    assert m.calls <= 4
    kinds = [(e.from_state, e.to_state) for e in transitions if isinstance(e, BreakerTransition)]
    assert (BreakerState.CLOSED, BreakerState.OPEN) in kinds
    assert (BreakerState.OPEN, BreakerState.HALF_OPEN) in kinds
    # listeners see transitions in the order they happened: each starts where the previous ended
    assert all(a[1] == b[0] for a, b in itertools.pairwise(kinds))
    # no probe slot leaked: once the failures stop, the breaker recovers
    breaker.reset()
    for _ in range(30):
        breaker.call(lambda: None)
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_tasks_cancelled_mid_call_never_leak_a_probe_slot() -> None:
    breaker = CircuitBreaker(window_size=4, minimum_calls=4, wait_in_open=0.0, half_open_calls=2)

    async def fail() -> None:
        raise ConnectionError("down")

    for _ in range(4):
        with pytest.raises(ConnectionError):
            await breaker.acall(fail)
    assert breaker.metrics().state is BreakerState.HALF_OPEN  # wait_in_open=0: due at once

    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    for _ in range(50):  # probes admitted and cancelled over and over
        started.clear()
        task = asyncio.ensure_future(breaker.acall(hang))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def ok() -> str:
        return "ok"

    assert [await breaker.acall(ok) for _ in range(2)] == ["ok", "ok"]
    assert breaker.metrics().state is BreakerState.CLOSED
