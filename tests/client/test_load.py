"""An instance dies under steady concurrent load: callers see no failure, and the dead instance stops getting calls.

Outlier ejections and open circuits last 10 minutes here, so the outcome does not depend on how fast the machine
is: the instance, once out of rotation, stays out for the rest of the test.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from meshkit._core.clock import MonotonicClock
from meshkit.client import ClientOptions, HttpTransport, Request, Response, ServiceClient, default_breaker
from meshkit.discovery import Instance, Registry, connect
from meshkit.discovery.health import OutlierPolicy
from meshkit.resilience import CircuitBreaker
from meshkit.testing import eventually
from tests.client.servers import Backend, backends, register

CONCURRENCY = 60


def long_breaker(name: str, clock: object) -> CircuitBreaker:
    return replace(default_breaker(name, MonotonicClock()), wait_in_open=600.0)


OPTIONS = ClientOptions(
    timeout=10.0,
    breaker=long_breaker,
    outlier=OutlierPolicy(consecutive_errors=5, base_ejection=600, max_ejection=600),
)


class CountingTransport:
    """Counts attempts per instance on the client side, then sends them over HTTP."""

    def __init__(self) -> None:
        self.inner = HttpTransport()
        self.attempts: Counter[str] = Counter()

    async def send(self, instance: Instance, request: Request, timeout: float | None) -> Response:
        self.attempts[instance.id] += 1
        return await self.inner.send(instance, request, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Load:
    """``CONCURRENCY`` callers in a loop of GETs until stopped; counts successes and keeps every failure."""

    def __init__(self, client: ServiceClient) -> None:
        self.client = client
        self.ok = 0
        self.failures: list[BaseException] = []
        self.bad_status: list[int] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _caller(self) -> None:
        while not self._stop.is_set():
            try:
                response = await self.client.get("/work")
            except Exception as exc:
                self.failures.append(exc)
            else:
                if response.status == 200:
                    self.ok += 1
                else:
                    self.bad_status.append(response.status)

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(CONCURRENCY)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    async with connect("memory://") as reg:
        yield reg


async def _warm_up(load: Load, servers: list[Backend]) -> None:
    await eventually(lambda: all(s.hits >= 30 for s in servers), "every instance to carry load")


async def _ejected(client: ServiceClient, instance_id: str) -> None:
    await eventually(lambda: instance_id not in {i.id for i in client.rotation}, f"{instance_id} ejected")


@pytest.mark.anyio
async def test_a_server_closed_mid_load_costs_no_call(registry: Registry) -> None:
    transport = CountingTransport()
    try:
        async with backends("s-0", "s-1", "s-2") as servers:
            await register(registry, "work", *servers)
            async with (
                ServiceClient("work", registry, options=OPTIONS, transport=transport) as client,
                Load(client) as load,
            ):
                await _warm_up(load, servers)
                await servers[0].close()  # the process is gone: its port refuses connections
                await _ejected(client, "s-0")
                await eventually(lambda: "s-0" not in client.outstanding, "the calls in flight to s-0 to end")
                attempts_to_dead = transport.attempts["s-0"]
                live_before = servers[1].hits + servers[2].hits
                ok_before = load.ok
                await eventually(lambda: load.ok >= ok_before + 600, "600 more calls after the ejection")
            assert transport.attempts["s-0"] == attempts_to_dead  # no attempt went to the dead instance any more
            assert servers[1].hits + servers[2].hits - live_before >= 600
    finally:
        await transport.aclose()
    assert load.failures == []
    assert load.bad_status == []
    assert load.ok > 600


@pytest.mark.anyio
async def test_a_dead_instance_stops_receiving_calls(registry: Registry) -> None:
    async with backends("s-0", "s-1", "s-2") as servers:
        await register(registry, "work", *servers)
        dead = servers[0]
        async with ServiceClient("work", registry, options=OPTIONS) as client, Load(client) as load:
            await _warm_up(load, servers)
            dead.mode = "drop"  # still listening, but every request it takes dies with its connection
            await _ejected(client, "s-0")
            # the calls that were on their way to it when it was ejected end (each with a retry elsewhere)
            await eventually(lambda: "s-0" not in client.outstanding, "the calls in flight to s-0 to end")
            hits_at_ejection = dead.hits
            ok_before = load.ok
            await eventually(lambda: load.ok >= ok_before + 600, "600 more calls after the ejection")
            # measured where it counts, on the server: the dead instance got nothing after it was ejected
            assert dead.hits == hits_at_ejection
    assert load.failures == []
    assert load.bad_status == []
