"""The ``rate_limit`` gateway plugin: algorithms on a fake clock, headers, keys, the LRU bound, and real Redis.

The local backend is tested by calling the hooks with hand-built requests and a fake clock (exact numbers). The
Redis backend runs against the machine's Redis (``MESHKIT_REDIS_URL``, default ``redis://127.0.0.1:6379/0``), each
test under its own key prefix, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from meshkit.errors import ConfigurationError
from meshkit.gateway.config import parse_seconds as parse_duration
from meshkit.gateway.plugin import Headers, PluginContext, ProxyRequest, Reply, RequestResult, ResponseHead
from meshkit.gateway.ratelimit import RateLimit, RateLimitOptions
from meshkit.testing import eventually
from tests.redis_keys import fresh_prefix

REDIS_URL = os.environ.get("MESHKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
DOWN_URL = "redis://127.0.0.1:1/0"


class FakeClock:
    """``context.clock``: a callable returning seconds, moved by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def plugin(clock: FakeClock | None = None, *, route: str | None = "orders", **options: Any) -> RateLimit:
    return RateLimit(options, PluginContext(clock=clock or FakeClock(), route=route))


def request(
    client: str = "198.51.100.7",
    *,
    consumer: str | None = None,
    route: str = "orders",
    path: str = "/api/orders",
    query: str = "",
    headers: Iterable[tuple[str, str]] = (),
) -> ProxyRequest:
    return ProxyRequest("GET", path, query, Headers(headers), client, peer=client, route=route, consumer=consumer)


def decide(limiter: RateLimit, req: ProxyRequest | None = None) -> Reply | None:
    """One local decision: must be synchronous (the gateway's fast path)."""
    result = limiter.request(req or request())
    assert not inspect.isawaitable(result), "the local backend must answer synchronously"
    return result


def passes(limiter: RateLimit, count: int, req: ProxyRequest | None = None) -> int:
    return sum(decide(limiter, req) is None for _ in range(count))


def response_headers(limiter: RateLimit, req: ProxyRequest, upstream: Iterable[tuple[str, str]] = ()) -> Headers:
    resp = ResponseHead(200, Headers(upstream))
    limiter.response(req, resp)
    return resp.headers


# -- options -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("1m", 60.0), ("1h", 3600.0), ("1d", 86400.0), ("500ms", 0.5), ("2.5", 2.5), (3, 3.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert RateLimitOptions(limit=1, window=text).window == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["1 minute", "s", "-1s", "", True, None])
def test_bad_durations_are_refused(bad: object) -> None:
    with pytest.raises(ValidationError, match="window"):
        RateLimitOptions(limit=1, window=bad)  # type: ignore[arg-type]


def test_options_are_checked() -> None:
    assert RateLimitOptions(limit=5).key == ["consumer", "ip"]
    assert RateLimitOptions(limit=5, key=["header:X-Api-Key"]).key == ["header:x-api-key"]
    with pytest.raises(ValidationError, match="burst applies to algorithm token_bucket only"):
        RateLimitOptions(limit=5, burst=10, algorithm="sliding_window")
    with pytest.raises(ValidationError, match="unknown key part 'path'"):
        RateLimitOptions(limit=5, key=["path"])
    with pytest.raises(ValidationError, match="listed twice"):
        RateLimitOptions(limit=5, key=["ip", "ip"])
    with pytest.raises(ValidationError, match="unknown key part"):
        RateLimitOptions(limit=5, key=["header:"])
    with pytest.raises(ValidationError, match="limit"):
        RateLimitOptions(limit=0)
    with pytest.raises(ValidationError, match="extra"):
        RateLimitOptions.model_validate({"limit": 5, "windw": "1s"})


def test_redis_backend_needs_a_redis_url() -> None:
    with pytest.raises(ConfigurationError, match="redis_url"):
        RateLimit({"limit": 5, "backend": "redis"}, PluginContext(clock=FakeClock()))
    with pytest.raises(ConfigurationError, match="not a Redis URL"):
        RateLimit({"limit": 5, "backend": "redis"}, PluginContext(clock=FakeClock(), redis_url="http://x"))


# -- token bucket ------------------------------------------------------------------------------------------------------


def test_token_bucket_spends_the_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    limiter = plugin(clock, limit=10, window="1s", burst=5)
    assert passes(limiter, 8) == 5  # a burst of 5, then the bucket is empty
    clock.advance(0.1)  # 10 a second: one token
    assert passes(limiter, 3) == 1
    clock.advance(0.25)  # two and a half tokens
    assert passes(limiter, 5) == 2
    clock.advance(60)  # never more than the burst
    assert passes(limiter, 10) == 5
    assert limiter.stats() == {
        "backend": "local",
        "algorithm": "token_bucket",
        "keys": 1,
        "allowed": 13,
        "limited": 13,
        "unavailable": 0,
        "evicted": 0,
    }


def test_token_bucket_headers_and_the_429() -> None:
    clock = FakeClock()
    limiter = plugin(clock, limit=10, window="1m")  # one token every 6 s, burst 10
    req = request()
    assert decide(limiter, req) is None
    headers = response_headers(limiter, req)
    assert headers.get("ratelimit-limit") == "10"
    assert headers.get("ratelimit-remaining") == "9"
    assert headers.get("ratelimit-reset") == "6"  # one token short of full
    assert headers.get("ratelimit-policy") == "10;w=60"
    assert passes(limiter, 9) == 9
    clock.advance(1)
    refused = decide(limiter)
    assert refused is not None
    assert refused.status == 429
    assert json.loads(refused.body) == {
        "error": "Too Many Requests",
        "status": 429,
        "message": "rate limit exceeded: 10 requests per 60 s",
    }
    assert refused.headers.get("retry-after") == "5"  # the next token is 5 s away
    assert refused.headers.get("ratelimit-remaining") == "0"
    assert refused.headers.get("ratelimit-limit") == "10"
    assert refused.headers.get("ratelimit-reset") == "59"  # 9 tokens * 6 s + 5 s


def test_burst_above_the_limit_is_the_advertised_limit() -> None:
    limiter = plugin(limit=10, window=1, burst=50)
    req = request()
    decide(limiter, req)
    headers = response_headers(limiter, req)
    assert (headers.get("ratelimit-limit"), headers.get("ratelimit-remaining")) == ("50", "49")
    assert headers.get("ratelimit-policy") == "10;w=1;burst=50"


def test_retry_after_is_a_whole_second_at_least() -> None:
    limiter = plugin(limit=1000, window=1, burst=1)
    assert decide(limiter) is None
    refused = decide(limiter)
    assert refused is not None
    assert refused.headers.get("retry-after") == "1"  # the token is 1 ms away


# -- sliding window ----------------------------------------------------------------------------------------------------


def test_sliding_window_weighs_the_previous_window() -> None:
    clock = FakeClock(1000.0)  # window 100 of 10 s starts here
    limiter = plugin(clock, limit=10, window="10s", algorithm="sliding_window")
    assert passes(limiter, 12) == 10
    refused = decide(limiter)
    assert refused is not None
    # the next window starts in 10 s, then the previous 10 weigh 10 * (1 - e/10) <= 9 after e = 1 s
    assert refused.headers.get("retry-after") == "11"
    assert refused.headers.get("ratelimit-reset") == "20"
    clock.now = 1010.9  # 10 * 0.91 + 1 > 10
    assert decide(limiter) is not None
    clock.now = 1011.0  # 10 * 0.9 + 1 = 10
    assert decide(limiter) is None
    clock.now = 1015.0  # 10 * 0.5 + 1 = 6 counted: 4 more
    assert passes(limiter, 6) == 4
    refused = decide(limiter)
    assert refused is not None
    # 5 in this window: the previous window's share has to fall to 4, 10 * (1 - e/10) <= 4 at e = 6
    assert refused.headers.get("retry-after") == "1"
    clock.now = 1040.0  # two windows later nothing is counted
    assert passes(limiter, 11) == 10


def test_sliding_window_headers() -> None:
    clock = FakeClock(1000.0)
    limiter = plugin(clock, limit=5, window="1m", algorithm="sliding_window")
    clock.now = 1020.0  # 1020 // 60 = 17: window 1020..1080
    req = request()
    assert passes(limiter, 2, req) == 2
    headers = response_headers(limiter, req)
    assert headers.get("ratelimit-limit") == "5"
    assert headers.get("ratelimit-remaining") == "3"
    assert headers.get("ratelimit-reset") == "120"  # both counted requests leave the sliding window at 1140
    assert headers.get("ratelimit-policy") == "5;w=60"


def test_headers_off_leaves_only_retry_after() -> None:
    limiter = plugin(limit=1, window=10, headers=False)
    req = request()
    assert decide(limiter, req) is None
    assert len(response_headers(limiter, req)) == 0
    refused = decide(limiter, req)
    assert refused is not None
    assert refused.headers.get("retry-after") == "10"
    assert "ratelimit-remaining" not in refused.headers


def test_the_most_restrictive_limit_fills_the_headers_and_replaces_the_upstreams() -> None:
    clock = FakeClock()
    everywhere = plugin(clock, route=None, limit=100, window=1)
    here = plugin(clock, limit=3, window=1)
    for n, order in enumerate(((everywhere, here), (here, everywhere))):
        req = request(client=f"192.0.2.{n + 1}")  # a fresh budget for each order
        for limiter in order:
            assert decide(limiter, req) is None
        upstream = [("ratelimit-limit", "7"), ("ratelimit-remaining", "7"), ("content-type", "text/plain")]
        headers = Headers(upstream)
        for limiter in order:
            limiter.response(req, ResponseHead(200, headers))
        assert headers.get_all("ratelimit-limit") == ["3"]
        assert headers.get_all("ratelimit-remaining") == ["2"]
        assert headers.get("content-type") == "text/plain"


# -- keys --------------------------------------------------------------------------------------------------------------


def test_default_key_is_the_consumer_else_the_ip() -> None:
    limiter = plugin(limit=2, window=60)
    alice, bob = request(consumer="alice"), request(consumer="bob")
    assert passes(limiter, 3, alice) == 2
    assert passes(limiter, 3, bob) == 2  # same address, another consumer: its own budget
    assert passes(limiter, 3, request()) == 2  # anonymous: by address
    assert passes(limiter, 3, request("203.0.113.50")) == 2
    assert passes(limiter, 1, request("203.0.113.50", consumer="carol")) == 1
    assert limiter.key_for(alice) == "meshkit:rl:orders:tb:60000:c=alice"
    assert limiter.key_for(request("203.0.113.50")) == "meshkit:rl:orders:tb:60000:ip=203.0.113.50"


def test_key_by_ip_ignores_the_consumer() -> None:
    limiter = plugin(limit=2, window=60, key=["ip"])
    assert passes(limiter, 1, request(consumer="alice")) == 1
    assert passes(limiter, 2, request(consumer="bob")) == 1


def test_key_by_consumer_puts_every_anonymous_caller_in_one_budget() -> None:
    limiter = plugin(limit=2, window=60, key=["consumer"])
    assert passes(limiter, 1, request("192.0.2.1")) == 1
    assert passes(limiter, 2, request("192.0.2.2")) == 1
    assert passes(limiter, 2, request("192.0.2.2", consumer="alice")) == 2


def test_key_by_route_on_a_global_plugin() -> None:
    limiter = plugin(route=None, limit=2, window=60, key=["route"])
    assert passes(limiter, 2, request("192.0.2.1", route="orders")) == 2
    assert passes(limiter, 1, request("192.0.2.2", route="orders")) == 0  # every caller of the route: one budget
    assert passes(limiter, 2, request("192.0.2.2", route="users")) == 2
    assert limiter.key_for(request(route="users")) == "meshkit:rl:global:tb:60000:r=users"
    both = plugin(route=None, limit=1, window=60, key=["route", "consumer", "ip"])
    assert both.key_for(request(consumer="alice", route="users")) == "meshkit:rl:global:tb:60000:r=users|c=alice"


def test_key_by_header() -> None:
    limiter = plugin(limit=1, window=60, key=["header:X-Api-Key"])
    assert passes(limiter, 2, request(headers=[("x-api-key", "k1")])) == 1
    assert passes(limiter, 2, request("192.0.2.9", headers=[("x-api-key", "k2")])) == 1
    assert passes(limiter, 2, request()) == 1  # no header: one budget of its own
    assert passes(limiter, 1, request(headers=[("x-api-key", "")])) == 1  # empty is not missing
    assert passes(limiter, 1, request(headers=[("x-api-key", "k1")])) == 0


def test_key_parts_cannot_be_forged_into_each_other() -> None:
    limiter = plugin(limit=1, window=60, key=["header:a", "header:b"])
    first = request(headers=[("a", "x|y"), ("b", "z")])
    second = request(headers=[("a", "x"), ("b", "y|z")])
    assert limiter.key_for(first) != limiter.key_for(second)
    huge = request(headers=[("a", "v" * 100_000)])
    assert len(limiter.key_for(huge)) < 200  # a flood of huge values cannot blow up the key table
    looks_hashed = request(headers=[("a", limiter.key_for(huge).rsplit("h=", 2)[1].split("|")[0])])
    assert limiter.key_for(looks_hashed) != limiter.key_for(huge)


def test_ipv6_clients_share_their_slash_64() -> None:
    limiter = plugin(limit=1, window=60, key=["ip"])
    assert passes(limiter, 1, request("2001:db8:1:2::1")) == 1
    assert passes(limiter, 1, request("2001:db8:1:2:ffff::9")) == 0  # same /64
    assert passes(limiter, 1, request("2001:db8:1:3::1")) == 1
    assert limiter.key_for(request("2001:db8:1:2::1")).endswith(":ip=2001:db8:1:2::/64")
    assert limiter.key_for(request("::ffff:192.0.2.1")).endswith(":ip=192.0.2.1")
    exact = plugin(limit=1, window=60, key=["ip"], ipv6_prefix=128)
    assert passes(exact, 1, request("2001:db8:1:2::1")) == 1
    assert passes(exact, 1, request("2001:db8:1:2::2")) == 1


def test_the_path_and_query_never_pick_the_budget() -> None:
    # the server normalises paths; here: whatever the path and query say, one route + caller is one budget
    limiter = plugin(limit=3, window=60)
    spellings = [
        request(path="/API/orders"),
        request(path="/api/orders/", query="x=1"),
        request(path="/api/%6Frders", query="cache-buster=2"),
    ]
    keys = {limiter.key_for(req) for req in spellings}
    assert keys == {"meshkit:rl:orders:tb:60000:ip=198.51.100.7"}
    assert [decide(limiter, req) is None for req in spellings] == [True, True, True]
    assert decide(limiter, request(path="/anything/else", query="z")) is not None


# -- memory bound ------------------------------------------------------------------------------------------------------


def test_the_key_table_is_bounded_least_recently_used_first() -> None:
    limiter = plugin(limit=1, window=3600, max_keys=3, key=["ip"])
    for n in (1, 2, 3):
        assert decide(limiter, request(f"192.0.2.{n}")) is None
    assert decide(limiter, request("192.0.2.1")) is not None  # .1 used again: .2 is now the oldest
    assert decide(limiter, request("192.0.2.4")) is None  # evicts .2
    assert limiter.stats()["keys"] == 3
    assert limiter.stats()["evicted"] == 1
    assert decide(limiter, request("192.0.2.2")) is None  # forgotten, so a fresh budget (evicts .3)
    assert decide(limiter, request("192.0.2.1")) is not None  # kept


def test_a_flood_of_addresses_stays_within_max_keys() -> None:
    limiter = plugin(limit=5, window=60, max_keys=1000, key=["ip"])
    for n in range(20_000):
        decide(limiter, request(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"))
    assert limiter.stats()["keys"] == 1000
    assert limiter.stats()["evicted"] == 19_000


@pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window"])
def test_idle_budgets_are_dropped(algorithm: str) -> None:
    clock = FakeClock()
    limiter = plugin(clock, limit=2, window=1, algorithm=algorithm, key=["ip"])
    decide(limiter, request("192.0.2.1"))
    decide(limiter, request("192.0.2.2"))
    clock.advance(0.2)
    decide(limiter, request("192.0.2.3"))
    assert limiter.stats()["keys"] == 3  # nobody is whole again yet
    clock.advance(2.1)
    decide(limiter, request("192.0.2.4"))
    # .1 and .2 are whole again (the same as no state) and go; at most two go per new key, so .3 waits its turn
    assert limiter.stats()["keys"] == 2
    assert limiter.stats()["evicted"] == 0


# -- Redis -------------------------------------------------------------------------------------------------------------


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with fresh_prefix(REDIS_URL, f"t-rl-{uuid.uuid4().hex[:12]}") as name:
        yield name


async def run(result: RequestResult) -> Reply | None:
    assert inspect.isawaitable(result), "the Redis backend answers with an awaitable"
    awaited: Awaitable[Reply | None] = result
    return await awaited


class Replica:
    """One "gateway replica": its own plugin instance, context and Redis connections."""

    def __init__(self, url: str = REDIS_URL, **options: Any) -> None:
        self.context = PluginContext(clock=FakeClock(), redis_url=url, route="orders")
        self.limiter = RateLimit({"backend": "redis", **options}, self.context)

    async def close(self) -> None:
        for closer in self.context.resources:
            await closer()


@pytest.mark.anyio
@pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window"])
async def test_two_replicas_share_one_budget(prefix: str, algorithm: str) -> None:
    replicas = [Replica(limit=5, window="1h", algorithm=algorithm, redis_prefix=prefix) for _ in range(2)]
    try:
        allowed = 0
        for n in range(20):
            allowed += await run(replicas[n % 2].limiter.request(request())) is None
        assert allowed == 5
        assert sum(r.limiter.stats()["allowed"] for r in replicas) == 5
        assert sum(r.limiter.stats()["limited"] for r in replicas) == 15
        # concurrent requests too: the script is atomic
        outcomes = await asyncio.gather(
            *(run(replicas[n % 2].limiter.request(request("192.0.2.77"))) for n in range(40))
        )
        assert sum(outcome is None for outcome in outcomes) == 5
    finally:
        for replica in replicas:
            await replica.close()


@pytest.mark.anyio
async def test_redis_headers_retry_after_and_ttls(prefix: str) -> None:
    replica = Replica(limit=5, window="1h", redis_prefix=prefix)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        req = request(consumer="alice")
        assert await run(replica.limiter.request(req)) is None
        headers = response_headers(replica.limiter, req)
        assert (headers.get("ratelimit-limit"), headers.get("ratelimit-remaining")) == ("5", "4")
        assert headers.get("ratelimit-reset") == "720"  # one token at 5 an hour
        for _ in range(4):
            assert await run(replica.limiter.request(request(consumer="alice"))) is None
        refused = await run(replica.limiter.request(request(consumer="alice")))
        assert refused is not None
        assert refused.status == 429
        assert 700 < int(refused.headers.get("retry-after") or 0) <= 720
        assert refused.headers.get("ratelimit-remaining") == "0"
        keys = [key.decode() async for key in client.scan_iter(match=f"{prefix}*")]
        assert keys == [f"{prefix}:orders:tb:3600000:c=alice"]
        assert 0 < await client.pttl(keys[0]) <= 3_600_000
    finally:
        await client.aclose()
        await replica.close()


@pytest.mark.anyio
@pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window"])
async def test_redis_keys_expire_by_themselves(prefix: str, algorithm: str) -> None:
    replica = Replica(limit=3, window=0.2, algorithm=algorithm, redis_prefix=prefix)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        for n in range(5):
            await run(replica.limiter.request(request(f"192.0.2.{n}")))

        async def keys_left() -> int:
            return len([key async for key in client.scan_iter(match=f"{prefix}*")])

        assert await keys_left() == 5
        for key in [key async for key in client.scan_iter(match=f"{prefix}*")]:
            assert 0 < await client.pttl(key) <= 400

        async def gone() -> bool:
            return await keys_left() == 0

        await eventually(gone, "the rate limit keys to expire")
    finally:
        await client.aclose()
        await replica.close()


@pytest.mark.anyio
async def test_redis_down_fails_open_with_a_throttled_warning(caplog: pytest.LogCaptureFixture) -> None:
    replica = Replica(DOWN_URL, limit=1, redis_timeout=2.0)
    clock = replica.context.clock
    assert isinstance(clock, FakeClock)
    try:
        with caplog.at_level(logging.WARNING, logger="meshkit.gateway.ratelimit"):
            for _ in range(3):
                assert await run(replica.limiter.request(request())) is None
            assert len(caplog.records) == 1
            clock.advance(10)
            assert await run(replica.limiter.request(request())) is None
            assert len(caplog.records) == 2
        record = caplog.records[0]
        assert record.getMessage() == "rate limit store unavailable: letting through requests"
        assert record.__dict__["route"] == "orders"
        assert replica.limiter.stats()["unavailable"] == 4
        assert replica.limiter.stats()["allowed"] == 0
    finally:
        await replica.close()


@pytest.mark.anyio
async def test_redis_down_fails_closed_with_503() -> None:
    replica = Replica(DOWN_URL, limit=1, fail_open=False)
    try:
        refused = await run(replica.limiter.request(request()))
        assert refused is not None
        assert refused.status == 503
        assert refused.headers.get("retry-after") == "1"
        assert json.loads(refused.body)["error"] == "Service Unavailable"
    finally:
        await replica.close()
