from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshkit.resilience import Constant, Exponential, Linear

retries = st.integers(1, 60)
seeds = st.integers(0, 2**32 - 1)
initials = st.floats(0.0, 10.0)
caps = st.floats(0.0, 100.0)


@given(retry=retries, initial=initials, factor=st.floats(1.0, 4.0), cap=caps, seed=seeds)
def test_exponential_without_jitter_is_exact(retry: int, initial: float, factor: float, cap: float, seed: int) -> None:
    b = Exponential(initial, factor, cap=cap, jitter="none")
    expected = min(initial * factor ** (retry - 1), cap) if (retry - 1) * math.log(factor) <= 700 else cap
    assert b.delay(retry, rng=random.Random(seed)) == pytest.approx(expected)


@given(retry=retries, initial=initials, cap=caps, seed=seeds)
def test_full_jitter_is_between_zero_and_the_base(retry: int, initial: float, cap: float, seed: int) -> None:
    b = Exponential(initial, cap=cap, jitter="full")
    base = min(Exponential(initial, cap=cap, jitter="none").delay(retry), cap)
    assert 0.0 <= b.delay(retry, rng=random.Random(seed)) <= base


@given(retry=retries, initial=initials, cap=caps, seed=seeds)
def test_equal_jitter_keeps_at_least_half(retry: int, initial: float, cap: float, seed: int) -> None:
    b = Exponential(initial, cap=cap, jitter="equal")
    base = Exponential(initial, cap=cap, jitter="none").delay(retry)
    d = b.delay(retry, rng=random.Random(seed))
    assert base / 2 <= d <= base


@given(initial=st.floats(0.001, 1.0), cap=st.floats(1.0, 50.0), seed=seeds, steps=st.integers(1, 30))
def test_decorrelated_jitter_stays_between_initial_and_three_times_previous(
    initial: float, cap: float, seed: int, steps: int
) -> None:
    b = Exponential(initial, cap=cap, jitter="decorrelated")
    rng = random.Random(seed)
    previous = 0.0
    for retry in range(1, steps + 1):
        d = b.delay(retry, previous, rng)
        assert initial <= d <= min(cap, 3 * max(previous, initial)) + 1e-12
        previous = d


@given(retry=retries, seed=seeds)
def test_linear_and_constant(retry: int, seed: int) -> None:
    assert Linear(0.5, 0.25, cap=5.0, jitter="none").delay(retry) == min(0.5 + 0.25 * (retry - 1), 5.0)
    assert Constant(0.3).delay(retry, rng=random.Random(seed)) == 0.3
    assert 0 <= Constant(0.3, jitter="full").delay(retry, rng=random.Random(seed)) <= 0.3


def test_jitter_actually_varies() -> None:
    rng = random.Random(7)
    values = {Exponential(1.0, jitter="full").delay(3, rng=rng) for _ in range(20)}
    assert len(values) == 20


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Exponential(0.1, jitter="sometimes"), "jitter must be one of"),  # type: ignore[arg-type]
        (lambda: Exponential(-1.0), "initial must be >= 0"),
        (lambda: Exponential(0.1, 0.5), "factor must be >= 1"),
        (lambda: Constant(-1), "seconds must be >= 0"),
        (lambda: Linear(0.1, -0.1), "must be >= 0"),
        (lambda: Exponential(0.1, cap=-1), "cap must be >= 0"),
        (lambda: Exponential(float("nan")), "initial must be >= 0"),
    ],
)
def test_bad_backoff_values_are_refused(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]
