"""The response cache: RFC 9111 rules on a fake clock (memory backend) and sharing through a real Redis."""

from __future__ import annotations

import inspect
import os
import time
import uuid
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from meshkit.errors import ConfigurationError, Unavailable
from meshkit.gateway.cache import STALE_MARGIN, ResponseCache
from meshkit.gateway.config import parse_seconds as parse_duration
from meshkit.gateway.plugin import Headers, PluginContext, ProxyRequest, Reply, ResponseHead
from meshkit.testing import FakeClock, eventually
from tests.redis_keys import fresh_prefix

REDIS_URL = os.environ.get("MESHKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
DATE = "Tue, 14 Nov 2023 22:13:20 GMT"


def make_request(
    path: str = "/products/1",
    *,
    method: str = "GET",
    query: str = "",
    headers: list[tuple[str, str]] | None = None,
    consumer: str | None = None,
    route: str = "products",
) -> ProxyRequest:
    return ProxyRequest(
        method=method,
        path=path,
        query=query,
        headers=Headers([("host", "api.example.com"), *(headers or [])]),
        client="198.51.100.1",
        route=route,
        consumer=consumer,
    )


def make_cache(clock: FakeClock | None = None, **options: Any) -> ResponseCache:
    context = PluginContext(clock=(clock or FakeClock()).now, route="products")
    return ResponseCache(ResponseCache.Options.model_validate(options), context)


def lookup(cache: ResponseCache, req: ProxyRequest) -> Reply | None:
    result = cache.request(req)
    assert not inspect.isawaitable(result), "the memory backend answers synchronously"
    return result


def upstream(
    cache: ResponseCache,
    req: ProxyRequest,
    *,
    status: int = 200,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b'{"id":1}',
) -> ResponseHead:
    """What the gateway does after a miss: the head through ``response``, the body through ``response_body``."""
    resp = ResponseHead(status, Headers([("content-type", "application/json"), *(headers or [])]))
    cache.response(req, resp)
    assert cache.response_body(req, resp, body) == body
    return resp


def fetch(cache: ResponseCache, req: ProxyRequest, **response: Any) -> tuple[str, int, Headers, bytes]:
    """One request: ``("HIT", ...)`` answered by the cache, or ``("UPSTREAM", ...)`` after calling the upstream."""
    reply = lookup(cache, req)
    if reply is not None:
        return "HIT", reply.status, reply.headers, reply.body
    resp = upstream(cache, req, **response)
    return "UPSTREAM", resp.status, resp.headers, response.get("body", b'{"id":1}')


# -- hits, misses, freshness ----------------------------------------------------------------------------------------


def test_miss_then_hit_with_age_and_x_cache() -> None:
    clock = FakeClock()
    cache = make_cache(clock)
    source, status, headers, _ = fetch(cache, make_request(), headers=[("etag", '"v1"')])
    assert (source, status, headers.get("x-cache")) == ("UPSTREAM", 200, "MISS")
    clock.advance(7.5)
    source, status, headers, body = fetch(cache, make_request())
    assert (source, status, body) == ("HIT", 200, b'{"id":1}')
    assert headers.get("x-cache") == "HIT"
    assert headers.get("age") == "7"
    assert headers.get("etag") == '"v1"'
    assert headers.get("content-type") == "application/json"
    assert cache.stats() == {"entries": 1, "hits": 1, "misses": 1, "stores": 1}


def test_default_ttl_expiry() -> None:
    clock = FakeClock()
    cache = make_cache(clock, ttl="30s")
    fetch(cache, make_request())
    clock.advance(29.9)
    assert fetch(cache, make_request())[0] == "HIT"
    clock.advance(0.2)
    assert fetch(cache, make_request())[0] == "UPSTREAM"
    assert cache.stats()["stores"] == 2  # the expired entry was replaced


def test_ttl_zero_stores_only_responses_with_explicit_freshness() -> None:
    cache = make_cache(ttl=0)
    fetch(cache, make_request("/a"))
    assert fetch(cache, make_request("/a"))[0] == "UPSTREAM"
    fetch(cache, make_request("/b"), headers=[("cache-control", "max-age=10")])
    assert fetch(cache, make_request("/b"))[0] == "HIT"


def test_s_maxage_wins_over_max_age() -> None:
    clock = FakeClock()
    cache = make_cache(clock)
    fetch(cache, make_request(), headers=[("cache-control", "max-age=10, s-maxage=100")])
    clock.advance(50)
    assert fetch(cache, make_request())[0] == "HIT"
    clock.advance(50)
    assert fetch(cache, make_request())[0] == "UPSTREAM"


def test_max_age_beats_the_default_ttl_and_expires() -> None:
    clock = FakeClock()
    cache = make_cache(clock, ttl=3600)
    expires = "Tue, 14 Nov 2023 23:13:20 GMT"  # an hour after DATE
    fetch(cache, make_request(), headers=[("cache-control", "max-age=10"), ("date", DATE), ("expires", expires)])
    clock.advance(10)
    assert fetch(cache, make_request())[0] == "UPSTREAM"


def test_expires_minus_date_is_the_lifetime() -> None:
    clock = FakeClock()
    cache = make_cache(clock, ttl=3600)
    fetch(cache, make_request(), headers=[("date", DATE), ("expires", "Tue, 14 Nov 2023 22:13:50 GMT")])
    clock.advance(29)
    assert fetch(cache, make_request())[0] == "HIT"
    clock.advance(1)
    assert fetch(cache, make_request())[0] == "UPSTREAM"


def test_expires_in_the_past_or_invalid_is_not_stored() -> None:
    cache = make_cache()
    fetch(cache, make_request("/a"), headers=[("expires", "0")])
    fetch(cache, make_request("/b"), headers=[("expires", formatdate(time.time() - 60, usegmt=True))])
    assert cache.stats()["entries"] == 0
    fetch(cache, make_request("/c"), headers=[("expires", formatdate(time.time() + 600, usegmt=True))])
    assert fetch(cache, make_request("/c"))[0] == "HIT"


def test_upstream_age_counts_against_freshness() -> None:
    clock = FakeClock()
    cache = make_cache(clock)
    fetch(cache, make_request(), headers=[("cache-control", "max-age=60"), ("age", "50")])
    clock.advance(5)
    source, _, headers, _ = fetch(cache, make_request())
    assert (source, headers.get("age")) == ("HIT", "55")
    clock.advance(5)
    assert fetch(cache, make_request())[0] == "UPSTREAM"
    stores = cache.stats()["stores"]
    fetch(cache, make_request("/old"), headers=[("cache-control", "max-age=60"), ("age", "60")])
    assert cache.stats()["stores"] == stores


# -- what is not stored ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("cache-control", "no-store")],
        [("cache-control", "private")],
        [("cache-control", 'private="x-user", max-age=60')],
        [("cache-control", "public"), ("cache-control", "no-store")],
        [("vary", "*")],
        [("vary", "accept"), ("vary", "*")],
        [("set-cookie", "session=abc")],
        [("cache-control", "max-age=0")],
    ],
)
def test_responses_that_are_not_stored(headers: list[tuple[str, str]]) -> None:
    cache = make_cache()
    _, _, resp_headers, _ = fetch(cache, make_request(), headers=headers)
    assert "x-cache" not in resp_headers
    assert lookup(cache, make_request()) is None
    assert cache.stats()["stores"] == 0


@pytest.mark.parametrize("status", [201, 206, 302, 304, 307, 400, 401, 403, 500, 502, 503])
def test_other_statuses_are_not_stored(status: int) -> None:
    cache = make_cache()
    fetch(cache, make_request(), status=status)
    assert cache.stats()["entries"] == 0


@pytest.mark.parametrize("status", [200, 203, 204, 301, 404, 410])
def test_cacheable_statuses(status: int) -> None:
    cache = make_cache()
    fetch(cache, make_request(), status=status, body=b"" if status == 204 else b"x")
    assert fetch(cache, make_request())[:2] == ("HIT", status)


def test_no_cache_response_is_stored_but_never_served() -> None:
    cache = make_cache()
    fetch(cache, make_request(), headers=[("cache-control", "no-cache, max-age=600")])
    assert cache.stats()["entries"] == 1
    assert fetch(cache, make_request())[0] == "UPSTREAM"


def test_only_get_and_head_are_looked_up_and_only_get_is_stored() -> None:
    cache = make_cache()
    post = make_request(method="POST")
    assert lookup(cache, post) is None
    upstream(cache, post)
    head = make_request(method="HEAD")
    assert lookup(cache, head) is None
    upstream(cache, head, body=b"")
    assert cache.stats()["entries"] == 0


def test_methods_option_limits_lookups() -> None:
    cache = make_cache(methods=["GET"])
    fetch(cache, make_request())
    assert lookup(cache, make_request(method="HEAD")) is None


def test_max_body() -> None:
    cache = make_cache(max_body=4)
    _, _, headers, _ = fetch(cache, make_request("/a"), headers=[("content-length", "5")], body=b"12345")
    assert "x-cache" not in headers
    fetch(cache, make_request("/b"), body=b"12345")  # no Content-Length: found too big at the body
    fetch(cache, make_request("/c"), body=b"1234")
    assert [fetch(cache, make_request(p))[0] for p in ("/a", "/b", "/c")] == ["UPSTREAM", "UPSTREAM", "HIT"]


def test_hop_by_hop_fields_are_not_replayed() -> None:
    cache = make_cache()
    fetch(
        cache,
        make_request(),
        headers=[("connection", "close"), ("transfer-encoding", "chunked"), ("content-length", "8"), ("x-app", "1")],
    )
    _, _, headers, _ = fetch(cache, make_request())
    names = [name for name, _ in headers.items()]
    assert "connection" not in names
    assert "transfer-encoding" not in names
    assert "content-length" not in names
    assert headers.get("x-app") == "1"


# -- the key --------------------------------------------------------------------------------------------------------


def test_key_holds_route_host_path_and_query_as_sent() -> None:
    cache = make_cache()
    fetch(cache, make_request(query="a=1&b=2"))
    assert fetch(cache, make_request(query="a=1&b=2"))[0] == "HIT"
    assert fetch(cache, make_request(query="b=2&a=1"))[0] == "UPSTREAM"
    assert fetch(cache, make_request(query="a=1&b=2", route="other"))[0] == "UPSTREAM"
    other_host = make_request(query="a=1&b=2")
    other_host.headers.set("host", "api.example.org")
    assert fetch(cache, other_host)[0] == "UPSTREAM"
    upper_host = make_request(query="a=1&b=2")
    upper_host.headers.set("host", "API.Example.COM")
    assert fetch(cache, upper_host)[0] == "HIT"


def test_vary_selects_variants() -> None:
    cache = make_cache()
    en = [("accept-language", "en")]
    fr = [("accept-language", "fr")]
    fetch(cache, make_request(headers=en), headers=[("vary", "Accept-Language")], body=b"hello")
    french = make_request(headers=fr)
    assert lookup(cache, french) is None
    upstream(cache, french, headers=[("vary", "accept-language")], body=b"bonjour")
    assert fetch(cache, make_request(headers=en))[::3] == ("HIT", b"hello")
    assert fetch(cache, make_request(headers=fr))[::3] == ("HIT", b"bonjour")
    assert lookup(cache, make_request()) is None  # no Accept-Language is a value of its own
    assert cache.stats()["entries"] == 2


def test_a_changed_vary_drops_the_old_variants() -> None:
    cache = make_cache()
    fetch(cache, make_request(headers=[("accept", "a")]), headers=[("vary", "accept")])
    fetch(cache, make_request(headers=[("accept", "b")]), headers=[("vary", "accept")])
    assert cache.stats()["entries"] == 2
    fetch(cache, make_request(headers=[("accept", "c")]), headers=[("vary", "accept-encoding")])
    assert cache.stats()["entries"] == 1
    assert fetch(cache, make_request(headers=[("accept", "a")]))[0] == "HIT"  # now one entry for every Accept


def test_consumers_never_share_entries() -> None:
    cache = make_cache()
    fetch(cache, make_request(consumer="alice"), body=b"alice's cart")
    assert fetch(cache, make_request(consumer="bob"))[0] == "UPSTREAM"
    assert fetch(cache, make_request())[0] == "UPSTREAM"
    assert fetch(cache, make_request(consumer="alice"))[::3] == ("HIT", b"alice's cart")


def test_vary_by_consumer_off_shares_public_data() -> None:
    cache = make_cache(vary_by_consumer=False)
    fetch(cache, make_request(consumer="alice"), body=b"catalogue")
    assert fetch(cache, make_request(consumer="bob"))[::3] == ("HIT", b"catalogue")


# -- Authorization (RFC 9111 §3.5) ----------------------------------------------------------------------------------

AUTH = [("authorization", "Bearer t0ken")]


def test_authorized_request_answer_is_not_stored_in_the_shared_entry() -> None:
    cache = make_cache()
    fetch(cache, make_request(headers=AUTH), body=b"private")
    assert cache.stats()["entries"] == 0
    assert fetch(cache, make_request())[0] == "UPSTREAM"


@pytest.mark.parametrize("directive", ["public", "s-maxage=60", "must-revalidate"])
def test_authorized_requests_use_entries_that_allow_it(directive: str) -> None:
    cache = make_cache()
    fetch(cache, make_request(headers=AUTH), headers=[("cache-control", directive)], body=b"shared")
    assert fetch(cache, make_request(headers=[("authorization", "Bearer other")]))[::3] == ("HIT", b"shared")


def test_authorized_request_is_not_served_an_entry_that_does_not_allow_it() -> None:
    cache = make_cache()
    fetch(cache, make_request(), body=b"anonymous view")
    assert fetch(cache, make_request(headers=AUTH))[0] == "UPSTREAM"
    assert fetch(cache, make_request())[0] == "HIT"  # the anonymous entry is still there


def test_authorized_request_keyed_by_consumer_is_cached() -> None:
    cache = make_cache()
    fetch(cache, make_request(headers=AUTH, consumer="alice"), body=b"mine")
    assert fetch(cache, make_request(headers=AUTH, consumer="alice"))[::3] == ("HIT", b"mine")
    assert fetch(cache, make_request(headers=AUTH, consumer="bob"))[0] == "UPSTREAM"


def test_authorization_rule_applies_when_not_keyed_by_consumer() -> None:
    cache = make_cache(vary_by_consumer=False)
    fetch(cache, make_request(headers=AUTH, consumer="alice"), body=b"mine")
    assert cache.stats()["entries"] == 0


# -- request directives, HEAD, conditional requests -----------------------------------------------------------------


@pytest.mark.parametrize("directive", ["no-cache", "max-age=0", "no-store", "NO-CACHE"])
def test_request_directives_bypass_the_lookup(directive: str) -> None:
    cache = make_cache()
    fetch(cache, make_request(), body=b"old")
    req = make_request(headers=[("cache-control", directive)])
    assert lookup(cache, req) is None
    upstream(cache, req, body=b"new")
    expected = b"old" if directive == "no-store" else b"new"  # no-store: the answer is not stored either
    assert fetch(cache, make_request())[::3] == ("HIT", expected)


def test_request_max_age_and_min_fresh() -> None:
    clock = FakeClock()
    cache = make_cache(clock, ttl=100)
    fetch(cache, make_request())
    clock.advance(20)
    assert lookup(cache, make_request(headers=[("cache-control", "max-age=10")])) is None
    assert lookup(cache, make_request(headers=[("cache-control", "max-age=30")])) is not None
    assert lookup(cache, make_request(headers=[("cache-control", "min-fresh=90")])) is None
    assert lookup(cache, make_request(headers=[("cache-control", "min-fresh=70")])) is not None


def test_only_if_cached_gets_504_on_a_miss() -> None:
    cache = make_cache()
    reply = lookup(cache, make_request(headers=[("cache-control", "only-if-cached")]))
    assert reply is not None
    assert reply.status == 504


def test_range_requests_go_upstream() -> None:
    cache = make_cache()
    fetch(cache, make_request())
    assert lookup(cache, make_request(headers=[("range", "bytes=0-1")])) is None


def test_head_is_served_from_a_get_entry() -> None:
    cache = make_cache()
    fetch(cache, make_request(), body=b"0123456789")
    reply = lookup(cache, make_request(method="HEAD"))
    assert reply is not None
    # the whole entry: the gateway frames the reply by its body's length and does not send a body to HEAD
    assert (reply.status, reply.body) == (200, b"0123456789")
    assert "content-length" not in reply.headers
    assert reply.headers.get("x-cache") == "HIT"


@pytest.mark.parametrize(
    ("validator", "not_modified"),
    [
        ('"v1"', True),
        ('W/"v1"', True),
        ('"v0", "v1"', True),
        ("*", True),
        ('"v2"', False),
    ],
)
def test_if_none_match_gets_304_from_the_cache(validator: str, not_modified: bool) -> None:
    cache = make_cache()
    fetch(cache, make_request(), headers=[("etag", '"v1"'), ("cache-control", "max-age=60"), ("x-app", "1")])
    reply = lookup(cache, make_request(headers=[("if-none-match", validator)]))
    assert reply is not None
    if not_modified:
        assert (reply.status, reply.body) == (304, b"")
        assert reply.headers.get("etag") == '"v1"'
        assert reply.headers.get("cache-control") == "max-age=60"
        assert reply.headers.get("x-cache") == "HIT"
        assert reply.headers.get("age") == "0"
        assert "x-app" not in reply.headers
        assert "content-type" not in reply.headers
    else:
        assert (reply.status, reply.body) == (200, b'{"id":1}')


def test_if_modified_since() -> None:
    cache = make_cache()
    fetch(cache, make_request(), headers=[("last-modified", DATE)])
    later = lookup(cache, make_request(headers=[("if-modified-since", "Wed, 15 Nov 2023 00:00:00 GMT")]))
    earlier = lookup(cache, make_request(headers=[("if-modified-since", "Mon, 13 Nov 2023 00:00:00 GMT")]))
    assert later is not None
    assert earlier is not None
    assert (later.status, earlier.status) == (304, 200)


# -- bounds, purge, options -----------------------------------------------------------------------------------------


def test_lru_bound() -> None:
    cache = make_cache(max_entries=2)
    fetch(cache, make_request("/a"))
    fetch(cache, make_request("/b"))
    assert fetch(cache, make_request("/a"))[0] == "HIT"  # /a is now the most recently used
    fetch(cache, make_request("/c"))
    assert cache.stats()["entries"] == 2
    assert [fetch(cache, make_request(p))[0] for p in ("/a", "/c")] == ["HIT", "HIT"]
    assert fetch(cache, make_request("/b"))[0] == "UPSTREAM"


@pytest.mark.anyio
async def test_purge_by_prefix_and_all() -> None:
    cache = make_cache()
    for path in ("/products/1", "/products/2", "/users/1"):
        fetch(cache, make_request(path))
    fetch(cache, make_request("/products/1", headers=[("accept", "x")]), headers=[("vary", "accept")])
    assert cache.stats()["entries"] == 3  # the Vary change replaced /products/1's entry
    assert await cache.purge("/products/") == 2
    assert cache.stats()["entries"] == 1
    assert fetch(cache, make_request("/users/1"))[0] == "HIT"
    assert await cache.purge("/nothing") == 0
    assert await cache.purge() == 1
    assert cache.stats()["entries"] == 0


@pytest.mark.anyio
async def test_purge_counts_variants() -> None:
    cache = make_cache()
    for lang in ("en", "fr", "de"):
        fetch(cache, make_request(headers=[("accept-language", lang)]), headers=[("vary", "accept-language")])
    fetch(cache, make_request("/other"))
    assert await cache.purge("/products") == 3
    assert cache.stats()["entries"] == 1


@pytest.mark.parametrize(
    ("text", "seconds"), [(30, 30.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25)]
)
def test_ttl_durations(text: Any, seconds: float) -> None:
    assert ResponseCache.Options.model_validate({"ttl": text}).ttl == seconds
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "options",
    [
        {"ttl": "5x"},
        {"ttl": "-1"},
        {"ttl": -1},
        {"ttl": True},
        {"backend": "memcached"},
        {"max_entries": 0},
        {"methods": ["POST"]},
        {"methods": []},
        {"max_body": -1},
        {"ttl_seconds": 5},
    ],
)
def test_option_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ResponseCache.Options.model_validate(options)


def test_redis_backend_needs_a_redis_url() -> None:
    with pytest.raises(ConfigurationError, match="redis_url"):
        make_cache(backend="redis")


def test_close_is_registered_with_the_context() -> None:
    context = PluginContext(clock=FakeClock().now)
    cache = ResponseCache(ResponseCache.Options(), context)
    assert context.resources == [cache.close]


def test_hooks_the_gateway_calls() -> None:
    assert ResponseCache.overrides("request")
    assert ResponseCache.overrides("response")
    assert ResponseCache.overrides("response_body")
    assert not ResponseCache.overrides("request_body")


# -- Redis ----------------------------------------------------------------------------------------------------------


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with fresh_prefix(REDIS_URL, f"t-cache-{uuid.uuid4().hex[:12]}") as name:
        yield name


def redis_cache(prefix: str, url: str = REDIS_URL, **options: Any) -> ResponseCache:
    context = PluginContext(clock=FakeClock().now, redis_url=url, route="products")
    return ResponseCache(
        ResponseCache.Options.model_validate({"backend": "redis", "redis_prefix": prefix, **options}), context
    )


async def alookup(cache: ResponseCache, req: ProxyRequest) -> Reply | None:
    result = cache.request(req)
    assert inspect.isawaitable(result), "the Redis backend answers with an awaitable"
    return await result


async def astore(cache: ResponseCache, req: ProxyRequest, **response: Any) -> ResponseHead:
    """Miss, then the upstream's answer; waits until the background write landed."""
    assert await alookup(cache, req) is None
    stores = cache.stats()["stores"] or 0
    resp = upstream(cache, req, **response)
    if resp.headers.get("x-cache") == "MISS":
        await eventually(lambda: cache.stats()["stores"] == stores + 1, "the write to Redis")
    return resp


async def redis_keys(prefix: str) -> list[bytes]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        return [key async for key in client.scan_iter(match=f"{prefix}*")]
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_redis_entries_are_shared_by_replicas(prefix: str) -> None:
    first, second = redis_cache(prefix), redis_cache(prefix)
    try:
        await astore(first, make_request(), headers=[("etag", '"v1"'), ("x-app", "1")], body=b"shared \x00\xff bytes")
        reply = await alookup(second, make_request())
        assert reply is not None
        assert (reply.status, reply.body) == (200, b"shared \x00\xff bytes")
        assert reply.headers.get("x-cache") == "HIT"
        assert reply.headers.get("x-app") == "1"
        assert int(reply.headers.get("age") or "-1") >= 0
        not_modified = await alookup(second, make_request(headers=[("if-none-match", '"v1"')]))
        assert not_modified is not None
        assert not_modified.status == 304
        assert second.stats() == {"entries": None, "hits": 2, "misses": 0, "stores": 0}
        assert await alookup(second, make_request("/products/2")) is None
    finally:
        await first.close()
        await second.close()


@pytest.mark.anyio
async def test_redis_vary_consumer_and_authorization(prefix: str) -> None:
    cache = redis_cache(prefix)
    try:
        en, fr = [("accept-language", "en")], [("accept-language", "fr")]
        await astore(cache, make_request(headers=en), headers=[("vary", "accept-language")], body=b"hello")
        await astore(cache, make_request(headers=fr), headers=[("vary", "accept-language")], body=b"bonjour")
        hit_en = await alookup(cache, make_request(headers=en))
        hit_fr = await alookup(cache, make_request(headers=fr))
        assert hit_en is not None
        assert hit_fr is not None
        assert (hit_en.body, hit_fr.body) == (b"hello", b"bonjour")
        assert await alookup(cache, make_request(headers=[("accept-language", "de")])) is None
        both = [("accept", "a"), ("accept", " b ")]  # repeated fields are combined the same way on both sides
        await astore(cache, make_request("/multi", headers=both), headers=[("vary", "Accept, Accept-Language")])
        assert await alookup(cache, make_request("/multi", headers=[("accept", "a"), ("accept", "b")])) is not None
        assert await alookup(cache, make_request("/multi", headers=[("accept", "a")])) is None
        await astore(cache, make_request("/cart", consumer="alice"), body=b"alice")
        assert await alookup(cache, make_request("/cart", consumer="bob")) is None
        await astore(cache, make_request("/anon"), body=b"anonymous")
        assert await alookup(cache, make_request("/anon", headers=AUTH)) is None
    finally:
        await cache.close()


@pytest.mark.anyio
async def test_redis_ttl_is_freshness_plus_margin(prefix: str) -> None:
    cache = redis_cache(prefix)
    try:
        await astore(cache, make_request(), headers=[("cache-control", "max-age=30"), ("age", "10")])
    finally:
        await cache.close()
    keys = await redis_keys(prefix)
    assert len(keys) == 1
    assert keys[0].startswith(f"{prefix}:products:/products/1".encode())
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        pttl = await client.pttl(keys[0])
    finally:
        await client.aclose()
    assert (20 + STALE_MARGIN - 5) * 1000 < pttl <= (20 + STALE_MARGIN) * 1000


@pytest.mark.anyio
async def test_redis_stale_entries_are_misses(prefix: str) -> None:
    cache = redis_cache(prefix)
    try:
        await astore(cache, make_request(), headers=[("cache-control", "no-cache")])
        assert await redis_keys(prefix)
        assert await alookup(cache, make_request()) is None
    finally:
        await cache.close()


@pytest.mark.anyio
async def test_redis_purge(prefix: str) -> None:
    cache = redis_cache(prefix)
    other_route = ResponseCache(
        ResponseCache.Options(backend="redis", redis_prefix=prefix),
        PluginContext(clock=FakeClock().now, redis_url=REDIS_URL, route="users"),
    )
    try:
        for path in ("/products/1", "/products/2", "/products*/3", "/users/1"):
            await astore(cache, make_request(path))
        await astore(other_route, make_request("/products/1", route="users"))
        assert await cache.purge("/products*") == 1  # glob characters in a prefix are matched literally
        assert await alookup(cache, make_request("/products/1")) is not None
        assert await cache.purge("/products/") == 2
        assert await alookup(cache, make_request("/products/1")) is None
        assert await alookup(cache, make_request("/users/1")) is not None
        assert await cache.purge() == 1
        assert len(await redis_keys(prefix)) == 1  # the other route's entry is not this plugin's
        assert await other_route.purge() == 1
        assert await redis_keys(prefix) == []
    finally:
        await cache.close()
        await other_route.close()


@pytest.mark.anyio
async def test_redis_unreachable_lookups_go_upstream_and_purge_raises(caplog: pytest.LogCaptureFixture) -> None:
    cache = redis_cache("t-cache-unreachable", url="redis://127.0.0.1:1/0")
    try:
        assert await alookup(cache, make_request()) is None
        assert "cache lookup failed" in caplog.text
        with pytest.raises(Unavailable, match="purge"):
            await cache.purge()
    finally:
        await cache.close()
