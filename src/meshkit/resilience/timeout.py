"""Timeout: a time budget for the layers inside it.

Async calls are cancelled when the budget is spent and :class:`~meshkit.errors.TimeoutExceeded` is raised.

Sync calls cannot be interrupted from outside their thread, so for them ``Timeout`` is *optimistic*: the call runs
to its end, and if it took longer than the budget its result is discarded and ``TimeoutExceeded`` is raised (so a
retry or fallback outside still sees a timeout). Give blocking I/O its own socket timeout as well; to bound the
caller's wait for real, put the call in a :class:`~meshkit.resilience.ThreadPoolBulkhead` and call it from async
code, where the timeout cancels the wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from meshkit._core.clock import Clock, MonotonicClock
from meshkit.errors import TimeoutExceeded
from meshkit.resilience._engine import CallWithin, DeadlineExpired, Invocation, Layer, Plan
from meshkit.resilience.events import Events, Listener, TimedOut

__all__ = ["Timeout"]


@dataclass(frozen=True, slots=True, repr=False)
class Timeout(Layer):
    """``Timeout(2.0)``: the layers inside get 2 seconds."""

    seconds: float
    name: str = "timeout"
    clock: Clock = field(default_factory=MonotonicClock, repr=False, compare=False)
    listeners: Sequence[Listener] = field(default=(), repr=False, compare=False)
    events: Events = field(init=False, repr=False, compare=False)
    _command: CallWithin = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"Timeout needs seconds > 0; got {self.seconds}")
        object.__setattr__(self, "events", Events(self.listeners))
        object.__setattr__(self, "_command", CallWithin(self.seconds, self.clock))  # immutable: built once

    def plan(self, invocation: Invocation) -> Plan:
        try:
            return (yield self._command)
        except DeadlineExpired:
            self.events.emit(TimedOut(self.name, self.seconds))
            raise TimeoutExceeded(
                f"{invocation.name or 'call'} took longer than {self.seconds:g}s ({self.name})", timeout=self.seconds
            ) from None
