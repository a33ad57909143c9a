"""The decision core of the resilience policies and the two drivers that carry it out.

Each policy writes its decisions once, as a *plan*: a generator that yields commands and receives outcomes.

- ``yield CALL`` runs the layers inside this one; the plan receives their result or has their exception thrown in.
- ``yield Sleep(seconds, clock)`` waits.
- ``yield CallWithin(seconds, clock)`` runs the inner layers under a deadline; if it expires, ``DeadlineExpired``
  is thrown into the plan.
- ``yield WaitForSlot(slots, timeout, clock)`` waits for a bulkhead slot; the plan receives ``True`` or ``False``.
- ``yield CallInPool(pool)`` runs the inner layers on a worker thread of a thread-pool bulkhead.

The plan never does I/O. :func:`run_sync` and :func:`run_async` are the only two places that call, sleep, wait and
time out, so sync and async callers share one core (the shape tenacity and urllib3 use: the core decides, thin
drivers act). A pipeline is a flat tuple of layers, outermost first; the drivers recurse one layer at a time.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload

from meshkit._core.clock import Clock, DeadlineHandle

if TYPE_CHECKING:
    from concurrent.futures import Future

__all__ = [
    "CALL",
    "CallInPool",
    "CallWithin",
    "DeadlineExpired",
    "ErrorFilter",
    "Invocation",
    "Layer",
    "Pipeline",
    "Plan",
    "Policy",
    "Sleep",
    "WaitForSlot",
    "matches",
    "run_async",
    "run_sync",
]

P = ParamSpec("P")
T = TypeVar("T")


class _Call:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CALL"


CALL = _Call()


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float
    clock: Clock


@dataclass(frozen=True, slots=True)
class CallWithin:
    seconds: float
    clock: Clock


class Slots(Protocol):
    """What a bulkhead's slot pool offers the drivers for waiting."""

    def wait_sync(self, timeout: float) -> bool: ...

    async def wait_async(self, timeout: float, clock: Clock) -> bool: ...


@dataclass(frozen=True, slots=True)
class WaitForSlot:
    slots: Slots
    timeout: float
    clock: Clock


class Pool(Protocol):
    """What a thread-pool bulkhead offers the drivers: admission happens inside ``submit``."""

    def submit(self, fn: Callable[[], T]) -> Future[T]: ...


@dataclass(frozen=True, slots=True)
class CallInPool:
    pool: Pool


Command = _Call | Sleep | CallWithin | WaitForSlot | CallInPool
Plan = Generator[Command, Any, Any]


ErrorFilter = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""Which errors a policy acts on: exception types, or a predicate."""


def matches(spec: ErrorFilter, error: BaseException) -> bool:
    """Does ``error`` pass the filter ``spec``?"""
    if isinstance(spec, type | tuple):
        return isinstance(error, spec)
    return bool(spec(error))


class DeadlineExpired(Exception):
    """Thrown into the plan that yielded :class:`CallWithin` when its deadline passes."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """What the caller says about one operation.

    ``idempotent=False`` marks an operation that must not run twice (the seed: "never blindly retry
    POST /payments"); :class:`~meshkit.resilience.Retry` then retries only errors that prove nothing was sent.
    """

    idempotent: bool = True
    name: str | None = None


_DEFAULT = Invocation()


class Policy(abc.ABC):
    """An immutable resilience policy. ``a | b`` is a pipeline in which ``a`` wraps ``b``.

    Use it explicitly (``policy.call(fn, *args)``, ``await policy.acall(fn, *args)``) or as a decorator on a sync
    or async function.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def layers(self) -> tuple[Layer, ...]:
        """The layers of this policy, outermost first."""

    def __or__(self, other: Policy) -> Pipeline:
        if not isinstance(other, Policy):
            return NotImplemented
        return Pipeline((*self.layers, *other.layers))

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the blocking callable ``fn(*args, **kwargs)`` under this policy."""
        return run_sync(self.layers, 0, _DEFAULT, fn, args, kwargs)  # type: ignore[no-any-return]

    def acall(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
        """Run ``await fn(*args, **kwargs)`` under this policy (``await policy.acall(fn, ...)``)."""
        return run_async(self.layers, 0, _DEFAULT, fn, args, kwargs)

    def options(self, *, idempotent: bool = True, name: str | None = None) -> Bound:
        """This policy applied to operations described by ``idempotent`` and ``name``."""
        return Bound(self.layers, Invocation(idempotent=idempotent, name=name))

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        return _decorate(self.layers, _DEFAULT, fn)


class Layer(Policy):
    """A policy that is one layer of a pipeline: it has a plan."""

    __slots__ = ()

    @property
    def layers(self) -> tuple[Layer, ...]:
        return (self,)

    @abc.abstractmethod
    def plan(self, invocation: Invocation) -> Plan:
        """The decisions of this policy for one call (see the module docstring)."""

    def __repr__(self) -> str:
        """Only the settings that differ from the defaults: ``Retry(attempts=5)``."""
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.repr or not f.init:
                continue
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            if default is dataclasses.MISSING or value != default:
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class Pipeline(Policy):
    """Policies composed with ``|``: the first is the outermost. Immutable."""

    __slots__ = ("layers",)  # a plain slot, not a property: it is read on every call
    layers: tuple[Layer, ...]

    def __init__(self, layers: tuple[Layer, ...]) -> None:
        if not layers:
            raise ValueError("a pipeline needs at least one policy")
        object.__setattr__(self, "layers", layers)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Pipeline is immutable; compose a new one with |")

    def __repr__(self) -> str:
        return " | ".join(repr(layer) for layer in self.layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.layers == other.layers

    def __hash__(self) -> int:
        return hash(self.layers)


class Bound:
    """A policy bound to an :class:`Invocation` (see :meth:`Policy.options`)."""

    __slots__ = ("_invocation", "_layers")

    def __init__(self, layers: tuple[Layer, ...], invocation: Invocation) -> None:
        self._layers = layers
        self._invocation = invocation

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return run_sync(self._layers, 0, self._invocation, fn, args, kwargs)  # type: ignore[no-any-return]

    def acall(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
        return run_async(self._layers, 0, self._invocation, fn, args, kwargs)

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        return _decorate(self._layers, self._invocation, fn)


def _decorate(layers: tuple[Layer, ...], invocation: Invocation, fn: Callable[P, Any]) -> Callable[P, Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            return await run_async(layers, 0, invocation, fn, args, kwargs)

        return async_wrapper

    @functools.wraps(fn)
    def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        return run_sync(layers, 0, invocation, fn, args, kwargs)

    return sync_wrapper


class _Stopwatch:
    """The sync stand-in for a deadline: a blocking call cannot be interrupted from outside its thread, so the
    sync driver measures it and reports it as timed out when it returns late (its result is then discarded)."""

    __slots__ = ("_clock", "_end")

    def __init__(self, clock: Clock, seconds: float) -> None:
        self._clock = clock
        self._end = clock.now() + seconds

    def disarm(self) -> bool:
        return self._clock.now() > self._end


@dataclass(frozen=True, slots=True)
class _InPool:
    pool: Pool
    index: int


def _interpret(
    layers: tuple[Layer, ...], start: int, invocation: Invocation, is_async: bool
) -> Generator[Any, Any, Any]:
    """Walk the plans of ``layers[start:]`` as one stack; yield only the effects a driver must carry out.

    Effects: ``CALL`` (call the wrapped function), :class:`Sleep`, :class:`WaitForSlot`, ``_InPool`` (run the
    layers from ``index`` on in a pool thread). Each driver answers with the outcome, or throws the error in.
    """
    plans: list[Plan] = []
    timers: list[tuple[int, DeadlineHandle | _Stopwatch]] = []  # (stack depth, handle) of armed deadlines only
    n = len(layers)
    ok = True
    payload: Any = None
    descend = True
    command: Command
    while True:
        if descend:
            k = start + len(plans)
            if k == n:
                try:
                    payload = yield CALL
                    ok = True
                except BaseException as exc:
                    payload, ok = exc, False
                descend = False
                continue
            plan = layers[k].plan(invocation)
            try:
                command = next(plan)
            except StopIteration as stop:
                payload, ok, descend = stop.value, True, False
                continue
            except BaseException as exc:
                payload, ok, descend = exc, False, False
                continue
            plans.append(plan)
        else:
            if not plans:
                if ok:
                    return payload
                raise payload
            plan = plans[-1]
            if (
                timers
                and timers[-1][0] == len(plans)
                and timers.pop()[1].disarm()
                and (ok or isinstance(payload, asyncio.CancelledError))
            ):
                payload, ok = DeadlineExpired(), False
            try:
                command = plan.send(payload) if ok else plan.throw(payload)
            except StopIteration as stop:
                plans.pop()
                payload, ok = stop.value, True
                continue
            except BaseException as exc:
                plans.pop()
                payload, ok = exc, False
                continue

        # plans[-1] asked for `command`
        if command is CALL:
            descend = True
            continue
        if type(command) is CallWithin:
            clock = command.clock
            handle = clock.arm_deadline(command.seconds) if is_async else _Stopwatch(clock, command.seconds)
            timers.append((len(plans), handle))
            descend = True
            continue
        effect = _InPool(command.pool, start + len(plans)) if isinstance(command, CallInPool) else command
        descend = False
        try:
            payload = yield effect
            ok = True
        except BaseException as exc:
            payload, ok = exc, False


def run_sync(
    layers: tuple[Layer, ...],
    i: int,
    invocation: Invocation,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The sync driver: carry out the effects of ``layers[i:]`` around the blocking ``fn``."""
    if i == len(layers):
        return fn(*args, **kwargs)
    steps = _interpret(layers, i, invocation, False)
    try:
        effect = next(steps)
        while True:
            value: Any = None
            try:
                if effect is CALL:
                    value = fn(*args, **kwargs)
                elif type(effect) is Sleep:
                    effect.clock.sleep(effect.seconds)
                elif type(effect) is WaitForSlot:
                    value = effect.slots.wait_sync(effect.timeout)
                else:
                    ctx = contextvars.copy_context()
                    call = functools.partial(ctx.run, run_sync, layers, effect.index, invocation, fn, args, kwargs)
                    value = effect.pool.submit(call).result()
            except BaseException as exc:
                effect = steps.throw(exc)
            else:
                effect = steps.send(value)
    except StopIteration as stop:
        return stop.value


async def run_async(
    layers: tuple[Layer, ...],
    i: int,
    invocation: Invocation,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The async driver: carry out the effects of ``layers[i:]`` around the awaitable ``fn``."""
    if i == len(layers):
        return await fn(*args, **kwargs)
    steps = _interpret(layers, i, invocation, True)
    try:
        effect = next(steps)
        while True:
            value: Any = None
            try:
                if effect is CALL:
                    value = await fn(*args, **kwargs)
                elif type(effect) is Sleep:
                    await effect.clock.asleep(effect.seconds)
                elif type(effect) is WaitForSlot:
                    value = await effect.slots.wait_async(effect.timeout, effect.clock)
                else:
                    ctx = contextvars.copy_context()
                    call = functools.partial(
                        ctx.run, _run_blocking_inner, layers, effect.index, invocation, fn, args, kwargs
                    )
                    value = await asyncio.wrap_future(effect.pool.submit(call))
            except BaseException as exc:
                effect = steps.throw(exc)
            else:
                effect = steps.send(value)
    except StopIteration as stop:
        return stop.value


def _run_blocking_inner(
    layers: tuple[Layer, ...],
    i: int,
    invocation: Invocation,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Inside a thread-pool bulkhead the rest of the pipeline runs on a worker thread, so ``fn`` must block."""
    if inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!r} is async, but a ThreadPoolBulkhead runs blocking callables on "
            "its threads; use Bulkhead (a semaphore) for async calls"
        )
    return run_sync(layers, i, invocation, fn, args, kwargs)
