"""What a saga is made of: :class:`Step` (an action and its compensation), :class:`Saga` (named, ordered steps) and
the :class:`SagaContext` every action and compensation receives."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshkit.errors import ConfigurationError

__all__ = ["Action", "Compensation", "Saga", "SagaContext", "Step"]

#: Names of sagas and steps: they appear in span names, logs and the dashboard.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")


@dataclass(slots=True)
class SagaContext:
    """What an action or a compensation sees.

    - ``saga_id``: the saga's id. Use it as the idempotency key of the calls a step makes (e.g. an
      ``Idempotency-Key`` header, or ``f"{ctx.saga_id}:charge"``): after a crash the step that was in flight runs
      again, and the service it calls must recognise the repeat.
    - ``name``: the saga's name.
    - ``data``: the input given to :meth:`Sagas.run` (as it reads back from JSON).
    - ``results``: the results of the steps done so far, by step name (as they read back from JSON).
    """

    saga_id: str
    name: str
    data: Mapping[str, Any]
    results: dict[str, Any] = field(default_factory=dict)


Action = Callable[[SagaContext], Awaitable[Any]]
Compensation = Callable[[SagaContext], Awaitable[Any]]


def _is_async(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 (an object with an async __call__ is fine too)
    return call is not None and not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"bad {what} name {name!r}",
            hint="use 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a saga: ``action(ctx)`` does it; ``compensate(ctx)`` (optional) undoes it after a later step
    failed. Both are ``async`` functions and must be idempotent (see :class:`SagaContext`).

    ``retry`` is how many more times a failing action is tried (with the backoff of :class:`Sagas`) before the
    saga gives up and compensates; 0 (the default) tries once.

    A step whose action failed is not undone (its own work is taken to be all or nothing), unless
    ``compensate_failed``: then its compensation runs too, first. Use it when a failure can leave the work done (a
    call whose answer was lost after the other side committed); the compensation must then be safe when there is
    nothing to undo, and cannot rely on ``ctx.results`` of this step. An action that returned a result that cannot
    be kept (not JSON) did its work, so it is always undone.
    """

    name: str
    action: Action
    compensate: Compensation | None = None
    retry: int = 0
    compensate_failed: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name, "step")
        if not _is_async(self.action):
            raise ConfigurationError(
                f"the action of step {self.name!r} must be an async function, not {self.action!r}",
                hint="define it with 'async def name(ctx: SagaContext) -> ...'",
            )
        if self.compensate is not None and not _is_async(self.compensate):
            raise ConfigurationError(
                f"the compensation of step {self.name!r} must be an async function, not {self.compensate!r}",
                hint="define it with 'async def name(ctx: SagaContext) -> None', or leave it out",
            )
        if self.compensate_failed and self.compensate is None:
            raise ConfigurationError(
                f"step {self.name!r} has compensate_failed=True but no compensation",
                hint="pass compensate=<async function>, or drop compensate_failed",
            )
        retry: object = self.retry  # (checked: callers may not be type-checked)
        if not isinstance(retry, int) or isinstance(retry, bool) or retry < 0:
            raise ConfigurationError(f"retry of step {self.name!r} must be an int >= 0, not {self.retry!r}")


@dataclass(frozen=True, slots=True, init=False)
class Saga:
    """A named sequence of steps: ``Saga("checkout", [Step("charge", charge, compensate=refund), ...])``.

    The name is how a saga left unfinished by a crash finds its definition again (:meth:`Sagas.register`), so it
    must not change while sagas of it may be running; neither should the order and names of its steps.
    """

    name: str
    steps: tuple[Step, ...]

    def __init__(self, name: str, steps: Sequence[Step]) -> None:
        _check_name(name, "saga")
        if isinstance(steps, Step) or not isinstance(steps, Sequence):
            raise ConfigurationError(f"the steps of saga {name!r} must be a list of Step, not {steps!r}")
        steps = tuple(steps)
        if not steps:
            raise ConfigurationError(f"saga {name!r} has no steps", hint="give it at least one Step")
        for step in steps:
            if not isinstance(step, Step):
                raise ConfigurationError(f"saga {name!r}: {step!r} is not a Step")
        seen: set[str] = set()
        for step in steps:
            if step.name in seen:
                raise ConfigurationError(f"saga {name!r} has two steps named {step.name!r}")
            seen.add(step.name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "steps", steps)

    def step(self, name: str) -> Step:
        """The step named ``name`` (``KeyError`` if there is none)."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)
