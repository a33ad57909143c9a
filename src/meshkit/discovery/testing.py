"""The conformance suite every registry backend passes.

Each scenario is ``async def scenario(harness) -> None``. The :class:`Harness` opens new registry objects on the
backend under test (for a shared backend, every one reaches the same data: one file, one server, one key prefix) and
says how time passes: on a :class:`~meshkit.testing.FakeClock` the scenario advances it; on the real clock it waits
for conditions with generous deadlines (never fixed sleeps) while short real TTLs run out. Use it from pytest::

    @pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
    async def test_conformance(scenario):
        clock = FakeClock()
        await run_scenario(scenario, Harness(lambda: connect("memory://", clock=clock), clock=clock))
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from meshkit.discovery.base import Change, HealthStatus, Instance, Registry, Watch
from meshkit.testing import DEADLINE, FakeClock

__all__ = ["SCENARIOS", "Harness", "Recorder", "Scenario", "requires", "run_scenario", "until"]


@dataclass
class Harness:
    """How a scenario reaches the backend under test."""

    open: Callable[[], Registry]
    clock: FakeClock | None = None  # None: the real clock, real TTLs
    ttl: float = 1.0  # a short TTL in seconds (on a fake clock any value works)

    async def settle(self) -> None:
        """Let every ready task run (a fake clock's sleepers wake on advance, then need turns)."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def pass_time(self, seconds: float, *, steps: int = 10) -> None:
        """On a fake clock, move time forward in ``steps`` (so heartbeats get their turns); on the real clock,
        nothing: real time passes while the scenario waits for a condition."""
        if self.clock is None:
            return
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            await self.settle()


Scenario = Callable[[Harness], Awaitable[None]]


def requires(*capabilities: str) -> Callable[[Scenario], Scenario]:
    """Mark a scenario as needing backend capabilities (``shared``, ``durable``)."""

    def mark(scenario: Scenario) -> Scenario:
        scenario.requires = capabilities  # type: ignore[attr-defined]
        return scenario

    return mark


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = DEADLINE) -> None:
    """Wait until ``await condition()`` holds, checking often; fail naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


class Recorder:
    """Consumes a watch in a task of its own and keeps the changes."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.changes: list[Change] = []
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for change in self.watch:
            self.changes.append(change)

    def seen(self) -> list[tuple[str, str]]:
        return [(c.kind, c.instance.id) for c in self.changes]

    async def wait_for(self, count: int, harness: Harness) -> None:
        async def enough() -> bool:
            if self._task.done():
                self._task.result()  # a failed watch fails the scenario with its own error
            await harness.pass_time(0.0, steps=1)
            return len(self.changes) >= count

        await until(enough, f"{count} watch events (have {self.seen()})")

    async def started(self, harness: Harness) -> None:
        """Wait until the watch has read its snapshot (it has nothing to yield when the service is empty)."""

        async def ready() -> bool:
            await harness.pass_time(0.0, steps=1)
            return self.watch.ready.is_set()

        await until(ready, "the watch to read its snapshot")

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.watch.aclose()


def _instance(service: str, iid: str, port: int = 8000, **fields: object) -> Instance:
    return Instance(service, iid, "127.0.0.1", port, **fields)  # type: ignore[arg-type]


async def register_list_deregister(h: Harness) -> None:
    async with h.open() as registry:
        a = _instance("conf.crud", "a", 8001, version="1.2.0", metadata={"zone": "eu-1"}, tags=("web", "v1"))
        b = _instance("conf.crud", "b", 8002)
        lease_a = await registry.register(a, ttl=60, keepalive=False)
        await registry.register(b, ttl=60, keepalive=False)
        listed = await registry.list("conf.crud")
        assert [i.id for i in listed] == ["a", "b"]
        assert listed[0] == a, f"{listed[0]} != {a}"
        assert listed[0].metadata == {"zone": "eu-1"} and listed[0].tags == ("web", "v1")
        assert listed[0].version == "1.2.0" and listed[0].address == "127.0.0.1:8001"
        assert listed[0].registered > 0 and listed[0].last_seen >= listed[0].registered
        assert lease_a.instance == a and lease_a.instance.registered > 0
        assert await registry.list("conf.other") == []
        assert await registry.deregister("conf.crud", "a") is True
        assert [i.id for i in await registry.list("conf.crud")] == ["b"]
        assert await registry.deregister("conf.crud", "a") is False
        assert await registry.heartbeat("conf.crud", "a") is False


async def missed_heartbeat_expires(h: Harness) -> None:
    async with h.open() as registry:
        lease = await registry.register(_instance("conf.ttl", "a"), ttl=h.ttl, keepalive=False)
        assert [i.id for i in await registry.list("conf.ttl")] == ["a"]
        await h.pass_time(h.ttl * 1.5)

        async def gone() -> bool:
            return await registry.list("conf.ttl", healthy_only=False) == []

        await until(gone, "the instance whose heartbeat was missed to expire")
        assert await registry.heartbeat("conf.ttl", "a") is False
        await lease.heartbeat()  # a lease that finds itself expired registers again
        assert lease.reregistrations == 1
        assert [i.id for i in await registry.list("conf.ttl")] == ["a"]


async def heartbeats_keep_an_instance(h: Harness) -> None:
    async with h.open() as registry:
        lease = await registry.register(_instance("conf.alive", "a"), ttl=h.ttl)
        first = lease.instance.last_seen

        async def renewed_past_ttl() -> bool:
            await h.pass_time(lease.interval, steps=1)
            return lease.renewals >= 4  # four renewals a third of a TTL apart: more than one TTL has passed

        await until(renewed_past_ttl, "four heartbeats")
        listed = await registry.list("conf.alive")
        assert [i.id for i in listed] == ["a"]
        assert listed[0].last_seen > first
        assert lease.reregistrations == 0


async def watch_delivers_changes_in_order(h: Harness) -> None:
    async with h.open() as registry:
        await registry.register(_instance("conf.watch", "x"), ttl=60, keepalive=False)
        recorder = Recorder(registry.watch("conf.watch"))
        try:
            await recorder.wait_for(1, h)
            await registry.register(_instance("conf.watch", "a", 8001), ttl=60, keepalive=False)
            await registry.set_status("conf.watch", "a", HealthStatus.CRITICAL)
            await registry.set_status("conf.watch", "a", HealthStatus.CRITICAL)  # no change, no event
            await registry.register(_instance("conf.watch", "b", 8002), ttl=60, keepalive=False)
            await registry.register(_instance("conf.watch", "b", 8002), ttl=60, keepalive=False)  # the same again
            await registry.register(_instance("conf.watch", "b", 8003), ttl=60, keepalive=False)  # moved
            await registry.deregister("conf.watch", "a")
            await registry.register(_instance("conf.watch", "e"), ttl=h.ttl, keepalive=False)
            await h.pass_time(h.ttl * 1.5)
            await recorder.wait_for(8, h)
            assert recorder.seen() == [
                ("added", "x"),
                ("added", "a"),
                ("changed", "a"),
                ("added", "b"),
                ("changed", "b"),
                ("removed", "a"),
                ("added", "e"),
                ("removed", "e"),
            ]
            changed_a, changed_b, removed_a = recorder.changes[2], recorder.changes[4], recorder.changes[5]
            assert changed_a.instance.status is HealthStatus.CRITICAL
            assert changed_b.instance.port == 8003
            assert removed_a.instance.status is HealthStatus.CRITICAL  # what the watcher last knew
        finally:
            await recorder.aclose()


async def healthy_only_filters(h: Harness) -> None:
    async with h.open() as registry:
        await registry.register(_instance("conf.health", "a"), ttl=60, keepalive=False)
        await registry.register(_instance("conf.health", "b"), ttl=60, keepalive=False)
        await registry.register(_instance("conf.health", "c", status=HealthStatus.WARNING), ttl=60, keepalive=False)
        assert await registry.set_status("conf.health", "b", HealthStatus.CRITICAL) is True
        assert [i.id for i in await registry.list("conf.health")] == ["a"]
        every = await registry.list("conf.health", healthy_only=False)
        assert [(i.id, i.status) for i in every] == [
            ("a", HealthStatus.PASSING),
            ("b", HealthStatus.CRITICAL),
            ("c", HealthStatus.WARNING),
        ]
        await registry.set_status("conf.health", "b", HealthStatus.PASSING)
        assert [i.id for i in await registry.list("conf.health")] == ["a", "b"]
        assert await registry.set_status("conf.health", "nobody", HealthStatus.PASSING) is False


async def closing_deregisters(h: Harness) -> None:
    registry = h.open()
    lease = await registry.register(_instance("conf.close", "a"), ttl=60)
    async with await registry.register(_instance("conf.close", "b"), ttl=60):
        assert [i.id for i in await registry.list("conf.close")] == ["a", "b"]
    assert [i.id for i in await registry.list("conf.close")] == ["a"]  # leaving the lease deregistered b
    if registry.capabilities.shared:
        async with h.open() as other:
            assert [i.id for i in await other.list("conf.close")] == ["a"]
            await registry.aclose()
            assert await other.list("conf.close", healthy_only=False) == []  # at once, not after the TTL
    else:
        await registry.aclose()
    assert lease._task is None
    assert registry.closed
    await registry.aclose()  # twice is fine


@requires("shared")
async def two_registries_see_one_view(h: Harness) -> None:
    async with h.open() as one, h.open() as two:
        recorder = Recorder(two.watch("conf.shared"))
        try:
            await recorder.started(h)
            await one.register(_instance("conf.shared", "a"), ttl=60)
            await two.register(_instance("conf.shared", "b"), ttl=60)
            for registry in (one, two):
                assert [i.id for i in await registry.list("conf.shared")] == ["a", "b"]
            await one.set_status("conf.shared", "b", HealthStatus.CRITICAL)
            assert [i.id for i in await two.list("conf.shared")] == ["a"]
            await one.deregister("conf.shared", "a")
            assert [i.id for i in await two.list("conf.shared", healthy_only=False)] == ["b"]
            await recorder.wait_for(4, h)
            assert recorder.seen() == [("added", "a"), ("added", "b"), ("changed", "b"), ("removed", "a")]
        finally:
            await recorder.aclose()


async def closing_ends_watches(h: Harness) -> None:
    registry = h.open()
    await registry.register(_instance("conf.endwatch", "a"), ttl=60)
    recorder = Recorder(registry.watch("conf.endwatch"))
    await recorder.wait_for(1, h)
    await registry.aclose()
    await until(lambda: _done(recorder), "the watch to end when its registry closed")
    await recorder.aclose()


async def _done(recorder: Recorder) -> bool:
    return recorder._task.done()


SCENARIOS: list[Scenario] = [
    register_list_deregister,
    missed_heartbeat_expires,
    heartbeats_keep_an_instance,
    watch_delivers_changes_in_order,
    healthy_only_filters,
    closing_deregisters,
    two_registries_see_one_view,
    closing_ends_watches,
]


async def run_scenario(scenario: Scenario, harness: Harness) -> bool:
    """Run one scenario; False (without running it) if the backend lacks a capability it requires."""
    needs: tuple[str, ...] = getattr(scenario, "requires", ())
    probe = harness.open()
    capabilities = probe.capabilities
    await probe.aclose()
    if not all(getattr(capabilities, need) for need in needs):
        return False
    await scenario(harness)
    return True
