"""Two real processes share one registry (SQLite file, Redis server): each sees the other's instances, a clean exit
deregisters at once, and a killed process's instance expires when its heartbeats stop."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from meshkit.discovery import Change, Instance, Registry, Watch, connect
from meshkit.discovery.testing import until
from tests.discovery.etcd_server import EtcdServer, require_etcd

WORKER = Path(__file__).with_name("registry_worker.py")
REDIS_URL = os.environ.get("MESHKIT_REDIS_URL", "redis://127.0.0.1:6379/0")


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(60):
            return (await self.proc.stdout.readline()).decode().strip()

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        await self.proc.stdin.drain()


async def start_worker(url: str, service: str, instance_id: str, *options: str) -> Worker:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        url,
        service,
        instance_id,
        *options,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    worker = Worker(proc)
    assert await worker.line() == "ready"
    return worker


@pytest.fixture(params=["sqlite", "redis", "etcd"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, tuple[str, ...]]]:
    """A registry URL two processes can share, and the options both must pass."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}", ("poll_interval=0.02",)
        return
    if request.param == "etcd":
        with EtcdServer(require_etcd()) as server:
            yield server.url, (f"prefix=t-{uuid.uuid4().hex[:12]}/",)
        return
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError):
        pytest.skip(f"no Redis at {REDIS_URL}")
    prefix = f"t-reg-{uuid.uuid4().hex[:12]}:"
    try:
        yield REDIS_URL, (f"prefix={prefix}", "poll_interval=0.02")
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.unlink(*keys)
        await client.aclose()


def _open(url: str, options: tuple[str, ...]) -> Registry:
    parsed = dict(item.split("=", 1) for item in options)
    return connect(url, **{k: (float(v) if k == "poll_interval" else v) for k, v in parsed.items()})


@pytest.mark.anyio
async def test_two_processes_see_one_view(shared: tuple[str, tuple[str, ...]]) -> None:
    url, options = shared
    async with _open(url, options) as registry:
        await registry.register(Instance("procs", "parent", "127.0.0.1", 8000), ttl=30)
        async with registry.watch("procs") as changes:
            worker = await start_worker(url, "procs", "child", *options)
            try:
                seen = [(c.kind, c.instance.id) async for c in _take(changes, 2)]
                assert seen == [("added", "parent"), ("added", "child")]
                await worker.send("list")
                assert json.loads(await worker.line()) == ["child", "parent"]
                await worker.send("quit")
                assert await worker.line() == "closed"
                assert await worker.proc.wait() == 0
                assert [i.id for i in await registry.list("procs")] == ["parent"]  # at once: deregistered on close
                assert [(c.kind, c.instance.id) async for c in _take(changes, 1)] == [("removed", "child")]
            finally:
                if worker.proc.returncode is None:
                    worker.proc.kill()
                    await worker.proc.wait()


@pytest.mark.anyio
async def test_a_killed_process_expires(shared: tuple[str, tuple[str, ...]]) -> None:
    url, options = shared
    async with _open(url, options) as registry:
        worker = await start_worker(url, "killed", "victim", *options)
        try:
            assert [i.id for i in await registry.list("killed")] == ["victim"]
            worker.proc.kill()  # SIGKILL: no deregistration, the heartbeats just stop
            await worker.proc.wait()

            async def expired() -> bool:
                return await registry.list("killed", healthy_only=False) == []

            await until(expired, "the killed process's instance to expire (TTL 1 s)")
        finally:
            if worker.proc.returncode is None:
                worker.proc.kill()
                await worker.proc.wait()


async def _take(changes: Watch, n: int) -> AsyncIterator[Change]:
    for _ in range(n):
        async with asyncio.timeout(60):
            yield await anext(changes)
