"""``redis://host:port/db`` and ``rediss://``: a registry several hosts share (Redis 7 or newer).

Layout on the server (``prefix`` is ``meshkit:registry:`` unless the URL or an option says otherwise; the service
name is wrapped in ``{...}`` so that, in a cluster, every key of one service lives in one hash slot)::

    <prefix>{<service>}:i:<id>   HASH    d (descriptor JSON), h (status), r (registered ms), s (last seen ms),
                                         t (ttl ms); with a TTL (PEXPIRE) of the lease: the key IS the lease
    <prefix>{<service>}:idx      ZSET    instance id -> when its lease ends (server ms)
    <prefix>{<service>}:log      STREAM  the change log: k (added / changed / removed), id, and d h r s

Times are the Redis server's (``TIME``), the one clock every client shares. Every change is one Lua script, so the
instance key, the index and the log change together, atomically, whichever process or host makes the change.
Every script first reaps: the ids in ``idx`` whose lease has ended lose their key and are logged ``removed``, once.

Watching is a stream of changes plus polling (keyspace notifications are off by default on most servers and are
not delivered reliably, so they are not used): a watcher reads its snapshot and the log's last id in one script,
then every ``poll_interval`` seconds (0.1) runs a script that reaps and returns the log entries after its cursor.
The log is capped near ``log_maxlen`` entries (10,000; ``XADD MAXLEN ~``); a watcher whose cursor was trimmed away
(older than the log's first entry) reads a new snapshot.

Options (URL query parameters or ``connect(url, **options)``): ``prefix``, ``poll_interval``, ``log_maxlen``,
``connect_timeout`` (5 s), ``max_connections`` (16).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlunsplit

from meshkit._core.clock import Clock
from meshkit._core.optional import require
from meshkit._core.urls import Parser, redact, redis_url, url_options
from meshkit.discovery.base import Capabilities, HealthStatus, Instance, LogEntry, Registry, Resync
from meshkit.errors import ConfigurationError, Unavailable

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.commands.core import AsyncScript

__all__ = ["RedisRegistry", "from_url"]

log = logging.getLogger("meshkit.discovery.redis")

# KEYS[1] idx, KEYS[2] log, KEYS[3] the instance key (or the idx again); ARGV[1] the instance key prefix,
# ARGV[2] log_maxlen. Instance keys are built from ARGV[1] inside the script: all of them share the hash slot of
# KEYS[1], the service's ``{...}``.
_LUA_COMMON = """
local IDX, LOG, KEY = KEYS[1], KEYS[2], KEYS[3]
local IPFX, MAXLEN = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function log(kind, id, d, h, r, s)
  if kind == 'removed' then
    redis.call('XADD', LOG, 'MAXLEN', '~', MAXLEN, '*', 'k', kind, 'id', id)
  else
    redis.call('XADD', LOG, 'MAXLEN', '~', MAXLEN, '*', 'k', kind, 'id', id, 'd', d, 'h', h, 'r', r, 's', s)
  end
end
local ended = redis.call('ZRANGEBYSCORE', IDX, '-inf', NOW)
for _, id in ipairs(ended) do
  redis.call('ZREM', IDX, id)
  redis.call('DEL', IPFX .. id)
  log('removed', id)
end
"""

# ARGV[3] id, ARGV[4] descriptor, ARGV[5] status, ARGV[6] ttl ms -> {registered ms, last seen ms}
_PUT = (
    _LUA_COMMON
    + """
local id, d, h, ttl = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local old = redis.call('HMGET', KEY, 'd', 'h', 'r')
local r = old[3] or tostring(NOW)
redis.call('HSET', KEY, 'd', d, 'h', h, 'r', r, 's', NOW, 't', ttl)
redis.call('PEXPIRE', KEY, ttl)
redis.call('ZADD', IDX, NOW + ttl, id)
if not old[1] then
  log('added', id, d, h, r, NOW)
elseif old[1] ~= d or old[2] ~= h then
  log('changed', id, d, h, r, NOW)
end
return {r, tostring(NOW)}
"""
)

# ARGV[3] id -> 1 renewed, 0 not live
_TOUCH = (
    _LUA_COMMON
    + """
local ttl = redis.call('HGET', KEY, 't')
if not ttl then return 0 end
redis.call('HSET', KEY, 's', NOW)
redis.call('PEXPIRE', KEY, ttl)
redis.call('ZADD', IDX, NOW + tonumber(ttl), ARGV[3])
return 1
"""
)

# ARGV[3] id -> 1 removed, 0 not live
_REMOVE = (
    _LUA_COMMON
    + """
redis.call('ZREM', IDX, ARGV[3])
if redis.call('DEL', KEY) == 0 then return 0 end
log('removed', ARGV[3])
return 1
"""
)

# ARGV[3] id, ARGV[4] status -> 1 set, 0 not live
_STATUS = (
    _LUA_COMMON
    + """
local old = redis.call('HMGET', KEY, 'd', 'h', 'r', 's')
if not old[1] then return 0 end
if old[2] ~= ARGV[4] then
  redis.call('HSET', KEY, 'h', ARGV[4])
  log('changed', ARGV[3], old[1], ARGV[4], old[3], old[4])
end
return 1
"""
)

# -> {last log id, {d, h, r, s}, {d, h, r, s}, ...}
_SNAPSHOT = (
    _LUA_COMMON
    + """
local last = '0-0'
local top = redis.call('XREVRANGE', LOG, '+', '-', 'COUNT', 1)
if top[1] then last = top[1][1] end
local out = {last}
for _, id in ipairs(redis.call('ZRANGE', IDX, 0, -1)) do
  local row = redis.call('HMGET', IPFX .. id, 'd', 'h', 'r', 's')
  if row[1] then table.insert(out, row) end
end
return out
"""
)

# ARGV[3] cursor -> {first log id, entries ever added, length, entries after the cursor}
_POLL = (
    _LUA_COMMON
    + """
if redis.call('EXISTS', LOG) == 0 then return {'0-0', 0, 0, {}} end
local info = redis.call('XINFO', 'STREAM', LOG)
local added, length = 0, 0
for i = 1, #info, 2 do
  if info[i] == 'entries-added' then added = info[i + 1] end
  if info[i] == 'length' then length = info[i + 1] end
end
local first = redis.call('XRANGE', LOG, '-', '+', 'COUNT', 1)
local first_id = '0-0'
if first[1] then first_id = first[1][1] end
return {first_id, added, length, redis.call('XRANGE', LOG, '(' .. ARGV[3], '+', 'COUNT', 1000)}
"""
)


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _instance(d: str, h: str, r: str, s: str) -> Instance:
    return Instance.from_stored(d, h, int(r) / 1000, int(s) / 1000)


class RedisRegistry(Registry):
    capabilities = Capabilities(shared=True, durable=True)

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "meshkit:registry:",
        poll_interval: float = 0.1,
        log_maxlen: int = 10_000,
        connect_timeout: float = 5.0,
        max_connections: int = 16,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock=clock)
        self.url = url
        self.prefix = prefix
        self.poll_interval = poll_interval
        self.log_maxlen = log_maxlen
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._shut = False  # the client is gone for good

    def __repr__(self) -> str:
        return f"RedisRegistry({redact(self.url)!r}, prefix={self.prefix!r})"

    def _connection(self) -> aioredis.Redis:
        if self._shut:
            raise ConfigurationError(f"the Redis registry {self!r} is closed")
        if self._client is None:
            module = require("redis.asyncio", "redis")
            self._client = module.Redis.from_url(
                self.url,
                decode_responses=True,
                socket_connect_timeout=self._connect_timeout,
                max_connections=self._max_connections,
            )
            for name, lua in (
                ("put", _PUT),
                ("touch", _TOUCH),
                ("remove", _REMOVE),
                ("status", _STATUS),
                ("snapshot", _SNAPSHOT),
                ("poll", _POLL),
            ):
                self._scripts[name] = self._client.register_script(lua)
        return self._client

    async def _script(self, name: str, service: str, instance_id: str | None, *args: str | int) -> Any:
        self._connection()
        base = f"{self.prefix}{{{service}}}:"
        keys = [f"{base}idx", f"{base}log", f"{base}i:{instance_id}" if instance_id is not None else f"{base}idx"]
        argv = [f"{base}i:", self.log_maxlen, *args]
        redis_errors = require("redis.exceptions", "redis")
        try:
            return await self._scripts[name](keys=keys, args=argv)
        except (redis_errors.RedisError, OSError) as exc:
            raise Unavailable(f"the Redis registry at {redact(self.url)} failed: {exc}") from exc

    async def _put(self, instance: Instance, ttl: float) -> Instance:
        ms = max(1, round(ttl * 1000))
        descriptor, status = instance.descriptor(), str(instance.status)
        registered, seen = await self._script("put", instance.service, instance.id, instance.id, descriptor, status, ms)
        return _instance(descriptor, status, registered, seen)

    async def _touch(self, service: str, instance_id: str) -> bool:
        return bool(await self._script("touch", service, instance_id, instance_id))

    async def _remove(self, service: str, instance_id: str) -> bool:
        return bool(await self._script("remove", service, instance_id, instance_id))

    async def _set_status(self, service: str, instance_id: str, status: HealthStatus) -> bool:
        return bool(await self._script("status", service, instance_id, instance_id, str(status)))

    async def _list(self, service: str) -> list[Instance]:
        instances, _ = await self._snapshot(service)
        return instances

    async def _snapshot(self, service: str) -> tuple[list[Instance], str]:
        out = await self._script("snapshot", service, None)
        return [_instance(*row) for row in out[1:]], str(out[0])

    async def _changes(self, service: str, cursor: str) -> tuple[list[LogEntry], str]:
        first, added, length, rows = await self._script("poll", service, None, cursor)
        # Trimming (MAXLEN ~) drops the oldest entries: if the cursor's own entry is gone, entries after it may be
        # too (a watcher that started on an empty log has lost some if any entry was ever trimmed).
        lost = int(added) > int(length) if cursor == "0-0" else _id_tuple(cursor) < _id_tuple(first)
        if lost:
            raise Resync
        if not rows:
            await self._wait_or_close(self.poll_interval)
            return [], cursor
        entries: list[LogEntry] = []
        for _, flat in rows:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            kind = fields["k"]
            instance = None if kind == "removed" else _instance(fields["d"], fields["h"], fields["r"], fields["s"])
            entries.append(LogEntry(kind, fields["id"], instance))
        return entries, rows[-1][0]

    async def _aclose(self) -> None:
        client, self._client = self._client, None
        self._shut = True
        self._scripts.clear()
        if client is not None:
            await client.aclose()


_OPTIONS: dict[str, Parser] = {
    "prefix": str,
    "poll_interval": float,
    "log_maxlen": int,
    "connect_timeout": float,
    "max_connections": int,
}


def from_url(url: str, **options: Any) -> RedisRegistry:
    """``redis://[[user]:password@]host[:port][/db][?option=value&...]`` or ``rediss://`` (TLS).

    Options come from the query string or ``options`` (keyword arguments win); unknown ones are refused by name.
    """
    parts = redis_url(url, "Redis registry")
    given, _ = url_options(url, _OPTIONS, options, what="Redis registry", keywords=("clock",))
    return RedisRegistry(urlunsplit(parts._replace(query="")), **given)
