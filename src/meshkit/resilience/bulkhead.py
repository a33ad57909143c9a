"""Bulkheads: the seed's "don't let one slow dependency exhaust shared resources".

- :class:`Bulkhead` (semaphore): at most ``max_concurrent`` calls in flight; a caller that finds it full waits up
  to ``max_wait`` seconds in a FIFO queue of at most ``max_queue`` waiters, else gets
  :class:`~meshkit.errors.BulkheadFull`. Works for threads and tasks alike; a freed slot is handed to the first
  waiter directly, so nobody can jump the queue. Async callers wait on the policy's clock (a ``FakeClock`` in
  tests); a blocking caller's wait is a ``threading.Event`` wait, so its ``max_wait`` is real (wall) time.
- :class:`ThreadPoolBulkhead`: blocking calls run on a pool of ``max_workers`` threads of its own with at most
  ``max_queue`` calls waiting for a thread; beyond that, ``BulkheadFull``. Make one per downstream, as the seed
  does (``user_service_pool``, ``order_service_pool``, ...). Close it (or use ``with``) to stop its threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from meshkit._core.clock import Clock, MonotonicClock
from meshkit.errors import BulkheadFull, ConfigurationError
from meshkit.resilience._engine import CALL, CallInPool, Invocation, Layer, Plan, WaitForSlot, run_async
from meshkit.resilience.events import CallRejected, Events, Listener

__all__ = ["Bulkhead", "BulkheadMetrics", "ThreadPoolBulkhead"]

T = TypeVar("T")
P = ParamSpec("P")
_DEFAULT_INVOCATION = Invocation()


@dataclass(frozen=True, slots=True)
class BulkheadMetrics:
    in_flight: int
    waiting: int
    rejected: int
    max_concurrent: int


class _Waiter:
    __slots__ = ("abandoned", "event", "future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.granted = False
        self.abandoned = False
        self.loop = loop
        self.event: threading.Event | None = None if loop else threading.Event()
        self.future: asyncio.Future[None] | None = loop.create_future() if loop else None

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()
        elif self.loop is not None:
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


class _Slots:
    """The admission state of a semaphore bulkhead (shared by both drivers)."""

    def __init__(self, max_concurrent: int, max_queue: int | None) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.in_flight = 0
        self.rejected = 0
        self.waiters: deque[_Waiter] = deque()

    def try_enter(self) -> bool:
        with self.lock:
            if self.in_flight < self.max_concurrent and not self.waiters:
                self.in_flight += 1
                return True
            return False

    def leave(self) -> None:
        with self.lock:
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.abandoned:
                    waiter.granted = True  # the slot passes to the waiter: in_flight stays the same
                    waiter.wake()
                    return
            self.in_flight -= 1

    def _enqueue(self, loop: asyncio.AbstractEventLoop | None) -> _Waiter | bool:
        """Under the lock: True if a slot is free now, False if the queue is full, else a new waiter."""
        if self.in_flight < self.max_concurrent and not self.waiters:
            self.in_flight += 1
            return True
        if self.max_queue is not None and len(self.waiters) >= self.max_queue:
            return False
        waiter = _Waiter(loop)
        self.waiters.append(waiter)
        return waiter

    def _settle(self, waiter: _Waiter) -> bool:
        """Under the lock, after waiting: did the waiter get a slot? If not, it leaves the queue."""
        if waiter.granted:
            return True
        waiter.abandoned = True
        with contextlib.suppress(ValueError):  # leave() may have popped it already
            self.waiters.remove(waiter)
        return False

    def wait_sync(self, timeout: float) -> bool:
        with self.lock:
            waiter = self._enqueue(None)
        if isinstance(waiter, bool):
            return waiter
        assert waiter.event is not None
        waiter.event.wait(timeout)
        with self.lock:
            return self._settle(waiter)

    async def wait_async(self, timeout: float, clock: Clock) -> bool:
        with self.lock:
            waiter = self._enqueue(asyncio.get_running_loop())
        if isinstance(waiter, bool):
            return waiter
        assert waiter.future is not None
        try:
            async with clock.deadline(timeout):
                await waiter.future
        except TimeoutError:
            pass
        except BaseException:
            with self.lock:
                granted = self._settle(waiter)
            if granted:  # cancelled right after being handed a slot: pass it on
                self.leave()
            raise
        with self.lock:
            return self._settle(waiter)


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Bulkhead(Layer):
    """A semaphore bulkhead: at most ``max_concurrent`` calls at once (see the module docstring)."""

    max_concurrent: int = 10
    max_wait: float = 0.0
    max_queue: int | None = None
    name: str = "bulkhead"
    clock: Clock = field(default_factory=MonotonicClock, repr=False)
    listeners: Sequence[Listener] = field(default=(), repr=False)
    events: Events = field(init=False, repr=False)
    _slots: _Slots = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1; got {self.max_concurrent}")
        if not self.max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0; got {self.max_wait}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 or None; got {self.max_queue}")
        object.__setattr__(self, "events", Events(self.listeners))
        object.__setattr__(self, "_slots", _Slots(self.max_concurrent, self.max_queue))

    def metrics(self) -> BulkheadMetrics:
        s = self._slots
        with s.lock:
            return BulkheadMetrics(s.in_flight, len(s.waiters), s.rejected, s.max_concurrent)

    def plan(self, invocation: Invocation) -> Plan:
        slots = self._slots
        if not slots.try_enter():
            admitted = False
            if self.max_wait > 0:
                admitted = yield WaitForSlot(slots, self.max_wait, self.clock)
            if not admitted:
                with slots.lock:
                    slots.rejected += 1
                self.events.emit(CallRejected(self.name, "bulkhead_full"))
                raise BulkheadFull(self.name, max_concurrent=self.max_concurrent, max_wait=self.max_wait)
        try:
            return (yield CALL)
        finally:
            slots.leave()


class _Pool:
    """The admission state and the lazily started threads of a thread-pool bulkhead."""

    def __init__(self, policy: ThreadPoolBulkhead) -> None:
        self.policy = policy
        self.lock = threading.Lock()
        self.admitted = 0
        self.rejected = 0
        self.closed = False
        self.executor: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        p = self.policy
        with self.lock:
            if self.closed:
                raise ConfigurationError(f"thread-pool bulkhead {p.name!r} is closed")
            full = self.admitted >= p.max_workers + p.max_queue
            if full:
                self.rejected += 1
            else:
                self.admitted += 1
                if self.executor is None:
                    self.executor = ThreadPoolExecutor(p.max_workers, thread_name_prefix=f"meshkit-{p.name}")
                executor = self.executor
        if full:
            p.events.emit(CallRejected(p.name, "bulkhead_full"))
            raise BulkheadFull(p.name, max_concurrent=p.max_workers, max_wait=0.0)
        future = executor.submit(fn)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Future[Any]) -> None:
        with self.lock:
            self.admitted -= 1

    def close(self, wait: bool) -> None:
        with self.lock:
            self.closed = True
            executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=not wait)


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class ThreadPoolBulkhead(Layer):
    """Blocking calls on a bounded pool of threads of their own, with a bounded queue (see module docstring).

    In a pipeline, every layer inside this one runs on the pool's thread. From async code it lets a blocking
    function run without blocking the event loop (``await pool.acall(blocking_fn)``).
    """

    max_workers: int = 10
    max_queue: int = 0
    name: str = "threadpool"
    listeners: Sequence[Listener] = field(default=(), repr=False)
    events: Events = field(init=False, repr=False)
    _pool: _Pool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_workers < 1 or self.max_queue < 0:
            raise ValueError("max_workers must be >= 1 and max_queue >= 0")
        object.__setattr__(self, "events", Events(self.listeners))
        object.__setattr__(self, "_pool", _Pool(self))

    def metrics(self) -> BulkheadMetrics:
        p = self._pool
        with p.lock:
            running = min(p.admitted, self.max_workers)
            return BulkheadMetrics(running, p.admitted - running, p.rejected, self.max_workers)

    def plan(self, invocation: Invocation) -> Plan:
        return (yield CallInPool(self._pool))

    # Alone, this policy takes a *blocking* callable from async code, unlike every other policy's ``acall``.
    def acall(  # type: ignore[override]
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, T]:
        """``await pool.acall(blocking_fn, ...)``: run ``blocking_fn`` on this pool without blocking the loop."""
        return run_async(self.layers, 0, _DEFAULT_INVOCATION, fn, args, kwargs)  # type: ignore[arg-type]

    def close(self, *, wait: bool = True) -> None:
        """Stop the threads (after the running calls finish when ``wait``); later calls raise."""
        self._pool.close(wait)

    def __enter__(self) -> ThreadPoolBulkhead:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
