"""The Redis registry against a real server: the conformance suite, its layout, and bad input.

The machine's Redis (``MESHKIT_REDIS_URL``, default ``redis://127.0.0.1:6379/0``) is shared: every test uses its own
key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from meshkit.discovery import Instance, connect
from meshkit.discovery.base import Resync
from meshkit.discovery.redis import RedisRegistry, from_url
from meshkit.discovery.testing import SCENARIOS, Harness, Scenario, run_scenario
from meshkit.errors import ConfigurationError, Unavailable
from tests.redis_keys import fresh_prefix

REDIS_URL = os.environ.get("MESHKIT_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A fresh key prefix on the shared server; every key under it is deleted afterwards."""
    async with fresh_prefix(REDIS_URL, f"t-reg-{uuid.uuid4().hex[:12]}:") as name:
        yield name


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_conformance(scenario: Scenario, prefix: str) -> None:
    harness = Harness(lambda: connect(REDIS_URL, prefix=prefix, poll_interval=0.02), ttl=1.0)
    assert await run_scenario(scenario, harness)


@pytest.mark.anyio
async def test_layout_is_a_lease_key_an_index_and_a_log(prefix: str) -> None:
    async with connect(REDIS_URL, prefix=prefix) as registry:
        await registry.register(Instance("orders", "o-1", "10.0.0.1", 8001), ttl=30, keepalive=False)
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            key = f"{prefix}{{orders}}:i:o-1"
            assert 0 < await client.pttl(key) <= 30_000  # the key is the lease
            fields = await client.hgetall(key)
            assert fields["h"] == "passing" and fields["t"] == "30000"
            assert await client.zrange(f"{prefix}{{orders}}:idx", 0, -1) == ["o-1"]
            entries: list[tuple[str, dict[str, str]]] = await client.xrange(f"{prefix}{{orders}}:log")  # type: ignore[assignment]
            assert [fields["k"] for _, fields in entries] == ["added"]
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_a_trimmed_log_makes_a_watcher_resync(prefix: str) -> None:
    async with connect(REDIS_URL, prefix=prefix, log_maxlen=1, poll_interval=0.02) as registry:
        await registry.register(Instance("trim", "a", "h", 1), ttl=30, keepalive=False)
        _, cursor = await registry._snapshot("trim")
        for port in range(2, 400):  # far more changes than the log keeps (MAXLEN ~ trims whole stream nodes)
            await registry.register(Instance("trim", "a", "h", port), ttl=30, keepalive=False)
        with pytest.raises(Resync):
            await registry._changes("trim", cursor)


def test_urls_and_options() -> None:
    registry = from_url("redis://:secret@localhost:6390/2?prefix=x:&poll_interval=0.5&log_maxlen=7")
    assert isinstance(registry, RedisRegistry)
    assert (registry.prefix, registry.poll_interval, registry.log_maxlen) == ("x:", 0.5, 7)
    assert "secret" not in repr(registry)
    with pytest.raises(ConfigurationError, match="unknown Redis registry option 'nope'"):
        from_url("redis://localhost/0?nope=1")
    with pytest.raises(ConfigurationError, match="unknown Redis registry option"):
        from_url("redis://localhost/0", nope=1)
    with pytest.raises(ConfigurationError, match="bad value"):
        from_url("redis://localhost/0?poll_interval=soon")


@pytest.mark.anyio
async def test_an_unreachable_server_is_unavailable() -> None:
    async with connect("redis://127.0.0.1:1/0", connect_timeout=1) as registry:
        with pytest.raises(Unavailable, match="Redis registry"):
            await registry.list("orders")
