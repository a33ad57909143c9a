"""Small helpers for resilience tests: waiting for conditions with generous deadlines, never fixed sleeps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

DEADLINE = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE, *, every: float = 0.001) -> None:
    """The blocking twin of :func:`meshkit.testing.eventually`, for threads and server start-ups."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class Gauge:
    """Counts calls in flight and remembers the most seen at once (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.done = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1
            self.done += 1
