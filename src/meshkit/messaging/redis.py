"""``redis://host:port/db`` and ``rediss://``: Redis Streams (Redis 6.2 or newer; 7 recommended).

Layout on the server (``prefix`` is ``meshkit:`` unless the URL or an option says otherwise; the topic is wrapped in
``{...}`` so that, in a cluster, every key of one topic lives in one hash slot)::

    <prefix>{<topic>}                    the topic: a stream, one entry per message (binary mode, below)
    <prefix>{<topic>}:id:<message id>    a dedup marker (SET NX with an expiry of ``dedup_window`` seconds)
    <prefix>{<topic>}:g:<group>:ready    ZSET  entry id -> when (server ms) it may be delivered again
    <prefix>{<topic>}:g:<group>:wait     ZSET  "<partition key>\\0<padded entry id>": entries waiting for their key
    <prefix>{<topic>}:g:<group>:locks    HASH  partition key -> the entry id holding it
    <prefix>{<topic>}:g:<group>:holds    HASH  entry id -> the partition key it holds
    <prefix>{<topic>}:g:<group>:meta     HASH  when stuck entries were last looked for, and where (a PEL cursor)

Each entry's fields are the CloudEvents attributes in the Kafka binding's binary-mode naming (``ce_specversion``,
``ce_id``, ``ce_source``, ``ce_type``, ``ce_time``, ``ce_subject``, ``ce_<extension>`` such as
``ce_partitionkey`` and ``ce_traceparent``, and ``content-type`` for ``datacontenttype``) plus ``data``, the
encoded data as it is. There is no CloudEvents binding for Redis; this one lets a plain client use the SDK's Kafka
binding (fields as headers, ``data`` as the value). An entry whose ``content-type`` is
``application/cloudevents+json`` and has no ``ce_specversion`` is read as a structured-mode event in ``data``.

How the promises of :mod:`meshkit.messaging.base` map onto Redis (every step that touches several keys is one Lua
script, so it is atomic and members in any number of processes see one consistent state):

- groups: a meshkit group is a Redis consumer group (``XGROUP CREATE ... MKSTREAM``) created at ``start``: ``0``,
  ``$``, the entry before an offset, or the last entry before a time (stream ids are millisecond timestamps).
  Each member is a Redis consumer named by a fresh uuid. A fetch reads new entries with ``XREADGROUP``.
- offsets: ``Delivery.offset`` is the entry id ``<ms>-<seq>`` as one integer, ``ms << 64 | seq``.
- in flight: an entry a member holds in the group's PEL (Redis keeps who has what; meshkit adds nothing).
- acks: ``XACK`` with every id of a batch in one call (the runtime batches acks).
- delivery counts: the PEL's own counter, read with ``XPENDING`` when an entry is claimed again (``XCLAIM``
  increments it); an entry read the first time is attempt 1.
- redelivery (``nack``) and ``release``: the entry moves in the PEL to the pseudo-consumer ``meshkit.pool``
  (``XCLAIM ... JUSTID``; a release also sets ``RETRYCOUNT`` one lower, so it is not counted) and into ``ready``
  with the time it is due; the next fetch of any member claims it with ``XCLAIM``.
- stuck messages: a member that died leaves its entries in the PEL. Every ``visibility_timeout / 4`` one fetch
  runs ``XPENDING <stream> <group> IDLE <visibility_timeout> ...``: entries that a member holds and that were idle
  that long move to ``meshkit.pool`` (``XCLAIM ... JUSTID``) and ``ready``, and are delivered again with their
  count + 1. A handler that runs longer than ``visibility_timeout`` may therefore see its message twice (at least
  once, as promised).
- per-key order: an entry with ``ce_partitionkey`` is handed out only if its key is free (``locks``); otherwise it
  is parked in the pool and in ``wait``. The key stays held through nacks and releases until the holder is acked;
  the ack then passes the key to the oldest waiting entry of that key. So one group never has two entries of one
  key in flight, whichever members or processes fetch.
- dedup: the append script does ``SET <prefix>{<topic>}:id:<id> 1 NX PX <window>`` before each ``XADD``; an id
  seen within ``dedup_window`` is dropped. One script call appends up to 500 messages; a larger batch is several
  calls in one pipeline. The call carries the attributes that messages share once, not once per message.
- fetching: one script call reads, locks keys and returns the batch as two strings (JSON attributes, and the
  data concatenated), which the client parses far faster than one reply element per field.
- retention: ``XADD ... MAXLEN ~ maxlen`` (1,000,000 by default), or ``MINID ~ <now - retention>`` when
  ``retention`` (seconds) is set. Trimming does not wait for slow groups: entries trimmed before a group read them
  are gone for that group (a trimmed entry still pending is dropped from the PEL and its key passed on).
- dead letters: the shared runtime publishes to ``<topic>.dlq`` (another stream) and acks.
- waiting: a fetch with nothing to return polls again after 1 ms, backing off to ``poll`` seconds (0.1); appends,
  acks, nacks and releases made in this process wake this process's fetchers at once.

Capabilities: replay (the stream is a log), dedup (within ``dedup_window``), durable (messages outlive every
client process; they survive a Redis restart only if the server persists: AOF with ``appendfsync always`` for
no loss of an acknowledged publish, ``everysec`` loses up to a second), multi_process.

Options (URL query parameters or ``connect(url, **options)``): ``prefix``, ``visibility_timeout`` (30 s),
``dedup_window`` (600 s; 0 turns dedup off), ``maxlen``, ``retention``, ``poll`` (0.1 s), ``max_connections``
(64), ``connect_timeout`` (5 s), and redis-py's ``socket_timeout``, ``socket_keepalive``,
``health_check_interval``, ``client_name``, ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_check_hostname``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlunsplit

from meshkit._core.optional import require
from meshkit._core.urls import flag, redact, redis_url, url_options
from meshkit.errors import ConfigurationError, MeshkitError, MessageDecodeError, Unavailable
from meshkit.messaging.base import (
    Backend,
    Capabilities,
    Delivery,
    GroupChannel,
    GroupNotFound,
    Lag,
    StartFrom,
    make_delivery,
)
from meshkit.messaging.message import Envelope, decode_structured, make_envelope

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["RedisBackend", "from_url"]

log = logging.getLogger("meshkit.messaging.redis")

T = TypeVar("T")

POOL = "meshkit.pool"  # the pseudo-consumer that owns entries read from the stream but not in flight
_KEY_FIELD = "ce_partitionkey"
_SEQ_BITS = 64
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_CHUNK = 500  # messages per append script call; a batch is several calls in one pipeline
# fields that hold a CloudEvents attribute (other ``ce_`` fields are extensions; ``ce_subject`` is optional)
_ATTRIBUTE_FIELDS = frozenset({"ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "content-type"})
# one encoder and decoder for every call (json.dumps with arguments builds a new encoder each time)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.JSONDecoder().decode

# Shared Lua: the group's keys are KEYS[1..6] in every script below. An entry is in flight when a member (any
# consumer but meshkit.pool) holds it in the group's PEL: Redis keeps that state, so no script writes it again.
_LUA_COMMON = """
local S, R, W, L, H, M = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local POOL = 'meshkit.pool'
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function pad(id)
  local dash = string.find(id, '-', 1, true)
  local ms, seq = string.sub(id, 1, dash - 1), string.sub(id, dash + 1)
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
end
local function unpad(p)
  local ms, seq = string.sub(p, 1, 20), string.sub(p, 22)
  ms = string.gsub(ms, '^0+', '')
  seq = string.gsub(seq, '^0+', '')
  if ms == '' then ms = '0' end
  if seq == '' then seq = '0' end
  return ms .. '-' .. seq
end
-- id no longer holds its key (acked, or gone from the stream): pass the key to the oldest entry waiting for it
local function pass_key(id)
  local key = redis.call('HGET', H, id)
  if not key then return 0 end
  redis.call('HDEL', H, id)
  if redis.call('HGET', L, key) ~= id then return 0 end
  local nxt = redis.call('ZRANGEBYLEX', W, '[' .. key .. '\\0', '[' .. key .. '\\1', 'LIMIT', 0, 1)
  if #nxt == 0 then
    redis.call('HDEL', L, key)
    return 0
  end
  redis.call('ZREM', W, nxt[1])
  local nid = unpad(string.sub(nxt[1], #key + 2))
  redis.call('HSET', L, key, nid)
  redis.call('HSET', H, nid, key)
  redis.call('ZADD', R, 0, nid)
  return 1
end
"""

# ARGV: group, member, limit, visibility ms, max new entries read per call.
# Returns {meta, data, wake}: meta is the JSON list of the deliveries; data is the data of all of them,
# concatenated; wake is how many ms until the next entry in ready is due (-1: none). A delivery is
#   [entry id, delivery count, length of its data, ce_id, ce_source, ce_type, ce_time, content-type, field, value...]
# for an entry in meshkit's layout (the fields after content-type follow; the names of the first six are implied),
#   [entry id, delivery count, length of its data, [field, value, ...]] for any other (every field but data).
# Three bulk replies instead of ~20 per entry: the driver's reply parser (pure Python without hiredis) costs far more
# per element than json.loads.
_FETCH = (
    _LUA_COMMON
    + """
local group, me, limit, vis, budget = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = server_ms()
local meta, datas = {}, {}
local function emit(id, count, fields)
  local n = #fields
  if n >= 14 and fields[n - 1] == 'data' and fields[1] == 'ce_specversion' and fields[3] == 'ce_id'
      and fields[5] == 'ce_source' and fields[7] == 'ce_type' and fields[9] == 'ce_time'
      and fields[11] == 'content-type' then
    local row = {id, count, #fields[n], fields[4], fields[6], fields[8], fields[10], fields[12]}
    for i = 13, n - 2 do row[#row + 1] = fields[i] end
    meta[#meta + 1] = row
    datas[#datas + 1] = fields[n]
    return
  end
  local rest, data = {}, ''
  for i = 1, n, 2 do
    if fields[i] == 'data' then
      data = fields[i + 1]
    else
      rest[#rest + 1] = fields[i]
      rest[#rest + 1] = fields[i + 1]
    end
  end
  meta[#meta + 1] = {id, count, #data, rest}
  datas[#datas + 1] = data
end
-- 1. entries that members hold and have not touched for the visibility timeout go back to ready (rate-limited,
-- shared; a cursor walks the PEL 1000 idle entries at a time, so entries parked in the pool cannot hide the rest)
local last = tonumber(redis.call('HGET', M, 'recovered') or '0')
if now - last >= vis / 4 then
  redis.call('HSET', M, 'recovered', now)
  local cursor = redis.call('HGET', M, 'cursor') or '-'
  if string.sub(cursor, 1, 1) ~= '-' and string.sub(cursor, 1, 1) ~= '(' then cursor = '-' end
  local idle = redis.call('XPENDING', S, group, 'IDLE', vis, cursor, '+', 1000)
  if #idle < 1000 then cursor = '-' else cursor = '(' .. idle[#idle][1] end
  redis.call('HSET', M, 'cursor', cursor)
  for _, row in ipairs(idle) do
    local id = row[1]
    if row[2] ~= POOL then
      if #redis.call('XCLAIM', S, group, POOL, 0, id, 'JUSTID') > 0 then
        redis.call('ZADD', R, 0, id)
      else  -- trimmed from the stream: Redis dropped it from the PEL
        redis.call('ZREM', R, id)
        pass_key(id)
      end
    end
  end
end
-- 2. entries that are due again (nacked, released, recovered, or handed a key)
local rounds = 0
while #meta < limit and rounds < 4 do
  rounds = rounds + 1
  local due = redis.call('ZRANGEBYSCORE', R, '-inf', now, 'LIMIT', 0, limit - #meta)
  if #due == 0 then break end
  for _, id in ipairs(due) do
    redis.call('ZREM', R, id)
    local got = redis.call('XCLAIM', S, group, me, 0, id)
    if got[1] and got[1][2] then
      local p = redis.call('XPENDING', S, group, id, id, 1)
      emit(id, tonumber(p[1][4]), got[1][2])
    else  -- trimmed from the stream
      redis.call('XACK', S, group, id)
      pass_key(id)
    end
  end
end
-- 3. new entries
local read = 0
while #meta < limit and read < budget do
  local res = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', limit - #meta, 'STREAMS', S, '>')
  if not res or not res[1] or #res[1][2] == 0 then break end
  for _, e in ipairs(res[1][2]) do
    read = read + 1
    local id, fields = e[1], e[2]
    local key = nil
    for i = 1, #fields, 2 do
      if fields[i] == 'ce_partitionkey' then key = fields[i + 1] break end
    end
    if key and redis.call('HSETNX', L, key, id) == 0 then
      redis.call('XCLAIM', S, group, POOL, 0, id, 'JUSTID', 'RETRYCOUNT', 0)
      redis.call('ZADD', W, 0, key .. '\\0' .. pad(id))
    else
      if key then redis.call('HSET', H, id, key) end
      emit(id, 1, fields)
    end
  end
end
local nxt = redis.call('ZRANGE', R, 0, 0, 'WITHSCORES')
local wake = -1
if nxt[2] then wake = tonumber(nxt[2]) - now end
if #meta == 0 then return {'', '', wake} end
return {cjson.encode(meta), table.concat(datas), wake}
"""
)

# ARGV: group, the entry ids separated by spaces (one argument: cheaper to send than one argument per id)
_ACK = (
    _LUA_COMMON
    + """
local group = ARGV[1]
local ids = {}
for id in string.gmatch(ARGV[2], '[^ ]+') do ids[#ids + 1] = id end
local woke = 0
for i = 1, #ids, 1000 do
  local j = math.min(i + 999, #ids)
  redis.call('XACK', S, group, unpack(ids, i, j))
  redis.call('ZREM', R, unpack(ids, i, j))  -- recovered while its handler was still running
  -- only entries with a partition key hold one: look them up in one call, pass on the keys they held
  if redis.call('EXISTS', H) == 1 then
    local held = redis.call('HMGET', H, unpack(ids, i, j))
    for k = 1, j - i + 1 do
      if held[k] then woke = woke + pass_key(ids[i + k - 1]) end
    end
  end
end
return woke
"""
)

# ARGV: group, member, delay ms ('-1' for a release: at once and not counted), ids...
_SETTLE = (
    _LUA_COMMON
    + """
local group, me, delay = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = server_ms()
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', S, group, id, id, 1)
  if p[1] and p[1][2] == me then  -- still ours (not recovered for another member meanwhile)
    if delay < 0 then
      redis.call('XCLAIM', S, group, POOL, 0, id, 'JUSTID', 'RETRYCOUNT', math.max(tonumber(p[1][4]) - 1, 0))
      redis.call('ZADD', R, 0, id)
    else
      redis.call('XCLAIM', S, group, POOL, 0, id, 'JUSTID')
      redis.call('ZADD', R, now + delay, id)
    end
    n = n + 1
  end
end
return n
"""
)

# ARGV: group, member. Everything the member still holds goes back (not counted); then the consumer is deleted.
_LEAVE = (
    _LUA_COMMON
    + """
local group, me = ARGV[1], ARGV[2]
local n = 0
while true do
  local p = redis.pcall('XPENDING', S, group, '-', '+', 1000, me)
  if p.err then return n end  -- the stream or the group was deleted meanwhile: there is nothing left to leave
  if #p == 0 then break end
  for _, row in ipairs(p) do
    local id = row[1]
    redis.call('XCLAIM', S, group, POOL, 0, id, 'JUSTID', 'RETRYCOUNT', math.max(tonumber(row[4]) - 1, 0))
    redis.call('ZADD', R, 0, id)
    n = n + 1
  end
end
redis.call('XGROUP', 'DELCONSUMER', S, group, me)
return n
"""
)

# KEYS: the stream. ARGV: dedup ms, trim kind ('MAXLEN' or 'MINID'), trim value, the plan, the data.
# The plan is JSON: [templates, rows]. A template is an entry's whole field list with its ce_id value (4th) and its
# data (last) left blank; messages of one publish share a few (often one). rows is flat: per message the template's
# index, its id and the length of its data; the data of every message is ARGV[5], concatenated. So a batch is five
# arguments, however many messages and headers it has.
_APPEND = """
local S = KEYS[1]
local window = tonumber(ARGV[1])
local kind, limit = ARGV[2], ARGV[3]
local plan = cjson.decode(ARGV[4])
local blob = ARGV[5]
local templates, rows = plan[1], plan[2]
local pos = 1
local added = 0
for i = 1, #rows, 3 do
  local t, id, n = templates[rows[i]], rows[i + 1], rows[i + 2]
  local fresh = true
  if window > 0 then
    fresh = redis.call('SET', S .. ':id:' .. id, '1', 'NX', 'PX', window)
  end
  if fresh then
    t[4] = id
    t[#t] = string.sub(blob, pos, pos + n - 1)
    redis.call('XADD', S, kind, '~', limit, '*', unpack(t))
    added = added + 1
  end
  pos = pos + n
end
return added
"""


def offset_of(entry_id: str) -> int:
    """A stream entry id ``<ms>-<seq>`` as one integer (``ms << 64 | seq``): what ``Delivery.offset`` holds."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) << _SEQ_BITS | int(seq or 0)


def entry_id_of(offset: int) -> str:
    return f"{offset >> _SEQ_BITS}-{offset & _SEQ_MASK}"


def _before(offset: int) -> str:
    """The entry id just before ``offset``: a group created there starts at ``offset``."""
    if offset <= 0:
        return "0-0"
    return entry_id_of(offset - 1) if offset & _SEQ_MASK else f"{(offset >> _SEQ_BITS) - 1}-{_SEQ_MASK}"


class _GroupKeys:
    __slots__ = ("keys", "stream")

    def __init__(self, stream: str, group: str) -> None:
        base = f"{stream}:g:{group}:"
        self.stream = stream
        self.keys = [stream, *(base + part for part in ("ready", "wait", "locks", "holds", "meta"))]


class RedisBackend(Backend):
    """Redis Streams (see the module docstring for the layout and how each promise maps onto Redis)."""

    capabilities = Capabilities(replay=True, dedup=True, durable=True, multi_process=True)

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "meshkit:",
        visibility_timeout: float = 30.0,
        dedup_window: float = 600.0,
        maxlen: int = 1_000_000,
        retention: float | None = None,
        poll: float = 0.1,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
        **redis_options: Any,
    ) -> None:
        if visibility_timeout <= 0 or dedup_window < 0 or maxlen < 1 or poll <= 0 or max_connections < 1:
            raise ConfigurationError(
                "Redis broker options out of range",
                hint="visibility_timeout > 0, dedup_window >= 0, maxlen >= 1, poll > 0, max_connections >= 1",
            )
        if retention is not None and retention <= 0:
            raise ConfigurationError("Redis broker option retention must be > 0 seconds", hint="or leave it unset")
        self.url = url
        self.prefix = prefix
        self.visibility_timeout = visibility_timeout
        self.dedup_window = dedup_window
        self.maxlen = maxlen
        self.retention = retention
        self.poll = poll
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._redis_options = redis_options
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._slots: asyncio.Semaphore | None = None  # at most max_connections calls at once
        self._wakes: dict[str, set[asyncio.Event]] = {}  # stream key -> the events of fetchers waiting on it
        self._closed = False

    # -- the connection --------------------------------------------------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        if self._closed:
            raise ConfigurationError(f"the Redis broker on {redact(self.url)} is closed")
        if self._client is None:
            aioredis_mod = require("redis.asyncio", "redis")
            retry_mod = require("redis.asyncio.retry", "redis")
            backoff_mod = require("redis.backoff", "redis")
            options: dict[str, Any] = {
                "max_connections": self._max_connections,
                "socket_connect_timeout": self._connect_timeout,
                "socket_timeout": 10.0,  # no command of ours blocks on the server: a silent server is an error
                "retry": retry_mod.Retry(backoff_mod.ExponentialBackoff(cap=0.2, base=0.01), 2),
                **self._redis_options,
            }
            try:
                # a plain pool; _call's semaphore makes callers wait for a connection instead of failing (redis-py's
                # BlockingConnectionPool has had deadlocks under many waiters: redis/redis-py#3056)
                pool = aioredis_mod.ConnectionPool.from_url(self.url, **options)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(f"bad Redis broker URL {redact(self.url)!r}: {exc}") from exc
            self._client = aioredis_mod.Redis(connection_pool=pool)
            self._scripts = {
                name: self._client.register_script(source)
                for name, source in (
                    ("fetch", _FETCH),
                    ("ack", _ACK),
                    ("settle", _SETTLE),
                    ("leave", _LEAVE),
                    ("append", _APPEND),
                )
            }
        return self._client

    async def _call(self, what: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one Redis call; driver errors become meshkit errors that name the server."""
        client = self._redis()
        exceptions = require("redis.exceptions", "redis")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_connections)
        try:
            async with self._slots:
                return await fn(client)
        except (exceptions.AuthenticationError, exceptions.AuthorizationError) as exc:
            raise ConfigurationError(f"Redis at {redact(self.url)} refused the credentials: {exc}") from exc
        except (exceptions.ConnectionError, exceptions.TimeoutError, OSError) as exc:
            raise Unavailable(
                f"Redis at {redact(self.url)} is unreachable ({what}): {exc}",
                hint="is the server running, and are the host, port and TLS setting (rediss://) right?",
            ) from exc
        except exceptions.ResponseError as exc:
            raise ConfigurationError(f"Redis at {redact(self.url)} refused {what}: {exc}") from exc
        except exceptions.RedisError as exc:  # e.g. InvalidResponse: something else listens there
            raise Unavailable(
                f"Redis at {redact(self.url)} did not answer like Redis ({what}): {exc}",
                hint="is it a Redis server on that port, and is TLS (rediss://) needed?",
            ) from exc

    def _stream(self, topic: str) -> str:
        return f"{self.prefix}{{{topic}}}"

    def _wake(self, stream: str) -> None:
        for event in self._wakes.get(stream, ()):
            event.set()

    # -- publishing ------------------------------------------------------------------------------------------------

    @staticmethod
    def _template(e: Envelope) -> list[str]:
        """``e``'s entry fields (the documented layout) with the ``ce_id`` value (index 3) and the data (last) blank."""
        fields = [
            "ce_specversion",
            "1.0",
            "ce_id",
            "",
            "ce_source",
            e.source,
            "ce_type",
            e.type,
            "ce_time",
            e.time,
            "content-type",
            e.datacontenttype,
        ]
        if e.subject is not None:
            fields += ("ce_subject", e.subject)
        for name, value in e.extensions.items():
            fields += ("ce_" + name, value)
        fields += ("data", "")
        return fields

    @classmethod
    def _fields(cls, e: Envelope) -> list[str | bytes]:
        """The fields of ``e``'s stream entry, in order."""
        fields: list[str | bytes] = [*cls._template(e)]
        fields[3] = e.id
        fields[-1] = e.data
        return fields

    @classmethod
    def _plan(cls, envelopes: Sequence[Envelope]) -> tuple[str, bytes]:
        """The append script's plan and data for ``envelopes`` (see ``_APPEND``).

        Messages of one publish usually share every attribute but the id and the data: each distinct set of shared
        attributes is sent once, as a template. Comparing with the previous message keeps that cheap.
        """
        templates: list[list[str]] = []
        seen: dict[tuple[Any, ...], int] = {}
        rows: list[int | str] = []
        prev: Envelope | None = None
        index = 0
        for e in envelopes:
            if not (
                prev is not None
                and e.source == prev.source
                and e.type == prev.type
                and e.time == prev.time
                and e.datacontenttype == prev.datacontenttype
                and e.subject == prev.subject
                and e.extensions == prev.extensions
            ):
                shape = (e.source, e.type, e.time, e.datacontenttype, e.subject, *e.extensions.items())
                found = seen.get(shape)
                if found is None:
                    templates.append(cls._template(e))
                    found = seen[shape] = len(templates)  # Lua counts from 1
                index = found
                prev = e
            rows += (index, e.id, len(e.data))
        return _dumps([templates, rows]), b"".join([e.data for e in envelopes])

    async def append(self, topic: str, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        stream = self._stream(topic)
        if self.retention is not None:
            trim = ["MINID", f"{int((time.time() - self.retention) * 1000)}-0"]
        else:
            trim = ["MAXLEN", str(self.maxlen)]
        head: list[str | bytes] = [str(int(self.dedup_window * 1000)), *trim]
        calls = [[*head, *self._plan(envelopes[start : start + _CHUNK])] for start in range(0, len(envelopes), _CHUNK)]

        async def run(client: aioredis.Redis) -> None:
            if len(calls) == 1:
                await self._scripts["append"](keys=[stream], args=calls[0])
                return
            async with client.pipeline(transaction=False) as pipe:
                for args in calls:
                    await self._scripts["append"](keys=[stream], args=args, client=pipe)
                await pipe.execute()

        await self._call(f"publishing to {topic!r}", run)
        self._wake(stream)

    # -- consuming -------------------------------------------------------------------------------------------------

    async def group(self, topic: str, group: str, start: StartFrom) -> GroupChannel:
        stream = self._stream(topic)
        if start == "earliest":
            at = "0-0"
        elif start == "latest":
            at = "$"
        elif isinstance(start, int):
            at = _before(start)
        elif isinstance(start, datetime):
            ms = int(start.timestamp() * 1000)
            at = f"{ms - 1}-{_SEQ_MASK}" if ms > 0 else "0-0"
        else:  # pragma: no cover - StartFrom is checked by the type system
            raise ConfigurationError(f"unknown start {start!r}")
        exceptions = require("redis.exceptions", "redis")

        async def create(client: aioredis.Redis) -> None:
            try:
                await client.xgroup_create(stream, group, id=at, mkstream=True)
            except exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self._call(f"joining group {group!r} of {topic!r}", create)
        return _RedisChannel(self, topic, group, stream)

    async def lag(self, topic: str, group: str) -> Lag:
        """``XINFO GROUPS`` and ``XPENDING`` in one ``MULTI`` (one snapshot).

        The group's ``lag`` (Redis 7: entries not yet read by the group; nil on Redis 6.2, or when Redis cannot
        count it) plus what the pseudo-consumer ``meshkit.pool`` holds in the PEL (handed back for a redelivery,
        or waiting for its key) is ``waiting``; the rest of the PEL (entries members hold) is ``in_flight``.
        """
        stream = self._stream(topic)
        exceptions = require("redis.exceptions", "redis")

        async def read(client: aioredis.Redis) -> tuple[Any, Any]:
            async with client.pipeline(transaction=True) as pipe:
                pipe.xinfo_groups(stream)
                pipe.xpending(stream, group)
                groups, pending = await pipe.execute(raise_on_error=False)
            return groups, pending

        groups, pending = await self._call(f"reading the lag of group {group!r} of {topic!r}", read)
        name = group.encode()
        if isinstance(groups, exceptions.ResponseError):  # no such key: no stream, so no group
            raise GroupNotFound(topic, group, detail="no stream") from groups
        info = next((g for g in groups if g.get("name") in (name, group)), None)
        if info is None or isinstance(pending, exceptions.ResponseError):  # NOGROUP
            raise GroupNotFound(topic, group)
        if isinstance(pending, BaseException):  # pragma: no cover - anything else is the driver's error
            raise Unavailable(f"Redis at {redact(self.url)} failed reading the lag of {topic!r}: {pending}")
        pool = sum(int(c["pending"]) for c in pending["consumers"] if c["name"] in (POOL.encode(), POOL))
        behind = info.get("lag")
        return Lag(
            waiting=None if behind is None else int(behind) + pool,
            in_flight=int(pending["pending"]) - pool,
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for events in self._wakes.values():
            for event in events:
                event.set()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
            await client.connection_pool.disconnect()

    async def purge(self) -> int:
        """Delete every key under this backend's ``prefix`` (streams, groups, dedup markers); returns how many.

        For tests and for tearing down an environment: nothing meshkit itself calls.
        """

        async def run(client: aioredis.Redis) -> int:
            deleted = 0
            batch: list[bytes] = []
            async for key in client.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += await client.unlink(*batch)
                    batch = []
            if batch:
                deleted += await client.unlink(*batch)
            return deleted

        return await self._call("purging", run)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _entry_time(entry_id: str) -> str:
    """When the server stored an entry (its id is a millisecond timestamp): the time of an event without one."""
    return datetime.fromtimestamp((offset_of(entry_id) >> _SEQ_BITS) / 1000, UTC).isoformat()


class _RedisChannel(GroupChannel):
    def __init__(self, backend: RedisBackend, topic: str, group: str, stream: str) -> None:
        self._b = backend
        self._topic = topic
        self._group = group
        self._keys = _GroupKeys(stream, group).keys
        self._stream = stream
        self._me = f"m-{uuid.uuid4().hex}"
        self._wake = asyncio.Event()
        backend._wakes.setdefault(stream, set()).add(self._wake)
        self._closed = False

    def _envelope(self, entry_id: str, row: list[Any], data: bytes) -> Envelope:
        """The envelope of one fetched entry (``row`` as the fetch script returns it, see ``_FETCH``)."""
        ce_id = row[3]
        if ce_id.__class__ is not str:  # not meshkit's layout: the fields as they are (an empty list comes as {})
            return self._envelope_of_fields(entry_id, ce_id or [], data)
        subject = None
        extensions: dict[str, str] = {}
        for i in range(8, len(row), 2):
            name = row[i]
            if name == "ce_subject":
                subject = row[i + 1]
            elif name in _ATTRIBUTE_FIELDS:  # a second copy of an attribute: the general path decides
                fields = ["ce_specversion", "1.0", "ce_id", ce_id, "ce_source", row[4], "ce_type", row[5]]
                fields += ("ce_time", row[6], "content-type", row[7], *row[8:])
                return self._envelope_of_fields(entry_id, fields, data)
            elif name[:3] == "ce_":
                extensions[name[3:]] = row[i + 1]
        return make_envelope(
            ce_id or f"redis:{entry_id}",
            row[4] or f"redis://{self._stream}",
            row[5] or self._topic,
            row[6] or _entry_time(entry_id),
            row[7],
            data,
            subject or None,
            extensions,
        )

    def _envelope_of_fields(self, entry_id: str, pairs: list[str], data: bytes) -> Envelope:
        """Any entry (``pairs``: its fields but ``data``): meshkit's, a plain client's with the SDK's Kafka binding
        (binary mode), or structured mode."""
        fields: dict[str, str] = {pairs[i]: pairs[i + 1] for i in range(0, len(pairs) - 1, 2)}
        content_type = fields.pop("content-type", "application/json")
        if "ce_specversion" not in fields and content_type.startswith("application/cloudevents+json"):
            try:
                return decode_structured(data)
            except MessageDecodeError:
                pass
        attributes = {name[3:]: value for name, value in fields.items() if name.startswith("ce_")}
        if "specversion" in attributes:
            stamp = attributes.pop("time", "") or _entry_time(entry_id)
        else:  # not a CloudEvent: an empty time makes the runtime dead-letter it as undecodable
            stamp = attributes.pop("time", "")
        attributes.pop("specversion", "")
        return Envelope(
            id=attributes.pop("id", "") or f"redis:{entry_id}",
            source=attributes.pop("source", "") or f"redis://{self._stream}",
            type=attributes.pop("type", "") or self._topic,
            time=stamp,
            datacontenttype=content_type,
            data=data,
            subject=attributes.pop("subject", "") or None,
            extensions=attributes,
        )

    def _deliveries(self, meta: bytes, blob: bytes) -> list[Delivery]:
        """Deliveries from the fetch script's reply (see ``_FETCH``)."""
        try:
            text = meta.decode()
        except UnicodeDecodeError:  # a field that is not UTF-8 (another client wrote it): read it leniently
            text = meta.decode("utf-8", "replace")
        rows = _loads(text)
        topic, group, envelope = self._topic, self._group, self._envelope
        out = []
        start = 0
        for row in rows:
            entry_id = row[0]
            end = start + row[2]
            out.append(
                make_delivery(topic, group, envelope(entry_id, row, blob[start:end]), offset_of(entry_id), row[1])
            )
            start = end
        return out

    async def _fetch_once(self, limit: int) -> tuple[list[Delivery], float]:
        b = self._b
        vis_ms = str(int(b.visibility_timeout * 1000))
        args = [self._group, self._me, str(limit), vis_ms, str(max(limit * 20, 1000))]

        async def run(client: aioredis.Redis) -> Any:
            return await b._scripts["fetch"](keys=self._keys, args=args)

        meta, blob, wake_ms = await b._call(f"fetching from {self._topic!r}", run)
        wake = float(wake_ms) / 1000 if int(wake_ms) >= 0 else float("inf")
        return (self._deliveries(meta, blob) if meta else []), wake

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        deadline = time.monotonic() + wait
        pause = 0.001
        task = asyncio.current_task()
        while not self._closed and not self._b._closed:
            if task is not None and task.cancelling():
                # the driver's timeouts can swallow a cancellation on Python 3.11 (asyncio.wait_for): honour it here
                raise asyncio.CancelledError
            self._wake.clear()
            try:
                out, next_due = await self._fetch_once(limit)
            except MeshkitError as exc:
                # the server is away (restarting, a network blip): keep trying; the runtime's loop must not die
                log.warning(
                    "cannot fetch; retrying", extra={"topic": self._topic, "group": self._group, "error": str(exc)}
                )
                out, next_due = [], float("inf")
                pause = max(pause, 0.1)
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            nap = min(pause, remaining, max(next_due, 0.0))
            if not await self._nap(nap):
                pause = min(pause * 2, self._b.poll)
        return []

    async def _nap(self, seconds: float) -> bool:
        """Wait until woken (True) or ``seconds`` pass (False).

        A timer sets the event rather than ``asyncio.timeout``: on Python 3.11 a timeout expiring together with a
        cancellation can swallow the cancellation, and the runtime cancels this loop when the member leaves.
        """
        if self._wake.is_set():
            return True
        rang = False

        def ring() -> None:
            nonlocal rang
            rang = True
            self._wake.set()

        timer = asyncio.get_running_loop().call_later(seconds, ring)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()
        return not rang

    async def _retrying(self, what: str, fn: Callable[[aioredis.Redis], Awaitable[T]], patience: float) -> T:
        """Settle calls are idempotent: retry them through a short outage (a restart) before giving up."""
        end = time.monotonic() + patience
        pause = 0.05
        while True:
            try:
                return await self._b._call(what, fn)
            except Unavailable:
                if time.monotonic() + pause > end or self._b._closed:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        ids = " ".join([f"{d.offset >> _SEQ_BITS}-{d.offset & _SEQ_MASK}" for d in deliveries])
        args = [self._group, ids]

        async def run(client: aioredis.Redis) -> Any:
            return await self._b._scripts["ack"](keys=self._keys, args=args)

        if await self._retrying(f"acking on {self._topic!r}", run, 30.0):
            self._b._wake(self._stream)

    async def _settle(self, deliveries: Sequence[Delivery], delay_ms: int) -> None:
        if not deliveries:
            return
        args = [self._group, self._me, str(delay_ms), *(entry_id_of(d.offset) for d in deliveries)]

        async def run(client: aioredis.Redis) -> Any:
            return await self._b._scripts["settle"](keys=self._keys, args=args)

        await self._retrying(f"settling on {self._topic!r}", run, 30.0)
        self._b._wake(self._stream)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        await self._settle([delivery], max(int(delay * 1000), 0))

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        await self._settle(deliveries, -1)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        waiting = self._b._wakes.get(self._stream)
        if waiting is not None:
            waiting.discard(self._wake)
        if self._b._closed:
            return
        args = [self._group, self._me]

        async def run(client: aioredis.Redis) -> Any:
            return await self._b._scripts["leave"](keys=self._keys, args=args)

        try:
            if await self._retrying(f"leaving group {self._group!r}", run, 10.0):
                self._b._wake(self._stream)
        except Unavailable:
            log.warning(
                "could not leave the group; what this member held is delivered again after the visibility timeout",
                extra={"topic": self._topic, "group": self._group},
            )


_OWN_OPTIONS: dict[str, Callable[[str], Any]] = {
    "prefix": str,
    "visibility_timeout": float,
    "dedup_window": float,
    "maxlen": int,
    "retention": float,
    "poll": float,
    "max_connections": int,
    "connect_timeout": float,
}
_DRIVER_OPTIONS: dict[str, Callable[[str], Any]] = {
    "socket_timeout": float,
    "socket_keepalive": flag,
    "health_check_interval": int,
    "client_name": str,
    "ssl_cert_reqs": str,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": flag,
}


def from_url(url: str, **options: Any) -> RedisBackend:
    """``redis://[[user]:password@]host[:port][/db][?option=value&...]`` or ``rediss://`` (TLS).

    Options come from the query string or ``options`` (keyword arguments win); unknown ones are refused by name.
    """
    parts = redis_url(url, "Redis broker")
    given, _ = url_options(url, {**_OWN_OPTIONS, **_DRIVER_OPTIONS}, options, what="Redis broker")
    bare = urlunsplit(parts._replace(query=""))
    return RedisBackend(bare, **given)
