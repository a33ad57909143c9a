"""The pipeline against a real local HTTP server that fails on a schedule (first 2 requests and every 5th).

The breaker runs on a FakeClock so the test decides when the open wait is over; the requests are real.
Scenario (requests numbered as the server sees them; F = 503, S = 200):

    call A: r1 F, r2 F, r3 S  -> ok after 2 retries            window F F S
    call B: r4 S              -> ok                            window F F S S
    call C: r5 F              -> window F F S S F: 60% >= 50%, the circuit opens; the retry's next try fails
                                 fast with a 10 s hint that does not fit max_delay -> CircuitOpen
    call D:                   -> CircuitOpen, no request
    (10 s pass)               -> half-open
    call E: r6 S, call F: r7 S -> two good probes close the circuit
    call G: r8 S, call H: r9 S, call I: r10 F, r11 S -> ok after 1 retry
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import pytest

from meshkit.errors import CircuitOpen, Unavailable
from meshkit.resilience import BreakerState, BreakerTransition, CircuitBreaker, Constant, Retry, RetryAttempt, Timeout
from meshkit.resilience.events import Event
from meshkit.testing import FakeClock, FlakyHTTPServer

EXPECTED = ["ok 3", "ok 4", "open", "open", "ok 6", "ok 7", "ok 8", "ok 9", "ok 11"]


def fetch_sync(url: str) -> int:
    """The boundary: HTTP errors become meshkit errors."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(json.load(response)["n"])
    except urllib.error.HTTPError as exc:
        exc.close()  # an HTTPError holds the response and its socket
        if exc.code >= 500:
            raise Unavailable(f"{url} answered {exc.code}") from exc
        raise


async def fetch_async(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        if response.status >= 500:
            raise Unavailable(f"{url} answered {response.status}")
        return int((await response.json())["n"])


def policies(clock: FakeClock, events: list[Event]) -> tuple[Any, CircuitBreaker]:
    breaker = CircuitBreaker(
        name="flaky",
        window_size=5,
        minimum_calls=5,
        failure_rate_threshold=50,
        wait_in_open=10,
        half_open_calls=2,
        clock=clock,
        listeners=[events.append],
    )
    retry = Retry(attempts=3, backoff=Constant(0.0), max_delay=1.0, listeners=[events.append])
    return retry | breaker | Timeout(10.0), breaker


def check(server: FlakyHTTPServer, outcomes: list[str], events: list[Event]) -> None:
    assert outcomes == EXPECTED
    assert server.requests == 11
    assert server.failures == [1, 2, 5, 10]
    assert [(e.from_state, e.to_state) for e in events if isinstance(e, BreakerTransition)] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    retries = [e for e in events if isinstance(e, RetryAttempt)]
    # A: 2 retries; C: 1 retry (then the open circuit's hint ends it); I: 1 retry
    assert [(e.attempt, type(e.error).__name__) for e in retries] == [
        (1, "Unavailable"),
        (2, "Unavailable"),
        (1, "Unavailable"),
        (1, "Unavailable"),
    ]


def test_sync_pipeline_against_a_flaky_server() -> None:
    clock, events, outcomes = FakeClock(), list[Event](), list[str]()
    pipeline, breaker = policies(clock, events)
    with FlakyHTTPServer() as server:
        for i in range(9):
            if i == 4:
                clock.advance(10)
            try:
                outcomes.append(f"ok {pipeline.call(fetch_sync, server.url)}")
            except CircuitOpen:
                outcomes.append("open")
        check(server, outcomes, events)
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.anyio
async def test_async_pipeline_against_a_flaky_server() -> None:
    clock, events, outcomes = FakeClock(), list[Event](), list[str]()
    pipeline, breaker = policies(clock, events)
    with FlakyHTTPServer() as server:
        async with aiohttp.ClientSession() as session:
            for i in range(9):
                if i == 4:
                    clock.advance(10)
                try:
                    outcomes.append(f"ok {await pipeline.acall(fetch_async, session, server.url)}")
                except CircuitOpen:
                    outcomes.append("open")
        check(server, outcomes, events)
    assert breaker.metrics().not_permitted_calls == 2
