"""``memory://``: an in-process registry, the default for unit tests and monolith mode.

Each service keeps its live instances (with the monotonic time each lease ends) and a change log of its last
``retention`` entries. Expiry is lazy: every read removes (and logs) the instances whose lease ended, and a waiting
watcher wakes at the earliest end, so with a :class:`~meshkit.testing.FakeClock` expiry happens exactly when the test
advances time past it. One registry object is one registry: two ``connect("memory://")`` calls do not share state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from meshkit._core.clock import Clock
from meshkit.discovery.base import Capabilities, HealthStatus, Instance, LogEntry, Registry, Resync
from meshkit.errors import ConfigurationError

__all__ = ["MemoryRegistry", "from_url"]


@dataclass
class _Held:
    instance: Instance
    ttl: float
    expires: float  # clock.now() when the lease ends


@dataclass
class _Service:
    live: dict[str, _Held] = field(default_factory=dict)
    log: deque[tuple[int, LogEntry]] = field(default_factory=deque)
    seq: int = 0


class MemoryRegistry(Registry):
    capabilities = Capabilities(shared=False, durable=False)

    def __init__(self, *, retention: int = 10_000, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self.retention = retention
        self._services: dict[str, _Service] = {}
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return "MemoryRegistry()"

    def _service(self, name: str) -> _Service:
        svc = self._services.get(name)
        if svc is None:
            svc = self._services[name] = _Service()
        return svc

    def _log(self, svc: _Service, entry: LogEntry) -> None:
        svc.seq += 1
        svc.log.append((svc.seq, entry))
        while len(svc.log) > self.retention:
            svc.log.popleft()
        self._changed.set()
        self._changed = asyncio.Event()

    def _reap(self, svc: _Service) -> None:
        now = self.clock.now()
        for iid in [iid for iid, held in svc.live.items() if held.expires <= now]:
            del svc.live[iid]
            self._log(svc, LogEntry("removed", iid, None))

    async def _put(self, instance: Instance, ttl: float) -> Instance:
        svc = self._service(instance.service)
        self._reap(svc)
        wall = self.clock.wall()
        before = svc.live.get(instance.id)
        stored = replace(instance, registered=before.instance.registered if before else wall, last_seen=wall)
        svc.live[instance.id] = _Held(stored, ttl, self.clock.now() + ttl)
        if before is None:
            self._log(svc, LogEntry("added", instance.id, stored))
        elif before.instance != stored:
            self._log(svc, LogEntry("changed", instance.id, stored))
        return stored

    async def _touch(self, service: str, instance_id: str) -> bool:
        svc = self._service(service)
        self._reap(svc)
        held = svc.live.get(instance_id)
        if held is None:
            return False
        held.expires = self.clock.now() + held.ttl
        held.instance = replace(held.instance, last_seen=self.clock.wall())
        return True

    async def _remove(self, service: str, instance_id: str) -> bool:
        svc = self._service(service)
        self._reap(svc)
        if svc.live.pop(instance_id, None) is None:
            return False
        self._log(svc, LogEntry("removed", instance_id, None))
        return True

    async def _set_status(self, service: str, instance_id: str, status: HealthStatus) -> bool:
        svc = self._service(service)
        self._reap(svc)
        held = svc.live.get(instance_id)
        if held is None:
            return False
        if held.instance.status is not status:
            held.instance = replace(held.instance, status=status)
            self._log(svc, LogEntry("changed", instance_id, held.instance))
        return True

    async def _list(self, service: str) -> list[Instance]:
        svc = self._service(service)
        self._reap(svc)
        return [held.instance for held in svc.live.values()]

    async def _snapshot(self, service: str) -> tuple[list[Instance], str]:
        svc = self._service(service)
        self._reap(svc)
        return [held.instance for held in svc.live.values()], str(svc.seq)

    async def _changes(self, service: str, cursor: str) -> tuple[list[LogEntry], str]:
        svc = self._service(service)
        self._reap(svc)
        after = int(cursor)
        if after < svc.seq and (not svc.log or svc.log[0][0] > after + 1):
            raise Resync
        if after >= svc.seq:
            await self._wait(svc)
            self._reap(svc)
        entries = [entry for seq, entry in svc.log if seq > after]
        return entries, str(svc.seq)

    async def _wait(self, svc: _Service) -> None:
        """Until something changes, the earliest lease of ``svc`` ends, or the registry closes."""
        waits: list[Awaitable[Any]] = [self._changed.wait(), self._closing.wait()]
        if svc.live:
            earliest = min(held.expires for held in svc.live.values())
            waits.append(self.clock.asleep(max(earliest - self.clock.now(), 0.0)))
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _aclose(self) -> None:
        self._services.clear()


def from_url(url: str, **options: Any) -> MemoryRegistry:
    """``memory://`` (options: ``retention``, ``clock``)."""
    parts = urlsplit(url)
    if parts.scheme != "memory" or parts.netloc or parts.path.strip("/") or parts.query:
        raise ConfigurationError(f"not a memory registry URL: {url!r}", hint="use memory://")
    unknown = sorted(set(options) - {"retention", "clock"})
    if unknown:
        raise ConfigurationError(
            f"unknown memory registry option(s) {', '.join(map(repr, unknown))}", hint="known options: clock, retention"
        )
    return MemoryRegistry(**options)
