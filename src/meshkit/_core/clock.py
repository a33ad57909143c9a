"""Time, injected.

Everything in meshkit that waits or measures time takes a :class:`Clock`, so tests run breakers, retries and
leases on a :class:`FakeClock` and assert exact transitions instead of sleeping.

Deadlines: ``clock.arm_deadline(seconds)`` (inside a task) cancels the current task when the time is up and returns a
handle whose ``disarm()`` says whether that happened; ``async with clock.deadline(seconds):`` wraps it with
``asyncio.timeout`` semantics (builtin ``TimeoutError``). The real clock keeps one queue of deadlines per event loop
and duration, with a single loop timer armed for the earliest: arming costs an append, not a timer-heap push and
cancel per call (``asyncio.timeout`` costs several microseconds a call; this is the hot path of every timed call).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from collections import deque
from types import TracebackType
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "DeadlineHandle", "DeadlineScope", "FakeClock", "MonotonicClock"]


class DeadlineHandle(Protocol):
    def disarm(self) -> bool:
        """Stop the deadline. True if it expired and cancelled the task (that cancellation is then consumed:
        the caller turns the ``CancelledError`` into a timeout)."""
        ...


@runtime_checkable
class Clock(Protocol):
    """Where meshkit reads and spends time."""

    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch (for timestamps that leave the process)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""
        ...

    async def asleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds``."""
        ...

    def arm_deadline(self, seconds: float) -> DeadlineHandle:
        """Cancel the current task after ``seconds`` unless disarmed first."""
        ...

    def deadline(self, seconds: float) -> DeadlineScope:
        """``async with clock.deadline(s):`` raises builtin ``TimeoutError`` if the body takes longer than ``s``."""
        ...


class DeadlineScope:
    """``asyncio.timeout`` semantics on any :class:`Clock`."""

    __slots__ = ("_clock", "_handle", "_seconds", "expired")

    def __init__(self, clock: Clock, seconds: float) -> None:
        self._clock = clock
        self._seconds = seconds
        self._handle: DeadlineHandle | None = None
        self.expired = False

    async def __aenter__(self) -> DeadlineScope:
        self._handle = self._clock.arm_deadline(self._seconds)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._handle is not None
        self.expired = self._handle.disarm()
        if self.expired and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


def _current_task() -> asyncio.Task[object]:
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("a deadline needs a running asyncio task")
    return task


class _Armed:
    """One armed deadline: a task and when it must stop."""

    __slots__ = ("cancelling", "done", "expired", "queue", "task", "when")

    done: bool
    expired: bool

    def __init__(self, queue: deque[_Armed], task: asyncio.Task[object], when: float) -> None:
        self.queue = queue
        self.task = task
        self.when = when
        self.cancelling = task.cancelling()
        self.done = self.expired = False
        queue.append(self)

    def fire(self) -> None:
        self.expired = True
        self.task.cancel()

    def disarm(self) -> bool:
        self.done = True
        q = self.queue
        while q and q[0].done:
            q.popleft()
        if self.expired:
            return self.task.uncancel() <= self.cancelling
        return False


class _LoopDeadlines:
    """The armed deadlines of one duration on one loop. Deadlines of one duration are armed in time order, so
    the queue is sorted: one loop timer for the head is enough."""

    __slots__ = ("entries", "loop", "seconds", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.loop = loop
        self.seconds = seconds
        self.entries: deque[_Armed] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def arm(self, task: asyncio.Task[object]) -> _Armed:
        armed = _Armed(self.entries, task, self.loop.time() + self.seconds)
        if self.timer is None:
            self.timer = self.loop.call_at(armed.when, self._check)
        return armed

    def _check(self) -> None:
        self.timer = None
        now = self.loop.time()
        q = self.entries
        while q:
            head = q[0]
            if head.done:
                q.popleft()
            elif head.when <= now:
                q.popleft()
                head.fire()
            else:
                self.timer = self.loop.call_at(head.when, self._check)
                return


class MonotonicClock:
    """The real clock: ``time.monotonic`` and the running event loop's timers."""

    __slots__ = ("_last", "_loops")

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, _LoopDeadlines]] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[asyncio.AbstractEventLoop | None, dict[float, _LoopDeadlines]] = (None, {})

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def arm_deadline(self, seconds: float) -> DeadlineHandle:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a running asyncio task")
        loop = task.get_loop()
        last_loop, queues = self._last
        if last_loop is not loop:
            queues = self._loops.setdefault(loop, {})
            self._last = (loop, queues)
        q = queues.get(seconds)
        if q is None:
            q = queues[seconds] = _LoopDeadlines(loop, seconds)
        return q.arm(task)

    def deadline(self, seconds: float) -> DeadlineScope:
        return DeadlineScope(self, seconds)

    def __repr__(self) -> str:
        return "MonotonicClock()"


class FakeClock:
    """A clock that moves only when told to.

    - ``now()`` starts at ``start`` and moves with :meth:`advance`.
    - ``sleep()`` (sync) records the sleep and advances time at once: a single thread has nobody else to do it.
    - ``await asleep()`` records the sleep and waits until :meth:`advance` moves time past its end; with
      ``auto_advance=True`` it advances time itself and returns at once (handy for retry tests).
    - deadlines cancel their task when :meth:`advance` moves time past them.

    Every sleep is appended to :attr:`sleeps` so tests can assert the exact delays chosen.
    Use it from one thread and one event loop.
    """

    def __init__(self, start: float = 0.0, *, wall_start: float = 1_700_000_000.0, auto_advance: bool = False):
        self._now = start
        self._wall_offset = wall_start - start
        self.auto_advance = auto_advance
        self.sleeps: list[float] = []
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, asyncio.Future[None] | _FakeArmed]] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(seconds, 0.0))

    async def asleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.auto_advance or seconds <= 0:
            self.advance(max(seconds, 0.0))
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def pending(self) -> int:
        """How many sleeps and deadlines are waiting for time to move."""
        return sum(1 for _, _, t in self._timers if not (t.done() if isinstance(t, asyncio.Future) else t.done))

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper and deadline that is due, in time order."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if isinstance(timer, asyncio.Future):
                if not timer.done():
                    timer.set_result(None)
            elif not timer.done:
                timer.fire()
        self._now = target

    async def wait_for_sleepers(self, count: int = 1, *, max_turns: int = 10_000) -> None:
        """Let other tasks run until at least ``count`` of them wait on this clock."""
        for _ in range(max_turns):
            if self.pending >= count:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"expected {count} sleepers on the fake clock, found {self.pending}")

    def arm_deadline(self, seconds: float) -> DeadlineHandle:
        armed = _FakeArmed(_current_task())
        heapq.heappush(self._timers, (self._now + seconds, next(self._seq), armed))
        return armed

    def deadline(self, seconds: float) -> DeadlineScope:
        return DeadlineScope(self, seconds)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now})"


class _FakeArmed:
    __slots__ = ("cancelling", "done", "expired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.cancelling = task.cancelling()
        self.done = False
        self.expired = False

    def fire(self) -> None:
        self.expired = True
        self.done = True
        self.task.cancel()

    def disarm(self) -> bool:
        self.done = True
        if self.expired:
            return self.task.uncancel() <= self.cancelling
        return False
