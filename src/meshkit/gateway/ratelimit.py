"""The ``rate_limit`` gateway plugin: a request budget per caller, in process or shared by every replica in Redis.

::

    plugins:
      - rate_limit: {limit: 100, window: 1m}                      # 100 a minute per consumer (or per IP)
      - rate_limit: {limit: 10, window: 1s, burst: 20, backend: redis, key: [consumer, route]}

Options (see ``docs/gateway-traffic.md`` for the whole story):

- ``limit``: requests per ``window``; ``window``: seconds, or ``"500ms"``, ``"1s"``, ``"1m"``, ``"1h"``, ``"1d"``
  (default 1 s).
- ``algorithm``: ``token_bucket`` (default: ``limit / window`` tokens a second into a bucket of ``burst`` tokens,
  ``burst`` defaulting to ``limit``) or ``sliding_window`` (the two-fixed-windows weighted estimate: the previous
  window's count weighted by how much of it still overlaps the sliding window, plus the current window's count).
- ``key``: what a budget belongs to, a list of parts, joined: ``consumer`` (the authenticated consumer; anonymous
  requests all share one budget), ``ip`` (the client address, resolved through the gateway's trusted proxies;
  IPv6 clients are grouped by their ``ipv6_prefix``, default /64, since one subscriber holds a whole /64),
  ``route`` (the matched route's name), ``header:<name>`` (that header's first value; a missing header is its own
  value). ``consumer`` and ``ip`` together (the default, ``[consumer, ip]``) are one part: the consumer when the
  request is authenticated, else the client address. ``[]`` is one budget for everybody. The key never contains
  the request's path or query: a route is rate limited as a whole, however its URL is spelled.
- ``backend``: ``local`` (default: this process's memory, at most ``max_keys`` budgets, least recently used
  dropped first) or ``redis`` (the gateway's ``redis_url``; one Lua script a request, on the Redis server's clock,
  so every replica spends the same budget). Keys: ``<redis_prefix>:<route or global>:<tb|sw>:<window ms>:<key>``,
  each with a TTL that ends when it would be back to its full budget.
- ``headers`` (default true): ``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` (seconds until the
  whole budget is back) and ``RateLimit-Policy`` (``<limit>;w=<window>``) on every response. A refused request
  gets ``429`` with ``Retry-After`` (whole seconds, at least 1), with or without ``headers``.
- ``redis_timeout`` (0.25 s): the most a request waits for Redis (a free connection included); ``fail_open``
  (default true): when Redis fails, let the request through (a warning is logged at most every 10 s); false:
  answer 503.

Token bucket numbers: ``RateLimit-Limit`` is ``burst`` (how many requests fit at once), ``RateLimit-Remaining`` the
whole tokens left, ``RateLimit-Reset`` the seconds until the bucket is full again. Sliding window numbers: the limit,
``limit`` minus the estimate, and the seconds until every counted request has left the window.

The local backend keeps its own small token bucket rather than :class:`meshkit.resilience.ratelimit.TokenBucket`:
hooks run on one event loop thread, so a per-bucket lock buys nothing, costs memory for up to ``max_keys`` buckets,
and ``TokenBucket.reserve`` does not report the tokens left, which the headers need (a second locked call would).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshkit._core.optional import require
from meshkit._core.urls import redact, redis_url
from meshkit.errors import ConfigurationError
from meshkit.gateway.config import parse_seconds
from meshkit.gateway.plugin import Plugin, PluginContext, ProxyRequest, Reply, RequestResult, ResponseHead

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.commands.core import AsyncScript

__all__ = ["RateLimit", "RateLimitOptions"]

log = logging.getLogger(__name__)

#: the request ``state`` entry where rate limit plugins leave the numbers for the response headers (the most
#: restrictive of all the rate limits the request went through)
STATE_KEY = "ratelimit"
_HEADER_NAMES = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy")
_HEADER_SET = frozenset(_HEADER_NAMES)
_WARN_EVERY = 10.0  # seconds between two "Redis is down" warnings of one plugin
_MAX_PART = 128  # key parts longer than this (or containing the separator) are replaced by a digest
_IP_CACHE = 4096  # IPv6 client -> its key part, bounded
_EPS = 1e-9  # float slack: 0.1 s at 10/s is one token, not 0.9999999999999999

_HEADER_PART = re.compile(r"header:([!#$%&'*+.^_`|~0-9A-Za-z-]+)")


class RateLimitOptions(BaseModel):
    """The ``rate_limit`` plugin's options (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(ge=1)
    window: float = Field(default=1.0, ge=0.001)
    burst: int | None = Field(default=None, ge=1)
    algorithm: Literal["token_bucket", "sliding_window"] = "token_bucket"
    key: list[str] = Field(default_factory=lambda: ["consumer", "ip"])
    backend: Literal["local", "redis"] = "local"
    headers: bool = True
    redis_timeout: float = Field(default=0.25, gt=0)
    redis_prefix: str = Field(default="meshkit:rl", min_length=1)
    redis_connections: int = Field(default=64, ge=1)
    fail_open: bool = True
    max_keys: int = Field(default=100_000, ge=1)
    ipv6_prefix: int = Field(default=64, ge=1, le=128)

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: object) -> float:
        return parse_seconds(value)

    @field_validator("key")
    @classmethod
    def _key(cls, parts: list[str]) -> list[str]:
        out: list[str] = []
        for part in parts:
            match = _HEADER_PART.fullmatch(part)
            name = f"header:{match.group(1).lower()}" if match else part
            if name not in ("consumer", "ip", "route") and not match:
                raise ValueError(f"unknown key part {part!r}: use consumer, ip, route or header:<name>")
            if name in out:
                raise ValueError(f"key part {part!r} is listed twice")
            out.append(name)
        return out

    @model_validator(mode="after")
    def _burst(self) -> RateLimitOptions:
        if self.burst is not None and self.algorithm != "token_bucket":
            raise ValueError("burst applies to algorithm token_bucket only")
        return self


def _safe(value: str) -> str:
    """``value`` as a key part: as it is, or a digest when it is long or could be mistaken for another key."""
    if len(value) > _MAX_PART or "|" in value or value[:1] == "#":
        return "#" + hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
    return value


def _constant(value: str) -> Callable[[ProxyRequest], str]:
    return lambda req: value


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class _Window:
    __slots__ = ("cur", "index", "prev")

    def __init__(self, index: int) -> None:
        self.index = index
        self.cur = 0
        self.prev = 0


# Both scripts: KEYS[1] the key; return {allowed 0/1, remaining, retry-after ms, reset ms}. The clock is the
# server's (TIME), so every replica agrees; the key's TTL ends when its state would equal no state.
_BUCKET_LUA = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'v', 't')
local tokens, stamp = tonumber(state[1]), tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens, stamp = burst, now
elseif now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
local allowed, wait = 0, 0
if tokens >= 1 - 1e-9 then
  tokens = math.max(tokens - 1, 0)
  allowed = 1
else
  wait = (1 - tokens) / rate
end
local full = (burst - tokens) / rate
redis.call('HSET', KEYS[1], 'v', string.format('%.17g', tokens), 't', string.format('%.6f', stamp))
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(full * 1000)))
return {allowed, math.floor(tokens + 1e-9), math.ceil(wait * 1000), math.ceil(full * 1000)}
"""

_SLIDING_WINDOW_LUA = """
local W, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local idx = math.floor(now / W)
local state = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local w, cur, prev = tonumber(state[1]), tonumber(state[2]) or 0, tonumber(state[3]) or 0
local moved = w ~= idx
if moved then
  if w == idx - 1 then prev = cur else prev = 0 end
  cur = 0
end
local start = idx * W
local est = prev * (1 - (now - start) / W) + cur
local allowed, wait = 0, 0
if est + 1 <= limit + 1e-9 then
  cur = cur + 1
  est = est + 1
  allowed = 1
elseif cur + 1 <= limit then
  wait = start + W * (1 - (limit - 1 - cur) / prev) - now
else
  wait = start + W + W * math.max(0, 1 - (limit - 1) / cur) - now
end
local reset = 0
if cur > 0 then reset = start + 2 * W - now elseif prev > 0 then reset = start + W - now end
if allowed == 1 or moved then
  redis.call('HSET', KEYS[1], 'w', idx, 'c', cur, 'p', prev)
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(start + 2 * W - now)))
end
return {allowed, math.max(0, math.floor(limit - est + 1e-9)), math.ceil(wait), math.ceil(reset)}
"""

# what one decision is: allowed, remaining, seconds until a request would pass, seconds until the budget is whole
_Decision = tuple[bool, int, float, float]


class RateLimit(Plugin):
    """Answer ``429 Too Many Requests`` once a caller has spent its budget (see the module docstring).

    ``stats()`` gives the admin API the numbers; ``key_for(req)`` the key a request is counted under.
    """

    name: ClassVar[str] = "rate_limit"
    Options: ClassVar[type[BaseModel]] = RateLimitOptions

    def __init__(self, options: RateLimitOptions | Mapping[str, Any], context: PluginContext) -> None:
        opts = options if isinstance(options, RateLimitOptions) else RateLimitOptions.model_validate(options)
        self.options = opts
        self._clock = context.clock
        self._limit = opts.limit
        self._window = opts.window
        self._token_bucket = opts.algorithm == "token_bucket"
        self._burst = float(opts.burst if opts.burst is not None else opts.limit)
        self._rate = opts.limit / opts.window
        self._headers = opts.headers
        self._fail_open = opts.fail_open
        self._max_keys = opts.max_keys
        self._ipv6_prefix = opts.ipv6_prefix
        self._route = context.route

        shown_limit = int(self._burst) if self._token_bucket else opts.limit
        policy = f"{opts.limit};w={max(1, math.ceil(opts.window))}"
        if self._token_bucket and int(self._burst) != opts.limit:
            policy += f";burst={int(self._burst)}"
        self._limit_text = str(shown_limit)
        self._policy = policy
        self._message = f"rate limit exceeded: {opts.limit} requests per {opts.window:g} s"

        self._store: OrderedDict[str, _Bucket | _Window] = OrderedDict()
        self._ip_keys: dict[str, str] = {}
        self._key_of = self._key_function(opts.key)

        self.allowed = 0
        self.limited = 0
        self.unavailable = 0
        self.evicted = 0
        self._warned_at: float | None = None

        alg = "tb" if self._token_bucket else "sw"
        window_ms = max(1, round(opts.window * 1000))
        self.key_prefix = f"{opts.redis_prefix}:{context.route or 'global'}:{alg}:{window_ms}:"
        self._client: aioredis.Redis | None = None
        self._script: AsyncScript | None = None
        self._script_args: list[str | int] = (
            [repr(self._rate), repr(self._burst)] if self._token_bucket else [window_ms, opts.limit]
        )
        self._redis_timeout = opts.redis_timeout
        self._redis_errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
        self._slots: asyncio.Semaphore | None = None
        if opts.backend == "redis":
            self._connect(context, opts)

    # -- set-up --------------------------------------------------------------------------------------------------------

    def _connect(self, context: PluginContext, opts: RateLimitOptions) -> None:
        url = context.redis_url
        if not url:
            raise ConfigurationError(
                "rate_limit with backend: redis needs the gateway's redis_url",
                hint="set redis_url in the gateway config, or use backend: local",
            )
        redis_url(url, "rate_limit")
        module = require("redis.asyncio", "redis")
        retry = require("redis.asyncio.retry", "redis")
        backoff = require("redis.backoff", "redis")
        exceptions = require("redis.exceptions", "redis")
        try:
            self._client = module.Redis.from_url(
                url,
                max_connections=opts.redis_connections,
                socket_timeout=opts.redis_timeout,
                socket_connect_timeout=opts.redis_timeout,
                # one quick retry on a fresh connection (a pooled one may have died with a Redis restart); more
                # would only spend the request's time budget
                retry=retry.Retry(backoff.NoBackoff(), 1),
            )
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"bad rate_limit Redis URL {redact(url)!r}: {exc}") from exc
        lua = _BUCKET_LUA if self._token_bucket else _SLIDING_WINDOW_LUA
        self._script = self._client.register_script(lua)  # EVALSHA, loading the script on NOSCRIPT
        self._slots = asyncio.Semaphore(opts.redis_connections)
        self._redis_errors = (exceptions.RedisError, OSError, TimeoutError)
        context.on_close(self.aclose)

    async def aclose(self) -> None:
        """Close the Redis connections (registered with the plugin context; safe to call twice)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose(close_connection_pool=True)

    def _key_function(self, parts: list[str]) -> Callable[[ProxyRequest], str]:
        getters: list[Callable[[ProxyRequest], str]] = []
        identity = "consumer" in parts and "ip" in parts  # together: one part, the consumer or else the address
        for part in parts:
            if identity and part in ("consumer", "ip"):
                if part == next(p for p in parts if p in ("consumer", "ip")):
                    getters.append(self._identity_part)
            elif part == "consumer":
                getters.append(self._consumer_part)
            elif part == "ip":
                getters.append(self._ip_part)
            elif part == "route":
                if self._route is not None:  # a route's own plugin: the part is a constant
                    getters.append(_constant("r=" + _safe(self._route)))
                else:
                    getters.append(self._route_part)
            else:
                getters.append(self._header_getter(part.partition(":")[2]))
        if not getters:
            return lambda req: ""
        if len(getters) == 1:
            return getters[0]
        return lambda req: "|".join([get(req) for get in getters])

    # -- key parts -----------------------------------------------------------------------------------------------------

    def _identity_part(self, req: ProxyRequest) -> str:
        consumer = req.consumer
        if consumer is not None:
            return "c=" + _safe(consumer)
        return self._ip_part(req)

    @staticmethod
    def _consumer_part(req: ProxyRequest) -> str:
        consumer = req.consumer
        return "c-" if consumer is None else "c=" + _safe(consumer)

    @staticmethod
    def _route_part(req: ProxyRequest) -> str:
        return "r=" + _safe(req.route)

    @staticmethod
    def _header_getter(name: str) -> Callable[[ProxyRequest], str]:
        def header(req: ProxyRequest) -> str:
            value = req.headers.get(name)
            return "h-" if value is None else "h=" + _safe(value)

        return header

    def _ip_part(self, req: ProxyRequest) -> str:
        client = req.client
        if ":" not in client:  # IPv4: as it is (the server gives it in canonical form)
            return "ip=" + _safe(client)
        part = self._ip_keys.get(client)
        if part is None:
            part = "ip=" + _safe(self._ipv6_key(client))
            if len(self._ip_keys) >= _IP_CACHE:
                del self._ip_keys[next(iter(self._ip_keys))]
            self._ip_keys[client] = part
        return part

    def _ipv6_key(self, client: str) -> str:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return client
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((int(address), self._ipv6_prefix), strict=False))
        return str(address)

    def key_for(self, req: ProxyRequest) -> str:
        """The key ``req`` is counted under (on Redis, the key's name): route + consumer / IP / headers, as
        configured; never the request's path or query."""
        return self.key_prefix + self._key_of(req)

    # -- the hooks -----------------------------------------------------------------------------------------------------

    def request(self, req: ProxyRequest) -> RequestResult:
        if self._client is not None:
            return self._remote(req, self.key_prefix + self._key_of(req))
        now = self._clock()
        key = self._key_of(req)
        decision = self._take_bucket(key, now) if self._token_bucket else self._take_window(key, now)
        return self._verdict(req, decision)

    def response(self, req: ProxyRequest, resp: ResponseHead) -> None:
        if not self._headers:
            return
        numbers = req.state.get(STATE_KEY)
        if numbers is None:
            return
        headers = resp.headers
        if any(name in _HEADER_SET for name, _ in headers.items()):  # the upstream's (or another replica's) go
            for name in _HEADER_NAMES:
                headers.remove(name)
        for name, value in zip(_HEADER_NAMES, numbers[2:], strict=True):
            headers.add(name, value)

    def stats(self) -> dict[str, Any]:
        """For the admin API: ``keys`` tracked here (``None`` on Redis: they live there), requests ``allowed`` and
        ``limited``, ``unavailable`` (Redis failures), ``evicted`` (budgets dropped to stay under ``max_keys``)."""
        return {
            "backend": self.options.backend,
            "algorithm": self.options.algorithm,
            "keys": None if self.options.backend == "redis" else len(self._store),
            "allowed": self.allowed,
            "limited": self.limited,
            "unavailable": self.unavailable,
            "evicted": self.evicted,
        }

    # -- deciding ------------------------------------------------------------------------------------------------------

    def _verdict(self, req: ProxyRequest, decision: _Decision) -> Reply | None:
        allowed, remaining, retry, reset = decision
        reset_text = str(math.ceil(reset - _EPS)) if reset > 0 else "0"
        if self._headers:
            held = req.state.get(STATE_KEY)
            if held is None or remaining < held[0] or (remaining == held[0] and reset > held[1]):
                req.state[STATE_KEY] = (remaining, reset, self._limit_text, str(remaining), reset_text, self._policy)
        if allowed:
            self.allowed += 1
            return None
        self.limited += 1
        headers = [("retry-after", str(max(1, math.ceil(retry - _EPS))))]
        if self._headers:
            headers += zip(_HEADER_NAMES, (self._limit_text, "0", reset_text, self._policy), strict=True)
        return Reply.error(429, self._message, headers)

    def _insert(self, key: str, state: _Bucket | _Window, now: float) -> None:
        store = self._store
        if len(store) >= self._max_keys:
            store.popitem(last=False)
            self.evicted += 1
        else:  # drop up to two idle budgets (back to whole: the same as no state), oldest first
            for _ in range(2):
                if not store:
                    break
                oldest_key, oldest = next(iter(store.items()))
                if not self._idle(oldest, now):
                    break
                del store[oldest_key]
        store[key] = state

    def _idle(self, state: _Bucket | _Window, now: float) -> bool:
        if isinstance(state, _Bucket):
            return state.stamp + (self._burst - state.tokens) / self._rate <= now
        return (state.index + 2) * self._window <= now

    def _take_bucket(self, key: str, now: float) -> _Decision:
        bucket = self._store.get(key)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._insert(key, bucket, now)
        else:
            self._store.move_to_end(key)
            assert isinstance(bucket, _Bucket)
            if now > bucket.stamp:
                bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
                bucket.stamp = now
        tokens = bucket.tokens
        if tokens >= 1 - _EPS:
            tokens = bucket.tokens = max(tokens - 1, 0.0)
            allowed, wait = True, 0.0
        else:
            allowed, wait = False, (1 - tokens) / self._rate
        return allowed, int(tokens + _EPS), wait, (self._burst - tokens) / self._rate

    def _take_window(self, key: str, now: float) -> _Decision:
        size = self._window
        index = int(now // size)
        window = self._store.get(key)
        if window is None:
            window = _Window(index)
            self._insert(key, window, now)
        else:
            self._store.move_to_end(key)
            assert isinstance(window, _Window)
            if window.index != index:
                window.prev = window.cur if window.index == index - 1 else 0
                window.cur = 0
                window.index = index
        limit = self._limit
        start = index * size
        cur, prev = window.cur, window.prev
        estimate = prev * (1 - (now - start) / size) + cur
        wait = 0.0
        allowed = estimate + 1 <= limit + _EPS
        if allowed:
            cur = window.cur = cur + 1
            estimate += 1
        elif cur + 1 <= limit:  # the previous window's share has to shrink enough
            wait = start + size * (1 - (limit - 1 - cur) / prev) - now
        else:  # this window alone is full: wait for the next, then for this one's share to shrink
            wait = start + size + size * max(0.0, 1 - (limit - 1) / cur) - now
        reset = start + 2 * size - now if cur else (start + size - now if prev else 0.0)
        return allowed, max(0, int(limit - estimate + _EPS)), wait, reset

    async def _remote(self, req: ProxyRequest, key: str) -> Reply | None:
        assert self._script is not None
        assert self._slots is not None
        try:
            async with asyncio.timeout(self._redis_timeout), self._slots:
                allowed, remaining, retry_ms, reset_ms = await self._script(keys=[key], args=self._script_args)
        except self._redis_errors as exc:
            return self._unavailable(exc)
        return self._verdict(req, (allowed == 1, int(remaining), retry_ms / 1000, reset_ms / 1000))

    def _unavailable(self, exc: BaseException) -> Reply | None:
        self.unavailable += 1
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning(
                "rate limit store unavailable: %s requests",
                "letting through" if self._fail_open else "refusing (503)",
                extra={
                    "plugin": self.name,
                    "route": self._route,
                    "error": repr(exc),
                    "failures": self.unavailable,
                    "fail_open": self._fail_open,
                },
            )
        if self._fail_open:
            return None
        return Reply.error(503, "the rate limit store is unavailable", [("retry-after", "1")])
