"""The circuit breaker against a naive reference model, driven by hypothesis.

Calls are driven through the breaker's plan (the same generator both drivers run), so several calls can be in
flight at once: that is what half-open admission, late results and abandoned probes are about.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from meshkit.errors import CircuitOpen, Rejected
from meshkit.resilience import BreakerState, BreakerTransition, CircuitBreaker
from meshkit.resilience._engine import CALL, Invocation, Plan
from meshkit.testing import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Boom(Exception):
    pass


class NotCounted(Exception):
    pass


@dataclass
class Model:
    """The breaker as plainly as it can be written: lists and recomputation, no rings or buckets."""

    window: str
    size: int
    minimum: int
    threshold: float
    slow_threshold: float
    slow_after: float | None
    wait: float
    probes: int
    state: BreakerState = CLOSED
    generation: int = 0
    opened_at: float = 0.0
    history: list[tuple[float, bool, bool]] = field(default_factory=list)
    tripped: tuple[int, int, int] = (0, 0, 0)
    admitted: int = 0
    done: list[tuple[bool, bool]] = field(default_factory=list)
    not_permitted: int = 0
    transitions: list[tuple[BreakerState, BreakerState, float]] = field(default_factory=list)

    def move(self, to: BreakerState, now: float, totals: tuple[int, int, int]) -> None:
        self.transitions.append((self.state, to, now))
        self.state = to
        self.generation += 1
        if to is OPEN:
            self.opened_at, self.tripped = now, totals
        elif to is HALF_OPEN:
            self.admitted, self.done = 0, []
        else:
            self.history = []

    def refresh(self, now: float) -> None:
        if self.state is OPEN and now - self.opened_at >= self.wait:
            self.move(HALF_OPEN, now, self.tripped)

    def window_totals(self, now: float) -> tuple[int, int, int]:
        if self.window == "count":
            kept = self.history[-self.size :]
        else:
            kept = [h for h in self.history if math.floor(h[0]) > math.floor(now) - self.size]
        return len(kept), sum(f for _, f, _ in kept), sum(s for _, _, s in kept)

    def bad(self, totals: tuple[int, int, int], minimum: int) -> bool:
        calls, failed, slow = totals
        return calls >= minimum and (
            failed * 100 >= self.threshold * calls or slow * 100 >= self.slow_threshold * calls
        )

    def start(self, now: float) -> int | None:
        self.refresh(now)
        if self.state is CLOSED:
            return self.generation
        if self.state is HALF_OPEN and self.admitted < self.probes:
            self.admitted += 1
            return self.generation
        self.not_permitted += 1
        return None

    def finish(self, generation: int, now: float, failed: bool, duration: float) -> None:
        if generation != self.generation:
            return
        slow = self.slow_after is not None and duration > self.slow_after
        if self.state is CLOSED:
            self.history.append((now, failed, slow))
            totals = self.window_totals(now)
            minimum = min(self.minimum, self.size) if self.window == "count" else self.minimum
            if self.bad(totals, minimum):
                self.move(OPEN, now, totals)
        elif self.state is HALF_OPEN:
            self.done.append((failed, slow))
            if len(self.done) >= self.probes:
                totals = (len(self.done), sum(f for f, _ in self.done), sum(s for _, s in self.done))
                self.move(OPEN if self.bad(totals, 1) else CLOSED, now, totals)

    def abandon(self, generation: int) -> None:
        if generation == self.generation and self.state is HALF_OPEN:
            self.admitted -= 1

    def metrics(self, now: float) -> tuple[BreakerState, float, float, int, int, int, int]:
        self.refresh(now)
        if self.state is CLOSED:
            calls, failed, slow = self.window_totals(now)
        elif self.state is OPEN:
            calls, failed, slow = self.tripped
        else:
            calls = len(self.done)
            failed = sum(f for f, _ in self.done)
            slow = sum(s for _, s in self.done)

        def rate(x: int) -> float:
            return x * 100.0 / calls if calls else 0.0

        return (self.state, rate(failed), rate(slow), calls, failed, slow, self.not_permitted)


@dataclass
class InFlight:
    plan: Plan
    generation: int
    started: float


class BreakerMachine(RuleBasedStateMachine):
    calls = Bundle("calls")

    @initialize(
        window=st.sampled_from(["count", "time"]),
        size=st.integers(1, 5),
        minimum=st.integers(1, 5),
        threshold=st.sampled_from([25.0, 50.0, 100.0]),
        slow_threshold=st.sampled_from([50.0, 100.0]),
        slow_after=st.sampled_from([None, 1.0]),
        wait=st.sampled_from([0.5, 1.0, 3.0]),
        probes=st.integers(1, 3),
    )
    def setup(
        self,
        window: str,
        size: int,
        minimum: int,
        threshold: float,
        slow_threshold: float,
        slow_after: float | None,
        wait: float,
        probes: int,
    ) -> None:
        self.clock = FakeClock()
        self.seen: list[BreakerTransition] = []
        self.breaker = CircuitBreaker(
            name="model",
            window=window,  # type: ignore[arg-type]
            window_size=size,
            minimum_calls=minimum,
            failure_rate_threshold=threshold,
            slow_call_rate_threshold=slow_threshold,
            slow_call_duration=slow_after,
            wait_in_open=wait,
            half_open_calls=probes,
            failure_on=Boom,
            ignore=(NotCounted, Rejected),
            clock=self.clock,
            listeners=[self.record_event],
        )
        self.model = Model(window, size, minimum, threshold, slow_threshold, slow_after, wait, probes)

    def record_event(self, event: object) -> None:
        if isinstance(event, BreakerTransition):
            self.seen.append(event)

    @rule(seconds=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 3.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(target=calls)
    def start(self) -> InFlight | None:
        now = self.clock.now()
        expected = self.model.start(now)
        plan = self.breaker.plan(Invocation())
        try:
            command = next(plan)
        except CircuitOpen as exc:
            assert expected is None, "breaker refused a call the model admits"
            if self.model.state is OPEN:
                assert exc.retry_after == max(self.model.opened_at + self.model.wait - now, 0.0)
            return None
        assert command is CALL
        assert expected is not None, f"breaker admitted a call the model refuses (model: {self.model.state})"
        return InFlight(plan, expected, now)

    def _finish(self, call: InFlight | None, outcome: str) -> None:
        if call is None:
            return
        now = self.clock.now()
        try:
            if outcome == "ok":
                call.plan.send("result")
            else:
                errors: dict[str, BaseException] = {
                    "fail": Boom(),
                    "other": KeyError("x"),
                    "ignored": NotCounted(),
                    "cancel": asyncio.CancelledError(),
                }
                call.plan.throw(errors[outcome])
        except StopIteration as stop:
            assert outcome in {"ok", "other"} and (outcome == "other" or stop.value == "result")
        except (Boom, KeyError, NotCounted, asyncio.CancelledError):
            assert outcome != "ok"
        else:
            raise AssertionError("a breaker plan must finish after one call")
        if outcome in {"ignored", "cancel"}:
            self.model.abandon(call.generation)
        else:
            self.model.finish(call.generation, now, outcome == "fail", now - call.started)

    @rule(call=consumes(calls), outcome=st.sampled_from(["ok", "fail", "fail", "other", "ignored", "cancel"]))
    def finish(self, call: InFlight | None, outcome: str) -> None:
        self._finish(call, outcome)

    @invariant()
    def same_as_model(self) -> None:
        if not hasattr(self, "model"):
            return
        now = self.clock.now()
        expected = self.model.metrics(now)
        m = self.breaker.metrics()
        actual = (m.state, m.failure_rate, m.slow_call_rate, m.calls, m.failed_calls, m.slow_calls)
        assert (*actual, m.not_permitted_calls) == expected
        assert [(e.from_state, e.to_state, e.at) for e in self.seen] == self.model.transitions


BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_breaker_matches_reference_model = BreakerMachine.TestCase
