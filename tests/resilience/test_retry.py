from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshkit.errors import BulkheadFull, CircuitOpen, Unavailable
from meshkit.resilience import Backoff, Constant, Exponential, Linear, Retry, RetryAttempt, RetryGaveUp
from meshkit.resilience.events import Event
from meshkit.testing import FakeClock


class Flaky:
    """Fails with ``errors`` in order, then returns ``value``; counts calls."""

    def __init__(self, *errors: BaseException, value: object = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value

    async def acall(self) -> object:
        return self()


def make(clock: FakeClock, events: list[Event] | None = None, **options: Any) -> Retry:
    listeners: list[Callable[[Event], None]] = [events.append] if events is not None else []
    options.setdefault("backoff", Linear(1.0, 1.0, jitter="none"))
    return Retry(clock=clock, listeners=listeners, **options)


def test_retries_transient_errors_until_success_with_the_backoff_schedule() -> None:
    clock = FakeClock()
    events: list[Event] = []
    fn = Flaky(ConnectionError("a"), TimeoutError("b"), Unavailable("c"))
    assert make(clock, events, attempts=4).call(fn) == "ok"
    assert fn.calls == 4
    assert clock.sleeps == [1.0, 2.0, 3.0]
    assert [(e.attempt, e.delay, type(e.error)) for e in events if isinstance(e, RetryAttempt)] == [
        (1, 1.0, ConnectionError),
        (2, 2.0, TimeoutError),
        (3, 3.0, Unavailable),
    ]


def test_gives_up_after_the_attempts_and_raises_the_last_error() -> None:
    clock = FakeClock()
    events: list[Event] = []
    fn = Flaky(*(ConnectionError(str(i)) for i in range(5)))
    with pytest.raises(ConnectionError, match="2"):
        make(clock, events, attempts=3).call(fn)
    assert fn.calls == 3
    assert clock.sleeps == [1.0, 2.0]
    gave_up = [e for e in events if isinstance(e, RetryGaveUp)]
    assert len(gave_up) == 1
    assert gave_up[0].attempts == 3
    assert "3 attempts" in gave_up[0].reason


def test_programming_errors_are_not_retried_by_default() -> None:
    fn = Flaky(KeyError("bug"))
    with pytest.raises(KeyError):
        make(FakeClock(), attempts=5).call(fn)
    assert fn.calls == 1


def test_retry_on_chosen_types_and_predicates() -> None:
    fn = Flaky(KeyError("a"), KeyError("b"))
    assert make(FakeClock(), attempts=5, on=KeyError).call(fn) == "ok"
    assert fn.calls == 3

    fn = Flaky(ValueError("retry me"), ValueError("not me"))
    with pytest.raises(ValueError, match="not me"):
        make(FakeClock(), attempts=5, on=lambda e: "retry" in str(e)).call(fn)
    assert fn.calls == 2


def test_results_can_be_retried_and_the_last_one_is_returned_when_tries_run_out() -> None:
    results = iter([503, 503, 200])
    clock = FakeClock()
    assert make(clock, attempts=5, on_result=lambda r: r >= 500).call(lambda: next(results)) == 200
    assert clock.sleeps == [1.0, 2.0]

    always = iter([503] * 10)
    assert make(FakeClock(), attempts=3, on_result=lambda r: r >= 500).call(lambda: next(always)) == 503
    assert next(always) == 503 and len(list(always)) == 6  # exactly 3 were consumed


def test_non_idempotent_operations_are_not_retried_blindly() -> None:
    events: list[Event] = []
    policy = make(FakeClock(), events, attempts=5)
    fn = Flaky(ConnectionResetError("the request may have reached the server"))
    with pytest.raises(ConnectionResetError):
        policy.options(idempotent=False, name="POST /payments").call(fn)
    assert fn.calls == 1
    assert [e.reason for e in events if isinstance(e, RetryGaveUp)] == ["operation is not idempotent"]


@pytest.mark.parametrize(
    "error", [CircuitOpen("payments"), BulkheadFull("b", max_concurrent=1, max_wait=0), ConnectionRefusedError()]
)
def test_non_idempotent_operations_are_retried_when_nothing_was_sent(error: BaseException) -> None:
    fn = Flaky(error)
    assert make(FakeClock(), attempts=3).options(idempotent=False).call(fn) == "ok"
    assert fn.calls == 2


def test_non_idempotent_retries_can_be_allowed_explicitly() -> None:
    fn = Flaky(ConnectionResetError(), ConnectionResetError())
    assert make(FakeClock(), attempts=3, retry_non_idempotent=True).options(idempotent=False).call(fn) == "ok"
    assert fn.calls == 3


def test_max_delay_caps_the_total_time_spent_waiting() -> None:
    clock = FakeClock()
    events: list[Event] = []
    fn = Flaky(*(ConnectionError() for _ in range(10)))
    with pytest.raises(ConnectionError):
        make(clock, events, attempts=None, max_delay=2.5, backoff=Constant(1.0)).call(fn)
    assert clock.sleeps == [1.0, 1.0]
    assert fn.calls == 3
    assert "max_delay" in next(e for e in events if isinstance(e, RetryGaveUp)).reason


def test_a_retry_after_hint_is_honoured() -> None:
    clock = FakeClock()
    fn = Flaky(Unavailable("busy", retry_after=7.5), Unavailable("busy", retry_after=0.01))
    assert make(clock, attempts=3, backoff=Constant(0.5)).call(fn) == "ok"
    assert clock.sleeps == [7.5, 0.5]  # the hint raises the wait; it never shortens it


def test_a_hint_that_does_not_fit_the_budget_ends_the_retries() -> None:
    clock = FakeClock()
    fn = Flaky(Unavailable("busy", retry_after=60))
    with pytest.raises(Unavailable):
        make(clock, attempts=3, max_delay=10).call(fn)
    assert clock.sleeps == []


def test_hints_can_be_read_from_results() -> None:
    clock = FakeClock()
    responses = iter([(429, 3.0), (200, None)])
    policy = make(clock, attempts=3, on_result=lambda r: r[0] == 429, retry_after=lambda e, r: r[1] if r else None)
    assert policy.call(lambda: next(responses)) == (200, None)
    assert clock.sleeps == [3.0]


def test_zero_delays_do_not_sleep() -> None:
    clock = FakeClock()
    fn = Flaky(ConnectionError(), ConnectionError())
    assert make(clock, attempts=3, backoff=Constant(0)).call(fn) == "ok"
    assert clock.sleeps == []


@pytest.mark.anyio
async def test_async_retry_sleeps_on_the_clock() -> None:
    clock = FakeClock()
    fn = Flaky(ConnectionError(), ConnectionError())
    task = asyncio.ensure_future(make(clock, attempts=3, backoff=Exponential(1.0, jitter="none")).acall(fn.acall))
    await clock.wait_for_sleepers(1)
    assert fn.calls == 1 and not task.done()
    clock.advance(1.0)
    await clock.wait_for_sleepers(1)
    assert fn.calls == 2
    clock.advance(1.999)
    await asyncio.sleep(0)
    assert fn.calls == 2 and not task.done()
    clock.advance(0.001)
    assert await task == "ok"
    assert clock.sleeps == [1.0, 2.0]


@pytest.mark.anyio
async def test_decorators_keep_names_and_work_sync_and_async() -> None:
    clock = FakeClock(auto_advance=True)
    policy = make(clock, attempts=3)
    sync_fn = Flaky(ConnectionError())
    async_fn = Flaky(ConnectionError())

    @policy
    def fetch_sync() -> object:
        """Docs."""
        return sync_fn()

    @policy.options(idempotent=True)
    async def fetch_async() -> object:
        return await async_fn.acall()

    assert fetch_sync.__name__ == "fetch_sync" and fetch_sync.__doc__ == "Docs."
    assert asyncio.iscoroutinefunction(fetch_async)
    assert fetch_sync() == "ok"
    assert await fetch_async() == "ok"
    assert (sync_fn.calls, async_fn.calls) == (2, 2)


def test_cancellation_and_interrupts_are_never_retried() -> None:
    fn = Flaky(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        make(FakeClock(), attempts=3, on=BaseException).call(fn)
    assert fn.calls == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attempts": None}, "attempts or max_delay"),
        ({"attempts": 0}, "attempts must be >= 1"),
        ({"max_delay": -1}, "max_delay must be >= 0"),
    ],
)
def test_bad_retry_values_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Retry(**options)


#: each strategy's un-jittered delay before retry n (1-based), written out independently of the code under test
STRATEGIES: dict[str, Callable[[float, int], float]] = {
    "constant": lambda initial, n: initial,
    "linear": lambda initial, n: initial * n,  # Linear(initial, step=initial)
    "exponential": lambda initial, n: initial * 2 ** (n - 1),
}


@given(
    strategy=st.sampled_from(sorted(STRATEGIES)),
    jitter=st.sampled_from(["none", "full", "equal", "decorrelated"]),
    initial=st.floats(0.001, 2.0),
    cap=st.floats(0.5, 20.0),
    attempts=st.integers(2, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_retry_sleeps_stay_within_the_jitter_bounds(
    strategy: str, jitter: str, initial: float, cap: float, attempts: int, seed: int
) -> None:
    clock = FakeClock()
    backoff: Backoff
    if strategy == "constant":
        backoff = Constant(initial, cap=cap, jitter=jitter)  # type: ignore[arg-type]
    elif strategy == "linear":
        backoff = Linear(initial, initial, cap=cap, jitter=jitter)  # type: ignore[arg-type]
    else:
        backoff = Exponential(initial, 2.0, cap=cap, jitter=jitter)  # type: ignore[arg-type]
    retry = Retry(attempts=attempts, backoff=backoff, clock=clock, rng=random.Random(seed))
    fn = Flaky(*(ConnectionError() for _ in range(attempts)))
    with pytest.raises(ConnectionError):
        retry.call(fn)
    assert fn.calls == attempts
    assert len(clock.sleeps) == attempts - 1
    previous = 0.0
    for n, slept in enumerate(clock.sleeps, start=1):
        base = min(STRATEGIES[strategy](initial, n), cap)
        low, high = {
            "none": (base, base),
            "full": (0.0, base),
            "equal": (base / 2, base),
            "decorrelated": (min(initial, cap), min(cap, 3 * max(previous, min(initial, cap)))),
        }[jitter]
        assert low - 1e-9 <= slept <= high + 1e-9
        previous = slept
