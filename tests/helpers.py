"""Small helpers for resilience tests: waiting for conditions with generous deadlines, never fixed sleeps, and
services served over real HTTP."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from meshkit import Service, discovery, messaging
from meshkit.client import HttpTransport
from meshkit.discovery import Registry
from meshkit.runner.serve import Served, bind, bring_down, bring_up
from meshkit.runtime import RunContext

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


@contextlib.asynccontextmanager
async def served_over_http(folder: Path, *services: Service) -> AsyncIterator[tuple[list[Served], Registry]]:
    """``services`` started in this order, each on a free loopback port over real HTTP and registered, on a memory
    broker and registry (their calls go over HTTP); stopped, in the runner's way, on exit."""
    served: list[Served] = []
    transport = HttpTransport()
    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        try:
            for n, service in enumerate(services):
                ctx = RunContext(broker, registry, transport, data_dir=folder / f"{service.name}-{n}")
                served.append(await bring_up(service, ctx, "127.0.0.1", bind("127.0.0.1", 0)))
            yield served, registry
        finally:
            await bring_down(served, grace=0)
            await transport.aclose()
