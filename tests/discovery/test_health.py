"""Active health checks against real local servers (aiohttp, TCP) that fail on a schedule."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from meshkit.discovery import HealthStatus, Instance, Registry, connect
from meshkit.discovery.health import CheckPolicy, HealthChecker, HttpProbe, TcpProbe
from meshkit.errors import ConfigurationError


class ScheduledServer:
    """A real aiohttp server on a free port: ``GET /healthz`` number ``n`` (1-based) answers what ``schedule(n)``
    says: an HTTP status, or ``"hang"`` to never answer (until the server stops)."""

    def __init__(self, schedule: Callable[[int], int | str]) -> None:
        self.schedule = schedule
        self.requests = 0
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app)
        self.port = 0

    async def _healthz(self, request: web.Request) -> web.Response:
        self.requests += 1
        answer = self.schedule(self.requests)
        if answer == "hang":
            await self._release.wait()
            answer = 503
        assert isinstance(answer, int)
        return web.Response(status=answer, text="ok" if answer < 400 else "failing")

    async def __aenter__(self) -> ScheduledServer:
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        await self._runner.cleanup()


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    async with connect("memory://") as reg:
        yield reg


def _statuses(answers: str) -> Callable[[int], int | str]:
    """``"..xx."``: request n passes (200) where the n-th character is ``.``, fails (503) on ``x``, hangs on ``h``;
    past the end, the last character repeats."""

    def schedule(n: int) -> int | str:
        answer: dict[str, int | str] = {".": 200, "x": 503, "h": "hang"}
        return answer[answers[min(n, len(answers)) - 1]]

    return schedule


@pytest.mark.anyio
async def test_http_checks_mark_instances_with_thresholds(registry: Registry) -> None:
    policy = CheckPolicy(interval=60, timeout=5, healthy_threshold=2, unhealthy_threshold=3)
    async with ScheduledServer(_statuses("..xxx.x..")) as server:
        await registry.register(Instance("web", "w1", "127.0.0.1", server.port), ttl=60, keepalive=False)
        checker = HealthChecker(registry, "web", HttpProbe(), policy)
        try:
            history: list[HealthStatus | None] = []
            status = HealthStatus.PASSING
            for _ in range(9):
                transition = (await checker.check_once()).get(("web", "w1"))
                history.append(transition)
                status = transition or status
                in_rotation = [i.id for i in await registry.list("web")] == ["w1"]
                assert in_rotation == (status is HealthStatus.PASSING)
        finally:
            await checker.aclose()
    critical, passing = HealthStatus.CRITICAL, HealthStatus.PASSING
    # 2 passes, 3 failures (critical on the third), a pass, a failure (resets the streak), 2 passes (passing)
    assert history == [None, None, None, None, critical, None, None, None, passing]
    assert server.requests == 9


@pytest.mark.anyio
async def test_a_check_that_takes_too_long_fails(registry: Registry) -> None:
    policy = CheckPolicy(timeout=0.2, unhealthy_threshold=1, healthy_threshold=1)
    async with ScheduledServer(_statuses("h.")) as server:
        await registry.register(Instance("slow", "s1", "127.0.0.1", server.port), ttl=60, keepalive=False)
        checker = HealthChecker(registry, "slow", HttpProbe(), policy)
        try:
            assert await checker.check_once() == {("slow", "s1"): HealthStatus.CRITICAL}
            assert await registry.list("slow") == []
            assert await checker.check_once() == {("slow", "s1"): HealthStatus.PASSING}
        finally:
            await checker.aclose()


@pytest.mark.anyio
async def test_tcp_checks_follow_a_listener(registry: Registry) -> None:
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    await registry.register(Instance("db", "d1", "127.0.0.1", port), ttl=60, keepalive=False)
    checker = HealthChecker(registry, "db", TcpProbe(), CheckPolicy(timeout=5, unhealthy_threshold=2))
    try:
        assert await checker.check_once() == {}
        listener.close()
        await listener.wait_closed()
        assert await checker.check_once() == {}  # one failure is under the threshold
        assert await checker.check_once() == {("db", "d1"): HealthStatus.CRITICAL}
        assert await registry.list("db") == []
        assert [i.status for i in await registry.list("db", healthy_only=False)] == [HealthStatus.CRITICAL]
    finally:
        await checker.aclose()


@pytest.mark.anyio
async def test_the_checker_runs_on_its_interval_and_unhealthy_instances_leave_rotation(registry: Registry) -> None:
    policy = CheckPolicy(interval=0.02, timeout=5, healthy_threshold=2, unhealthy_threshold=2)
    async with ScheduledServer(_statuses("..xxxxxxxxxxxxxxx....")) as bad, ScheduledServer(_statuses(".")) as good:
        await registry.register(Instance("api", "bad", "127.0.0.1", bad.port), ttl=60, keepalive=False)
        await registry.register(Instance("api", "good", "127.0.0.1", good.port), ttl=60, keepalive=False)
        async with registry.watch("api") as changes, HealthChecker(registry, "api", HttpProbe(), policy):
            seen = []
            async with asyncio.timeout(60):
                async for change in changes:
                    seen.append((change.kind, change.instance.id, change.instance.status))
                    if len(seen) == 4:
                        break
        assert seen == [
            ("added", "bad", HealthStatus.PASSING),
            ("added", "good", HealthStatus.PASSING),
            ("changed", "bad", HealthStatus.CRITICAL),
            ("changed", "bad", HealthStatus.PASSING),
        ]
        assert bad.requests >= 19 and good.requests >= 19


@pytest.mark.anyio
async def test_instances_that_leave_are_forgotten(registry: Registry) -> None:
    async with ScheduledServer(_statuses("x")) as server:
        await registry.register(Instance("gone", "g1", "127.0.0.1", server.port), ttl=60, keepalive=False)
        checker = HealthChecker(registry, ["gone"], HttpProbe(), CheckPolicy(unhealthy_threshold=2))
        try:
            await checker.check_once()
            await registry.deregister("gone", "g1")
            assert await checker.check_once() == {}
            await registry.register(Instance("gone", "g1", "127.0.0.1", server.port), ttl=60, keepalive=False)
            assert await checker.check_once() == {}  # a new streak: one failure is under the threshold
        finally:
            await checker.aclose()


def test_policies_refuse_nonsense() -> None:
    with pytest.raises(ConfigurationError):
        CheckPolicy(interval=0)
    with pytest.raises(ConfigurationError):
        CheckPolicy(unhealthy_threshold=0)
