from __future__ import annotations

import logging

import pytest

from meshkit.resilience import Constant, Events, Retry, RetryAttempt
from meshkit.resilience.events import Event
from meshkit.testing import FakeClock


def test_a_failing_listener_is_logged_and_never_changes_the_outcome(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    retry = Retry(attempts=2, backoff=Constant(0), clock=FakeClock(), listeners=[broken, seen.append])
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("first")
        return "ok"

    with caplog.at_level(logging.ERROR, logger="meshkit.resilience"):
        assert retry.call(flaky) == "ok"
    assert [type(e) for e in seen] == [RetryAttempt]  # later listeners still ran
    assert "listener failed" in caplog.text


def test_subscribe_and_unsubscribe() -> None:
    events = Events()
    seen: list[Event] = []
    assert not events
    unsubscribe = events.subscribe(seen.append)
    assert events
    event = RetryAttempt("r", 1, 0.5, None)
    events.emit(event)
    unsubscribe()
    events.emit(event)
    assert seen == [event]
