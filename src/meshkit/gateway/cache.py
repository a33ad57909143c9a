"""``cache``: a shared HTTP response cache for gateway routes (RFC 9111, the parts a shared cache must honour).

::

    routes:
      - name: products
        template: /products/{id}
        service: catalog
        plugins:
          - jwt: {algorithms: [RS256], jwks_url: "https://id.example/jwks.json"}
          - cache: {ttl: 30s, backend: redis}

What is stored: answers to ``GET`` with status 200, 203, 204, 301, 404 or 410, a body of at most ``max_body``
bytes, and none of: ``Cache-Control: no-store`` or ``private`` (on the response, or ``no-store`` on the request),
``Vary: *``, ``Set-Cookie`` (a session cookie must never be handed to another client), a freshness lifetime that is
already over. ``HEAD`` is answered from the entry of a ``GET`` (``HEAD`` responses themselves are not stored).

Freshness: ``s-maxage``, else ``max-age``, else ``Expires`` minus ``Date``, else ``ttl`` (default 60 s); the
upstream's ``Age`` counts against it. ``Cache-Control: no-cache`` responses are stored but always stale: the
gateway does not revalidate with the upstream, so they are never served (the next response replaces them).

The key is the route name, the ``Host``, the path and the query string exactly as sent (``?a=1&b=2`` and
``?b=2&a=1`` are two entries), plus the consumer when ``vary_by_consumer`` is on (the default) and an auth plugin
set one: one caller's private answer is never served to another. A response's ``Vary`` adds the request's values of
the headers it names (``Vary: Accept-Language``: one entry per language).

Order: put ``cache`` after the auth plugins and rate limits (they must see every request; the consumer is part of
the key) and after ``json_body`` (the entry stores the body as the plugins before it left it: a hit skips body
hooks), and before plugins that add response headers (a header added before ``cache`` sees the response is stored,
and added again when the hit goes through every plugin's response hook).

Lookups: a request with ``Cache-Control: no-cache``, ``no-store`` or ``max-age=0``, or with a ``Range``, goes to the
upstream (``max-age=N`` and ``min-fresh=N`` are honoured, ``only-if-cached`` gets a 504 on a miss). A request with
``Authorization`` is served only from an entry keyed by its consumer, or one whose response said ``public``,
``s-maxage`` or ``must-revalidate`` (RFC 9111 §3.5); otherwise it goes upstream, and the answer is stored only if
it says one of those. A hit
carries ``Age`` and ``X-Cache: HIT``; a stored miss ``X-Cache: MISS``. ``If-None-Match`` (weak comparison) or
``If-Modified-Since`` that matches the entry gets a 304 from the cache.

Backends: ``memory`` (per gateway process, LRU bounded by ``max_entries``) or ``redis`` (``context.redis_url``,
shared by every replica; one hash per URL with a field per ``Vary`` variant, expiring with its longest-lived
variant plus a few seconds; ages are measured on the Redis server's clock so replicas agree).
:meth:`ResponseCache.purge` removes entries whose path starts with a prefix (or all of this plugin's entries);
:meth:`ResponseCache.stats` counts hits, misses and stores.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from email.utils import parsedate_tz
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshkit._core.optional import require
from meshkit._core.urls import redact
from meshkit.errors import ConfigurationError, Unavailable
from meshkit.gateway.config import parse_seconds
from meshkit.gateway.plugin import Headers, Plugin, PluginContext, ProxyRequest, Reply, ResponseHead

__all__ = ["CACHEABLE_STATUSES", "ResponseCache"]

log = logging.getLogger(__name__)

#: statuses stored (all heuristically cacheable, RFC 9110 §15.1); 206 is left out: ranges are not assembled
CACHEABLE_STATUSES = frozenset({200, 203, 204, 301, 404, 410})
#: seconds a Redis entry outlives its freshness (so a replica reading it just at expiry still gets it whole)
STALE_MARGIN = 5.0

_ETAG = re.compile(r'\s*(W/)?("[^"]*")')
# hop-by-hop and per-response fields a stored entry does not keep (the gateway frames the replayed body itself)
_NOT_STORED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "age",
        "x-cache",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# fields a 304 carries from the stored response (RFC 9110 §15.4.5)
_FOR_304 = frozenset({"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"})
# request fields the lookup reads, gathered in one pass over the headers
_LOOKUP_FIELDS = frozenset({"host", "cache-control", "authorization", "range", "if-none-match", "if-modified-since"})
_NUL_COUNT = 4  # separators in a primary key


def _directives(value: str | None) -> dict[str, str | None]:
    """``Cache-Control`` directives: lower-case names, values unquoted (``None`` without ``=``)."""
    out: dict[str, str | None] = {}
    if not value:
        return out
    for item in value.split(","):
        name, eq, arg = item.partition("=")
        name = name.strip().lower()
        if name and name not in out:
            out[name] = arg.strip().strip('"') if eq else None
    return out


def _seconds(arg: str | None) -> int | None:
    """A delta-seconds argument; ``None`` when missing or invalid."""
    if arg is None or not arg.isdigit():
        return None
    return int(arg)


def _http_date(value: str | None) -> float | None:
    """An HTTP date as Unix seconds (``None``: missing or unparseable)."""
    if not value:
        return None
    parsed = parsedate_tz(value)
    if parsed is None:
        return None
    offset = parsed[9] or 0
    try:
        return calendar.timegm((*parsed[:6], 0, 1, 0)) - offset
    except (ValueError, OverflowError):
        return None


def _etags(value: str) -> list[str]:
    """The opaque tags of an ``If-None-Match`` list (weak prefix dropped: weak comparison)."""
    return [m.group(2) for m in _ETAG.finditer(value)]


class _Entry:
    """One stored response: ``lifetime`` (freshness) and ``age`` (the upstream's ``Age``) in seconds; ``stale``:
    it said ``no-cache`` (kept, never served); ``auth_ok``: it may answer requests with ``Authorization``."""

    __slots__ = (
        "age",
        "auth_ok",
        "body",
        "etag",
        "headers",
        "last_modified",
        "lifetime",
        "stale",
        "status",
        "stored_at",
    )

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        lifetime: float,
        age: float,
        *,
        auth_ok: bool,
        stale: bool,
        stored_at: float = 0.0,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.lifetime = lifetime
        self.age = age
        self.auth_ok = auth_ok
        self.stale = stale
        self.stored_at = stored_at
        self.etag: str | None = None
        self.last_modified: float | None = None
        for name, value in headers:
            if name == "etag":
                match = _ETAG.match(value)
                self.etag = match.group(2) if match else None
            elif name == "last-modified":
                self.last_modified = _http_date(value)

    def meta(self) -> bytes:
        return json.dumps(
            {
                "s": self.status,
                "h": self.headers,
                "l": self.lifetime,
                "a": self.age,
                "p": self.auth_ok,
                "n": self.stale,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def load(cls, blob: bytes, stored_at: float) -> _Entry:
        meta_end = blob.index(b"\n")
        meta = json.loads(blob[:meta_end])
        headers = [(str(k), str(v)) for k, v in meta["h"]]
        return cls(
            int(meta["s"]),
            headers,
            blob[meta_end + 1 :],
            float(meta["l"]),
            float(meta["a"]),
            auth_ok=bool(meta["p"]),
            stale=bool(meta["n"]),
            stored_at=stored_at,
        )


class _Pending:
    """One cacheable request between the hooks: its key and request-side directives, then what to store."""

    __slots__ = (
        "auth",
        "entry",
        "ims",
        "inm",
        "keyed",
        "max_age",
        "min_fresh",
        "names",
        "no_store",
        "only_if_cached",
        "primary",
    )

    def __init__(self, primary: str, *, keyed: bool, auth: bool) -> None:
        self.primary = primary
        self.keyed = keyed  # the key holds the consumer
        self.auth = auth  # the request carried Authorization
        self.no_store = False
        self.max_age: int | None = None
        self.min_fresh: int | None = None
        self.only_if_cached = False
        self.inm: str | None = None
        self.ims: str | None = None
        self.entry: _Entry | None = None  # set by response(): what response_body() stores
        self.names: tuple[str, ...] = ()  # the response's Vary names


def _vary_names(values: list[str]) -> tuple[str, ...] | None:
    """The field names of ``Vary`` (sorted, lower-case); ``None`` for ``Vary: *``."""
    names: set[str] = set()
    for value in values:
        for item in value.split(","):
            name = item.strip().lower()
            if name == "*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


def _combined(headers: Headers, name: str) -> str:
    return ",".join(v.strip() for v in headers.get_all(name))


def _signature(names: tuple[str, ...], headers: Headers) -> str:
    """The request's values of the ``Vary`` fields: which variant of a URL it selects."""
    if not names:
        return ""
    return "".join(f"{name}={_combined(headers, name)}\n" for name in names)


# -- the memory backend -------------------------------------------------------------------------------------------


class _Group:
    """The variants of one primary key: the ``Vary`` names they were stored under, and their signatures."""

    __slots__ = ("names", "sigs")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.sigs: set[str] = set()


class _MemoryStore:
    """An LRU of entries keyed by (primary key, variant signature)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._lru: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._groups: dict[str, _Group] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, primary: str, headers: Headers) -> _Entry | None:
        group = self._groups.get(primary)
        if group is None:
            return None
        key = (primary, _signature(group.names, headers))
        entry = self._lru.get(key)
        if entry is not None:
            self._lru.move_to_end(key)
        return entry

    def put(self, primary: str, names: tuple[str, ...], sig: str, entry: _Entry) -> None:
        group = self._groups.get(primary)
        if group is not None and group.names != names:
            self._drop_group(primary, group)  # the upstream changed its Vary: the old variants are unreachable
            group = None
        if group is None:
            group = self._groups[primary] = _Group(names)
        key = (primary, sig)
        self._lru[key] = entry
        self._lru.move_to_end(key)
        group.sigs.add(sig)
        while len(self._lru) > self.max_entries:
            (old_primary, old_sig), _ = self._lru.popitem(last=False)
            self._forget(old_primary, old_sig)

    def delete(self, primary: str, headers: Headers) -> None:
        group = self._groups.get(primary)
        if group is not None:
            sig = _signature(group.names, headers)
            if self._lru.pop((primary, sig), None) is not None:
                self._forget(primary, sig)

    def purge(self, prefix: str | None) -> int:
        if prefix is None:
            count = len(self._lru)
            self._lru.clear()
            self._groups.clear()
            return count
        count = 0
        for primary in [p for p in self._groups if p.startswith(prefix)]:
            count += self._drop_group(primary, self._groups[primary])
        return count

    def _drop_group(self, primary: str, group: _Group) -> int:
        for sig in group.sigs:
            del self._lru[(primary, sig)]
        del self._groups[primary]
        return len(group.sigs)

    def _forget(self, primary: str, sig: str) -> None:
        group = self._groups[primary]
        group.sigs.discard(sig)
        if not group.sigs:
            del self._groups[primary]


# -- the Redis backend --------------------------------------------------------------------------------------------

# KEYS[1]: the URL's hash. ARGV: name, value, ... of the request's headers. Picks the variant the stored Vary names
# select, and returns {meta+body, stored-at, server time} (times as "seconds.micros" strings), or false.
_LOOKUP = """
local vary = redis.call('HGET', KEYS[1], 'vary')
if not vary then return false end
local values = {}
for i = 1, #ARGV, 2 do values[ARGV[i]] = ARGV[i + 1] end
local sig = ''
for name in string.gmatch(vary, '[^,]+') do
  sig = sig .. name .. '=' .. (values[name] or '') .. '\\n'
end
local field = redis.sha1hex(sig)
local got = redis.call('HMGET', KEYS[1], 'e:' .. field, 't:' .. field)
if not got[1] then return false end
local now = redis.call('TIME')
return {got[1], got[2], now[1] .. '.' .. string.format('%06d', now[2])}
"""

# KEYS[1]: the URL's hash. ARGV: vary names ("a,b"), variant field, meta+body, key TTL in ms.
# A changed Vary drops the old variants; the key lives as long as its longest-lived variant.
_STORE = """
local current = redis.call('HGET', KEYS[1], 'vary')
if current and current ~= ARGV[1] then redis.call('DEL', KEYS[1]) end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'vary', ARGV[1], 'e:' .. ARGV[2], ARGV[3],
  't:' .. ARGV[2], now[1] .. '.' .. string.format('%06d', now[2]))
local ttl = tonumber(ARGV[4])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class _RedisStore:
    """Entries in Redis: one hash per primary key, shared by every gateway replica with the same prefix."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace  # "<redis_prefix>:<scope>:"
        self._client: Any = None
        self._lookup: Any = None
        self._store: Any = None
        self._closed = False
        #: what a failed round trip raises (the driver's errors, socket errors, a closed store)
        self.errors: tuple[type[BaseException], ...] = (
            require("redis.exceptions", "redis").RedisError,
            OSError,
            UnicodeError,
            Unavailable,
        )

    def _connection(self) -> Any:
        if self._closed:
            raise Unavailable("the cache's Redis connection is closed")
        if self._client is None:
            module = require("redis.asyncio", "redis")
            self._client = module.Redis.from_url(self.url, decode_responses=False, socket_connect_timeout=5)
            self._lookup = self._client.register_script(_LOOKUP)
            self._store = self._client.register_script(_STORE)
        return self._client

    async def get(self, primary: str, headers: Headers) -> tuple[_Entry, float] | None:
        """The entry the request selects and how long it has been stored (seconds, Redis server clock)."""
        self._connection()
        # every request field, combined as _signature() combines them: the script picks the ones Vary names
        args: list[str] = []
        for name in dict.fromkeys(name for name, _ in headers.items()):
            args += (name, _combined(headers, name))
        got = await self._lookup(keys=[self.namespace + primary], args=args)
        if not got:
            return None
        blob, stored_at, now = got
        try:
            entry = _Entry.load(blob, 0.0)
            resident = max(0.0, float(now) - float(stored_at))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable cache entry in Redis; ignored", extra={"key": primary, "error": str(exc)})
            return None
        return entry, resident

    async def put(self, primary: str, names: tuple[str, ...], sig: str, entry: _Entry) -> None:
        self._connection()
        field = hashlib.sha1(sig.encode(), usedforsecurity=False).hexdigest()
        ttl_ms = max(1, round((max(entry.lifetime - entry.age, 0.0) + STALE_MARGIN) * 1000))
        blob = entry.meta() + b"\n" + entry.body
        await self._store(keys=[self.namespace + primary], args=[",".join(names), field, blob, ttl_ms])

    async def purge(self, prefix: str | None) -> int:
        client = self._connection()
        match = _glob_escape(self.namespace + (prefix or "")) + "*"
        removed = 0
        batch: list[bytes] = []
        async for key in client.scan_iter(match=match, count=500):
            batch.append(key)
            if len(batch) >= 500:
                removed += await self._unlink(batch)
                batch = []
        if batch:
            removed += await self._unlink(batch)
        return removed

    async def _unlink(self, keys: list[bytes]) -> int:
        """Delete ``keys``; the number of variants they held."""
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hlen(key)
        pipe.unlink(*keys)
        *lengths, _ = await pipe.execute()
        return sum(max(0, (int(n) - 1) // 2) for n in lengths)

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


# -- the plugin ---------------------------------------------------------------------------------------------------


def _all_methods() -> list[Literal["GET", "HEAD"]]:
    return ["GET", "HEAD"]


class ResponseCache(Plugin):
    """``cache``: serve fresh stored responses without calling the upstream (see the module docstring).

    YAML: ``- cache: {ttl: 5m, backend: redis, max_body: 262144, vary_by_consumer: true}``.
    """

    name: ClassVar[str] = "cache"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        #: freshness of responses that do not state theirs (seconds, or "30s", "5m", "1h"); 0: do not store those
        ttl: float = 60.0
        #: "memory" (per process) or "redis" (the gateway's shared Redis, context.redis_url)
        backend: Literal["memory", "redis"] = "memory"
        #: memory backend: the most entries (variants) kept; the least recently used go first
        max_entries: int = Field(default=10_000, ge=1)
        #: bodies larger than this (bytes) are not stored
        max_body: int = Field(default=1 << 20, ge=0)
        #: request methods answered from the cache (responses are stored from GET only)
        methods: list[Literal["GET", "HEAD"]] = Field(default_factory=_all_methods)
        #: key entries by the consumer an auth plugin set (when it set one): no answer crosses between callers
        vary_by_consumer: bool = True
        #: redis backend: the key prefix (replicas sharing a cache use the same one)
        redis_prefix: str = "meshkit:cache"

        @field_validator("ttl", mode="before")
        @classmethod
        def _ttl(cls, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError("ttl must be a number of seconds or a duration such as 30s or 5m")  # noqa: TRY004
            return parse_seconds(value)

        @field_validator("methods")
        @classmethod
        def _methods(cls, value: list[str]) -> list[str]:
            if not value:
                raise ValueError("methods cannot be empty")
            return value

    def __init__(self, options: Any = None, context: PluginContext | None = None) -> None:
        opts = options if options is not None else self.Options()
        ctx = context if context is not None else PluginContext(clock=time.monotonic)
        self._clock: Callable[[], float] = ctx.clock
        self._ttl = float(opts.ttl)
        self._max_body = int(opts.max_body)
        self._methods = frozenset(opts.methods)
        self._by_consumer = bool(opts.vary_by_consumer)
        self._hits = self._misses = self._stores = 0
        self._memory: _MemoryStore | None = None
        self._redis: _RedisStore | None = None
        self._writes: set[asyncio.Task[None]] = set()
        # where a request's lookup waits for its response (per instance: a global and a route cache may both run)
        self._state_key = f"cache:{id(self):x}"
        if opts.backend == "redis":
            if not ctx.redis_url:
                raise ConfigurationError(
                    "cache: backend 'redis' needs the gateway's redis_url", hint="set redis_url in the gateway config"
                )
            scope = quote(ctx.route, safe="") if ctx.route is not None else "%global"
            self._redis = _RedisStore(ctx.redis_url, f"{opts.redis_prefix}:{scope}:")
        else:
            self._memory = _MemoryStore(int(opts.max_entries))
        ctx.on_close(self.close)

    # -- hooks --

    def request(self, req: ProxyRequest) -> Reply | Awaitable[Reply | None] | None:
        if req.method not in self._methods:
            return None
        host = cache_control = authorization = range_ = inm = ims = None
        for name, value in req.headers.items():
            if name in _LOOKUP_FIELDS:
                if name == "host":
                    host = value
                elif name == "cache-control":
                    cache_control = value if cache_control is None else f"{cache_control},{value}"
                elif name == "authorization":
                    authorization = value
                elif name == "range":
                    range_ = value
                elif name == "if-none-match":
                    inm = value if inm is None else f"{inm},{value}"
                else:
                    ims = value
        keyed = self._by_consumer and req.consumer is not None
        primary = f"{req.path}\x00{req.query}\x00{(host or '').lower()}\x00{req.route}\x00"
        if keyed:
            primary += req.consumer or ""
        if primary.count("\x00") != _NUL_COUNT:
            return None  # a NUL in the path, query or host: not something to key a shared cache by
        pending = _Pending(primary, keyed=keyed, auth=authorization is not None)
        req.state[self._state_key] = pending
        if cache_control is not None:
            directives = _directives(cache_control)
            if "no-store" in directives:
                pending.no_store = True
                self._misses += 1
                return None
            if "no-cache" in directives:
                self._misses += 1
                return None
            if "max-age" in directives:
                pending.max_age = _seconds(directives["max-age"])
                if pending.max_age == 0:
                    self._misses += 1
                    return None
            pending.min_fresh = _seconds(directives.get("min-fresh"))
            pending.only_if_cached = "only-if-cached" in directives
        if range_ is not None:
            self._misses += 1
            return None
        pending.inm = inm
        pending.ims = ims
        if self._memory is not None:
            entry = self._memory.get(primary, req.headers)
            if entry is None:
                return self._miss(req, pending)
            return self._found(req, pending, entry, self._clock() - entry.stored_at)
        return self._redis_lookup(req, pending)

    async def _redis_lookup(self, req: ProxyRequest, pending: _Pending) -> Reply | None:
        assert self._redis is not None
        try:
            got = await self._redis.get(pending.primary, req.headers)
        except self._redis.errors as exc:
            log.warning("cache lookup failed; going upstream", extra={"route": req.route, "error": str(exc)})
            got = None
        if got is None:
            return self._miss(req, pending)
        return self._found(req, pending, *got)

    def response(self, req: ProxyRequest, resp: ResponseHead) -> None:
        pending = req.state.get(self._state_key)
        if not isinstance(pending, _Pending) or pending.no_store or req.method != "GET":
            return
        status = resp.status
        if status not in CACHEABLE_STATUSES:
            return
        headers = resp.headers
        cache_control: str | None = None
        expires = date = age = content_length = None
        vary: list[str] = []
        for name, value in headers.items():
            if name == "cache-control":
                cache_control = value if cache_control is None else f"{cache_control},{value}"
            elif name == "expires":
                expires = value
            elif name == "date":
                date = value
            elif name == "age":
                age = value
            elif name == "vary":
                vary.append(value)
            elif name == "content-length":
                content_length = value
            elif name == "set-cookie":
                return
        cc = _directives(cache_control)
        if "no-store" in cc or "private" in cc:
            return
        names = _vary_names(vary)
        if names is None:
            return
        auth_ok = "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
        if pending.auth and not pending.keyed and not auth_ok:
            return  # RFC 9111 §3.5: an authorized request's answer is not for a shared cache unless it says so
        if content_length is not None and content_length.isdigit() and int(content_length) > self._max_body:
            return
        lifetime = self._lifetime(cc, expires, date)
        initial_age = float((_seconds(age.strip()) if age is not None else None) or 0)
        stale = "no-cache" in cc
        if lifetime <= initial_age and not stale:
            return
        kept = [(n, v) for n, v in headers.items() if n not in _NOT_STORED]
        pending.entry = _Entry(status, kept, b"", max(lifetime, 0.0), initial_age, auth_ok=auth_ok, stale=stale)
        pending.names = names
        headers.set("x-cache", "MISS")

    def response_body(self, req: ProxyRequest, resp: ResponseHead, body: bytes) -> bytes:
        pending = req.state.get(self._state_key)
        if not isinstance(pending, _Pending) or pending.entry is None:
            return body
        entry, pending.entry = pending.entry, None
        if len(body) > self._max_body:
            return body
        entry.body = body
        sig = _signature(pending.names, req.headers)
        if self._memory is not None:
            entry.stored_at = self._clock()
            self._memory.put(pending.primary, pending.names, sig, entry)
            self._stores += 1
        else:
            self._spawn_write(pending.primary, pending.names, sig, entry, req.route)
        return body

    def _miss(self, req: ProxyRequest, pending: _Pending) -> Reply | None:
        self._misses += 1
        if pending.only_if_cached:
            del req.state[self._state_key]
            return Reply.error(504, "the response is not in the cache (only-if-cached)")
        return None

    def _found(self, req: ProxyRequest, pending: _Pending, entry: _Entry, resident: float) -> Reply | None:
        current_age = entry.age + resident
        if entry.stale or current_age >= entry.lifetime:
            if self._memory is not None and not entry.stale:
                self._memory.delete(pending.primary, req.headers)
            return self._miss(req, pending)
        if pending.auth and not pending.keyed and not entry.auth_ok:
            return self._miss(req, pending)
        if pending.max_age is not None and current_age > pending.max_age:
            return self._miss(req, pending)
        if pending.min_fresh is not None and entry.lifetime - current_age < pending.min_fresh:
            return self._miss(req, pending)
        self._hits += 1
        del req.state[self._state_key]
        if _not_modified(entry, pending.inm, pending.ims):
            headers = Headers([(n, v) for n, v in entry.headers if n in _FOR_304])
            status, body = 304, b""
        else:
            # HEAD gets the whole entry too: the gateway frames a reply by its body and sends no body to HEAD
            headers = Headers._trusted(entry.headers.copy())  # stored names are lower-case already
            status, body = entry.status, entry.body
        headers.set("age", str(int(current_age)))
        headers.set("x-cache", "HIT")
        return Reply(status, headers, body)

    # -- the purge API --

    async def purge(self, prefix: str | None = None) -> int:
        """Remove entries whose path starts with ``prefix`` (``None``: all of this plugin's); how many went.

        With the Redis backend "this plugin's" means every replica's entries for the same prefix and route.
        """
        if self._memory is not None:
            return self._memory.purge(prefix)
        assert self._redis is not None
        try:
            return await self._redis.purge(prefix)
        except self._redis.errors as exc:
            raise Unavailable(f"cache purge in Redis at {redact(self._redis.url)} failed: {exc}") from exc

    def stats(self) -> dict[str, int | None]:
        """``entries`` (memory; ``None`` for Redis, whose entries are shared), and this process's hits, misses and
        stores."""
        return {
            "entries": len(self._memory) if self._memory is not None else None,
            "hits": self._hits,
            "misses": self._misses,
            "stores": self._stores,
        }

    async def close(self) -> None:
        """Finish the writes in flight and close the Redis connection (registered with ``context.on_close``)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._redis is not None:
            await self._redis.close()

    # -- internals --

    def _lifetime(self, cc: dict[str, str | None], expires: str | None, date: str | None) -> float:
        if "s-maxage" in cc:
            return float(_seconds(cc["s-maxage"]) or 0)
        if "max-age" in cc:
            return float(_seconds(cc["max-age"]) or 0)
        if expires is not None:
            until = _http_date(expires)
            if until is None:
                return 0.0  # an invalid Expires means "already expired" (RFC 9111 §5.3)
            base = _http_date(date)
            return until - (base if base is not None else time.time())
        return self._ttl

    def _spawn_write(self, primary: str, names: tuple[str, ...], sig: str, entry: _Entry, route: str) -> None:
        task = asyncio.get_running_loop().create_task(self._write(primary, names, sig, entry, route))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, primary: str, names: tuple[str, ...], sig: str, entry: _Entry, route: str) -> None:
        assert self._redis is not None
        try:
            await self._redis.put(primary, names, sig, entry)
        except self._redis.errors as exc:
            log.warning("cache store failed", extra={"route": route, "error": str(exc)})
            return
        self._stores += 1


def _not_modified(entry: _Entry, inm: str | None, ims: str | None) -> bool:
    """Whether the client's validators match the entry: ``If-None-Match`` (weak comparison) wins over
    ``If-Modified-Since`` (RFC 9110 §13.2.2)."""
    if inm is not None:
        if entry.etag is None:
            return False
        if inm.strip() == "*":
            return True
        return entry.etag in _etags(inm)
    if ims is not None and entry.last_modified is not None:
        since = _http_date(ims)
        return since is not None and entry.last_modified <= since
    return False
