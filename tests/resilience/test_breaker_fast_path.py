"""The breaker's lock-free success path (a full count window, untimed calls): the same figures and transitions as
recording each success under the lock, however many successes pile up between two reads, and under threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit.errors import CircuitOpen
from meshkit.resilience import BreakerState, BreakerTransition, CircuitBreaker
from meshkit.testing import FakeClock
from tests.resilience.test_breaker_model import Model

CLOSED = BreakerState.CLOSED

operations = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from(["ok", "ok", "ok", "fail"])),
        st.tuples(st.just("burst"), st.integers(1, 25)),  # many successes with no read in between
        st.tuples(st.just("start"), st.just(0)),  # admitted now, finished later (maybe in another generation)
        st.tuples(st.just("finish"), st.integers(0, 9)),
        st.tuples(st.just("late_fail"), st.integers(0, 9)),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 3.0])),
        st.tuples(st.just("read"), st.just(0)),
        st.tuples(st.just("reset"), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(
    ops=operations,
    size=st.integers(1, 6),
    minimum=st.integers(1, 6),
    threshold=st.sampled_from([25.0, 50.0, 100.0]),
    probes=st.integers(1, 3),
)
def test_successes_without_the_lock_match_the_reference_model(
    ops: list[tuple[str, int | float | str]], size: int, minimum: int, threshold: float, probes: int
) -> None:
    clock = FakeClock()
    seen: list[BreakerTransition] = []
    breaker = CircuitBreaker(
        name="fast",
        window_size=size,
        minimum_calls=minimum,
        failure_rate_threshold=threshold,
        wait_in_open=1.0,
        half_open_calls=probes,
        clock=clock,
        listeners=[lambda e: seen.append(e) if isinstance(e, BreakerTransition) else None],
    )
    model = Model("count", size, minimum, threshold, 100.0, None, 1.0, probes)
    pending: list[tuple[int, int]] = []  # (breaker ticket, model generation)

    def start() -> tuple[int, int] | None:
        now = clock.now()
        expected = model.start(now)
        try:
            ticket = breaker.try_acquire()
        except CircuitOpen:
            assert expected is None
            return None
        assert expected is not None
        return ticket, expected

    def finish(call: tuple[int, int], failed: bool) -> None:
        breaker.on_result(call[0], failed=failed)
        model.finish(call[1], clock.now(), failed, 0.0)

    def compare() -> None:
        m = breaker.metrics()
        actual = (m.state, m.failure_rate, m.slow_call_rate, m.calls, m.failed_calls, m.slow_calls)
        assert (*actual, m.not_permitted_calls) == model.metrics(clock.now())

    for op, arg in ops:
        if op in ("call", "burst"):
            for _ in range(1 if op == "call" else int(arg)):
                call = start()
                if call is not None:
                    finish(call, arg == "fail")
        elif op == "start":
            call = start()
            if call is not None:
                pending.append(call)
        elif op in ("finish", "late_fail") and pending:
            finish(pending.pop(int(arg) % len(pending)), op == "late_fail")
        elif op == "advance":
            clock.advance(float(arg))
        elif op == "read":
            compare()
        elif op == "reset":
            breaker.reset()
            if model.state is not CLOSED:
                model.move(CLOSED, clock.now(), (0, 0, 0))
            model.history = []
    compare()
    assert [(e.from_state, e.to_state, e.at) for e in seen] == model.transitions


def test_a_full_window_of_successes_is_counted_without_the_lock_and_read_back_in_order() -> None:
    breaker = CircuitBreaker(window_size=4, minimum_calls=4, failure_rate_threshold=50.0)
    for failed in (True, False, False, False):  # the window fills under the lock: 1 failure in 4
        breaker.on_result(breaker.try_acquire(), failed=failed)
    assert breaker._core.successes is not None  # from now on a success takes the lock-free path
    breaker.on_result(breaker.try_acquire(), failed=False)  # replaces the failure
    m = breaker.metrics()
    assert (m.calls, m.failed_calls) == (4, 0)
    breaker.on_result(breaker.try_acquire(), failed=True)
    breaker.on_result(breaker.try_acquire(), failed=False)
    assert (breaker.metrics().calls, breaker.metrics().failed_calls) == (4, 1)
    for _ in range(3):
        breaker.on_result(breaker.try_acquire(), failed=False)
    assert breaker.metrics().failed_calls == 0  # the failure left the window after four more calls
    # two failures in the four most recent calls open it (50 %): the successes before them were counted first
    for failed in (False, True, False, True):
        breaker.on_result(breaker.try_acquire(), failed=failed)
    assert breaker.state is BreakerState.OPEN
    assert breaker._core.successes is None


def test_a_success_of_a_past_generation_is_not_counted_on_the_lock_free_path() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        window_size=2, minimum_calls=2, failure_rate_threshold=100.0, wait_in_open=1.0, half_open_calls=1, clock=clock
    )
    for _ in range(2):
        breaker.on_result(breaker.try_acquire(), failed=False)
    old = breaker.try_acquire()  # in flight across a trip and a recovery
    for _ in range(2):
        breaker.on_result(breaker.try_acquire(), failed=True)
    assert breaker.state is BreakerState.OPEN
    clock.advance(1.0)
    breaker.on_result(breaker.try_acquire(), failed=False)  # the probe closes it: a fresh window
    for failed in (True, False):
        breaker.on_result(breaker.try_acquire(), failed=failed)
    assert breaker._core.successes is not None
    assert (breaker.metrics().state, breaker.metrics().failed_calls) == (CLOSED, 1)
    breaker.on_result(old, failed=False)  # admitted two generations ago: counted, it would push the failure out
    assert (breaker.metrics().state, breaker.metrics().failed_calls) == (CLOSED, 1)
    breaker.on_result(breaker.try_acquire(), failed=False)  # a current one does
    assert breaker.metrics().failed_calls == 0


@pytest.mark.usefixtures("tiny_switch_interval")
def test_threads_counting_successes_without_the_lock_lose_none() -> None:
    size = 50
    breaker = CircuitBreaker(window_size=size, minimum_calls=size, failure_rate_threshold=100.0)
    for _ in range(size):
        breaker.on_result(breaker.try_acquire(), failed=False)
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(3000):
            # one thread also records failures (under the lock), interleaved with everyone's successes
            breaker.on_result(breaker.try_acquire(), failed=n == 0 and i % 100 == 0)
            if i % 500 == 0:
                breaker.metrics()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    m = breaker.metrics()
    assert m.state is BreakerState.CLOSED
    assert m.calls == size
    assert 0 <= m.failed_calls <= 1  # at most the last failure is still among the last 50 outcomes
    # every success was counted: 50 more of them push any failure out of the window
    for _ in range(size):
        breaker.on_result(breaker.try_acquire(), failed=False)
    assert breaker.metrics().failed_calls == 0
    ring = breaker._core.window._ring  # type: ignore[union-attr]
    assert ring == [0] * size
