"""Fallback: answer with a substitute when the layers inside fail with chosen errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshkit.errors import MeshkitError
from meshkit.resilience._engine import CALL, ErrorFilter, Invocation, Layer, Plan, matches
from meshkit.resilience.events import Events, FallbackUsed, Listener

__all__ = ["Fallback"]

_UNSET: Any = object()


@dataclass(frozen=True, slots=True, repr=False)
class Fallback(Layer):
    """``Fallback(value=[])`` or ``Fallback(handler=lambda exc: cached())``, on ``on`` errors.

    By default only meshkit's own errors (timeouts, open circuits, rejections, ...) are replaced: a bug in the
    wrapped code should not turn silently into a default value. ``handler`` is a plain function (it runs in both
    sync and async pipelines); keep it cheap and non-blocking.
    """

    value: Any = _UNSET
    handler: Callable[[BaseException], Any] | None = None
    on: ErrorFilter = MeshkitError
    name: str = "fallback"
    listeners: Sequence[Listener] = field(default=(), repr=False, compare=False)
    events: Events = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.value is _UNSET) == (self.handler is None):
            raise ValueError("Fallback needs exactly one of value= or handler=")
        object.__setattr__(self, "events", Events(self.listeners))

    def plan(self, invocation: Invocation) -> Plan:
        try:
            return (yield CALL)
        except Exception as exc:
            if not matches(self.on, exc):
                raise
            self.events.emit(FallbackUsed(self.name, exc))
            return self.value if self.handler is None else self.handler(exc)
