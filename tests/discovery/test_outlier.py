"""Passive outlier detection on a fake clock: exact ejections, growing intervals, return to rotation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit.discovery import Instance
from meshkit.discovery.health import OutlierDetector, OutlierPolicy
from meshkit.errors import ConfigurationError
from meshkit.testing import FakeClock

POLICY = OutlierPolicy(consecutive_errors=3, base_ejection=10.0, max_ejection=25.0, max_ejected_fraction=1.0)


def test_consecutive_errors_eject_for_a_growing_interval() -> None:
    clock = FakeClock()
    detector = OutlierDetector(POLICY, clock=clock)
    assert [detector.record("a", s) for s in (503, None)] == [False, False]
    assert detector.record("a", 500) is True  # the third error in a row
    assert detector.is_ejected("a") and detector.ejected_until("a") == 10.0
    assert detector.record("a", 503) is False  # calls that were in flight do not extend it
    clock.advance(9.9)
    assert detector.is_ejected("a")
    clock.advance(0.1)
    assert not detector.is_ejected("a") and detector.ejected_until("a") is None
    for _ in range(3):
        ejected = detector.record("a", None)
    assert ejected and detector.ejected_until("a") == 10.0 + 20.0  # the second ejection lasts twice as long
    clock.advance(20.0)
    for _ in range(3):
        detector.record_failure("a")
    assert detector.ejected_until("a") == 30.0 + 25.0  # capped by max_ejection


def test_a_success_resets_the_streak_and_4xx_is_not_an_error() -> None:
    detector = OutlierDetector(POLICY, clock=FakeClock())
    for status in (503, 503, 200, 503, 503, 404, 503, 503):
        assert detector.record("a", status) is False
    assert not detector.is_ejected("a")


def test_time_in_rotation_shrinks_the_next_ejection() -> None:
    clock = FakeClock()
    detector = OutlierDetector(POLICY, clock=clock)
    for _ in range(2):
        for _ in range(3):
            detector.record_failure("a")
        clock.advance(detector.policy.max_ejection)
    clock.advance(2 * POLICY.base_ejection)  # two quiet periods in rotation: the multiplier decays from 2 to 0
    for _ in range(3):
        detector.record_failure("a")
    assert detector.ejected_until("a") == clock.now() + POLICY.base_ejection


def test_available_skips_ejected_instances_and_never_ejects_too_many() -> None:
    clock = FakeClock()
    detector = OutlierDetector(OutlierPolicy(consecutive_errors=1, max_ejected_fraction=0.5), clock=clock)
    instances = [Instance("s", name, "127.0.0.1", 8000 + n) for n, name in enumerate("abc")]
    assert detector.available(instances) == instances
    assert detector.record_failure("a") is True
    assert detector.record_failure("b") is False  # a second ejection would be 2 of 3 known: over half
    assert [i.id for i in detector.available(instances)] == ["b", "c"]
    detector.forget("a")
    assert detector.record_failure("b") is True  # the first ejection is always allowed
    assert [i.id for i in detector.available(instances)] == ["a", "c"]


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ConfigurationError):
        OutlierPolicy(consecutive_errors=0)
    with pytest.raises(ConfigurationError):
        OutlierPolicy(base_ejection=10, max_ejection=5)
    with pytest.raises(ConfigurationError):
        OutlierPolicy(max_ejected_fraction=1.5)


# one step: ("call", status or None) or ("wait", seconds)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from([200, 404, 500, 503, None])),
        st.tuples(st.just("wait"), st.floats(min_value=0.0, max_value=40.0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_against_a_reference_model(script: list[tuple[str, int | float | None]]) -> None:
    """Ejected exactly when the n-th error in a row lands outside an ejection; in rotation exactly when it ends."""
    clock = FakeClock()
    detector = OutlierDetector(POLICY, clock=clock)
    errors, until, ejections = 0, float("-inf"), 0
    for op, value in script:
        if op == "wait":
            assert isinstance(value, float)
            clock.advance(value)
        else:
            now = clock.now()
            failed = value is None or (isinstance(value, int) and value >= 500)
            ejected = detector.record("a", value if isinstance(value, int) else None)
            if not failed:
                errors = 0
                assert not ejected
            elif until > now:
                assert not ejected
            else:
                errors += 1
                assert ejected == (errors == POLICY.consecutive_errors)
                if ejected:
                    errors = 0
                    ejections += 1
                    duration = detector.ejected_until("a")
                    assert duration is not None
                    # the length is base * multiplier (capped), the multiplier at most the ejection count
                    length = duration - now
                    assert POLICY.base_ejection - 1e-9 <= length <= POLICY.max_ejection + 1e-9
                    assert length <= POLICY.base_ejection * ejections + 1e-9
                    until = duration
        assert detector.is_ejected("a") == (until > clock.now())
