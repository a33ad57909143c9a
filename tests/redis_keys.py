"""A fresh key prefix on the shared Redis server for one test: what every Redis-backed test file needs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

aioredis = pytest.importorskip("redis.asyncio")


async def reachable(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def fresh_prefix(url: str, name: str) -> AsyncIterator[str]:
    """``name`` as a key prefix; every key under it is deleted afterwards and none may be left (skips: no Redis)."""
    if not await reachable(url):
        pytest.skip(f"no Redis at {url}")
    yield name
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{name}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.unlink(*keys[start : start + 1000])
        left = [key async for key in client.scan_iter(match=f"{name}*", count=1000)]
        assert not left, f"keys left behind: {left[:5]}"
    finally:
        await client.aclose()
