"""``etcd://host:port``: a registry several hosts share, on etcd v3 (3.4 or newer) through the ``aetcd`` client.

Layout on the server (``prefix`` is ``meshkit/registry/`` unless the URL or an option says otherwise; service names
and instance ids are percent-encoded, so neither holds a ``/`` and one service's keys never fall under another's)::

    <prefix><service>/<id>   {"d": descriptor JSON, "h": status, "r": registered, "s": last seen, "t": ttl}
                             attached to a lease of its own granted for the TTL: the key IS the lease
    <prefix>~epoch           a random token, written once per etcd data set (no lease)

A heartbeat is a keep-alive of the key's lease plus a rewrite of its ``s`` (last seen); etcd itself deletes the keys
of a lease that was not kept alive within its TTL, and every watcher sees the deletion. etcd grants leases in whole
seconds: a TTL is rounded up, and the server raises it to its least TTL (1.5 election timeouts rounded up: 2 s with
etcd's default flags). Every change of a key is one transaction guarded by the key's mod revision (compare and
swap), so concurrent writers from any host never lose each other's changes. Times are the writer's wall clock.

etcd's history is the change log, and its revision is the cursor (``<revision>:<epoch>``). A watcher reads its
snapshot and the revision it is current at in one transaction, then follows a native etcd watch (one gRPC stream)
of the service's keys from the next revision: a PUT is ``added`` or ``changed``, a DELETE (deregistered or expired)
is ``removed``. Between two reads of a watcher its stream stays open and buffers what arrives. A watch whose
connection breaks reconnects by itself (every ``retry_interval`` seconds) and resumes from its cursor, without loss;
it reads a new snapshot instead when the server compacted its history past the cursor, or when the epoch token is
gone or different (the server lost its data: the same revisions now name other changes).

Options (URL query parameters or ``connect(url, **options)``): ``prefix``, ``timeout`` (seconds per request, 5),
``retry_interval`` (0.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from meshkit._core.clock import Clock
from meshkit._core.optional import require
from meshkit._core.urls import Parser, redact, url_options
from meshkit.discovery.base import Capabilities, HealthStatus, Instance, LogEntry, Registry, Resync
from meshkit.errors import ConfigurationError, MeshkitError, Unavailable

__all__ = ["EtcdRegistry", "from_url"]

T = TypeVar("T")

log = logging.getLogger("meshkit.discovery.etcd")

_EPOCH = "~epoch"
_CAS_TRIES = 16  # compare-and-swap attempts before a write gives up on a key that keeps changing
_BUFFER = 10_000  # events one watch stream holds for its watcher; past that it pauses and resumes from the cursor
_IDLE = 30.0  # seconds an open watch stream waits for its watcher to ask again before it is closed


class _LeaseGone(Exception):
    """A write named a lease that etcd no longer has (it expired or was revoked)."""


class _Stream:
    """One etcd watch (its own gRPC stream) of one service's keys from a revision on, buffering what arrives.

    ``ended`` with ``error`` None means it stopped quietly (buffer full, or closed): resume from the cursor.
    """

    def __init__(self, call: Any, request: Any) -> None:
        self._call = call
        self.events: list[Any] = []
        self.error: BaseException | None = None
        self.compacted = False
        self.ended = False
        self.arrived = asyncio.Event()  # events, or the end
        self.parked_at = 0.0
        self._task = asyncio.create_task(self._pump(request), name="meshkit-etcd-watch")

    async def _pump(self, request: Any) -> None:
        eof = require("grpc.aio", "etcd").EOF
        try:
            await self._call.write(request)
            while True:
                response = await self._call.read()
                if response is eof:
                    self.error = ConnectionError("etcd ended the watch stream")
                    return
                if response.events:
                    self.events.extend(response.events)
                    self.arrived.set()
                if response.compact_revision:
                    self.compacted = True
                    return
                if response.canceled:
                    self.error = ConnectionError(f"etcd cancelled the watch: {response.cancel_reason or 'no reason'}")
                    return
                if len(self.events) >= _BUFFER:
                    return
        except Exception as exc:  # any failure of the stream is reported to its watcher, who retries
            self.error = exc
        finally:
            self.ended = True
            self.arrived.set()
            self._call.cancel()

    def take(self) -> list[Any]:
        events, self.events = self.events, []
        if not self.ended:
            self.arrived.clear()
        return events

    async def aclose(self) -> None:
        self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _encode(instance: Instance, ttl: float) -> bytes:
    fields = {
        "d": instance.descriptor(),
        "h": str(instance.status),
        "r": instance.registered,
        "s": instance.last_seen,
        "t": ttl,
    }
    return json.dumps(fields, separators=(",", ":")).encode()


def _decode(value: bytes) -> tuple[Instance, float] | None:
    """The instance a key holds and its TTL; None (and a warning) for a value this registry did not write."""
    try:
        fields = json.loads(value)
        return Instance.from_stored(fields["d"], fields["h"], fields["r"], fields["s"]), float(fields["t"])
    except (ValueError, KeyError, TypeError, MeshkitError) as exc:
        log.warning("skipping a value the etcd registry cannot read: %s", exc, extra={"value": value[:200]})
        return None


def _lease_gone(exc: BaseException) -> bool:
    cause = exc.__cause__
    grpc = require("grpc", "etcd")
    return (
        isinstance(cause, grpc.RpcError)
        and cause.code() == grpc.StatusCode.NOT_FOUND
        and "lease not found" in (cause.details() or "")
    )


class EtcdRegistry(Registry):
    capabilities = Capabilities(shared=True, durable=True)

    def __init__(
        self,
        url: str,
        *,
        host: str,
        port: int = 2379,
        prefix: str = "meshkit/registry/",
        timeout: float = 5.0,
        retry_interval: float = 0.5,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock=clock)
        self.url = url
        self.host = host
        self.port = port
        self.prefix = prefix
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._client: Any = None
        self._shut = False  # the client is gone for good
        self._streams: set[_Stream] = set()  # every open watch stream, in use or parked
        self._parked: dict[tuple[str, str], _Stream] = {}  # (service, cursor) -> the stream that reached it
        self._reconnecting: set[str] = set()  # services whose watch lost the server (logged once per outage)
        self.streams_opened = 0

    def __repr__(self) -> str:
        return f"EtcdRegistry({redact(self.url)!r}, prefix={self.prefix!r})"

    # -- the connection and its errors --------------------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._shut:
            raise ConfigurationError(f"the etcd registry {self!r} is closed")
        if self._client is None:
            aetcd = require("aetcd", "etcd")
            target = f"[{self.host}]" if ":" in self.host else self.host
            self._client = aetcd.Client(
                host=target,
                port=self.port,
                timeout=self.timeout,
                options={
                    # reconnect quickly after a server restart (gRPC's default backoff grows to 120 s)
                    "grpc.initial_reconnect_backoff_ms": 100,
                    "grpc.min_reconnect_backoff_ms": 100,
                    "grpc.max_reconnect_backoff_ms": 1000,
                    # notice a server that vanished without closing the connection (a watch is silent otherwise)
                    "grpc.keepalive_time_ms": 10_000,
                    "grpc.keepalive_timeout_ms": 5_000,
                },
            )
        return self._client

    async def _call(self, what: str, operation: Awaitable[T]) -> T:
        """Await one aetcd call, its errors mapped: a vanished lease to :class:`_LeaseGone`, a refusal of the
        request itself to ConfigurationError, anything else (no connection, timeouts) to Unavailable."""
        aetcd = require("aetcd", "etcd")
        grpc = require("grpc", "etcd")
        grpc_aio = require("grpc.aio", "etcd")
        where = f"the etcd registry at {redact(self.url)}"
        try:
            return await operation
        except aetcd.InvalidArgumentError as exc:
            raise ConfigurationError(f"{where} refused to {what}: {exc}") from exc
        except aetcd.ClientError as exc:
            if _lease_gone(exc):
                raise _LeaseGone from exc
            raise Unavailable(f"{where} failed to {what}: {exc or type(exc).__name__}") from exc
        except (grpc.RpcError, grpc_aio.BaseError, TimeoutError) as exc:
            raise Unavailable(f"{where} failed to {what}: {exc or type(exc).__name__}") from exc

    async def _revoke(self, client: Any, lease: int) -> None:
        """Revoke a lease no key should hold any more; failing that, it simply runs out."""
        with contextlib.suppress(_LeaseGone, MeshkitError):
            await self._call("revoke a lease", client.revoke_lease(lease))

    # -- keys ---------------------------------------------------------------------------------------------------------

    def _service_prefix(self, service: str) -> bytes:
        return f"{self.prefix}{quote(service, safe='')}/".encode()

    def _key(self, service: str, instance_id: str) -> bytes:
        return self._service_prefix(service) + quote(instance_id, safe="").encode()

    @property
    def _epoch_key(self) -> bytes:
        return f"{self.prefix}{_EPOCH}".encode()

    # -- the primitives -----------------------------------------------------------------------------------------------

    async def _put(self, instance: Instance, ttl: float) -> Instance:
        client = self._connection()
        txn = client.transactions
        key = self._key(instance.service, instance.id)
        seconds = max(1, math.ceil(ttl))
        for _ in range(_CAS_TRIES):
            current = await self._call("read an instance", client.get(key))
            old = _decode(current.value) if current is not None else None
            now = self.clock.wall()
            stored = replace(instance, registered=old[0].registered if old else now, last_seen=now)
            lease = await self._call("grant a lease", client.lease(seconds))
            guard = txn.mod(key) == current.mod_revision if current is not None else txn.version(key) == 0
            put = txn.put(key, _encode(stored, ttl), lease=lease.id)
            done, _ = await self._call(
                "register an instance", client.transaction(compare=[guard], success=[put], failure=[])
            )
            if done:
                if current is not None and current.lease:
                    await self._revoke(client, current.lease)  # the key moved to the new lease: this one is empty
                return stored
            await self._revoke(client, lease.id)
        raise Unavailable(f"instance {instance.service}/{instance.id} kept changing while it was being registered")

    async def _touch(self, service: str, instance_id: str) -> bool:
        client = self._connection()
        txn = client.transactions
        key = self._key(service, instance_id)
        for _ in range(_CAS_TRIES):
            current = await self._call("read an instance", client.get(key))
            if current is None or not current.lease:
                return False
            reply = await self._call("renew a lease", client.refresh_lease(current.lease))
            if reply is None or reply.TTL <= 0:
                return False  # the lease ended: its key is deleted (or about to be)
            held = _decode(current.value)
            if held is None:
                return True
            instance, ttl = held
            value = _encode(replace(instance, last_seen=self.clock.wall()), ttl)
            guard = txn.mod(key) == current.mod_revision
            put = txn.put(key, value, lease=current.lease)
            try:
                done, _ = await self._call(
                    "record a heartbeat", client.transaction(compare=[guard], success=[put], failure=[])
                )
            except _LeaseGone:
                return False
            if done:
                return True
        return True  # renewed; the key kept changing, so its last-seen time was not rewritten this time

    async def _remove(self, service: str, instance_id: str) -> bool:
        client = self._connection()
        deleted = await self._call("deregister an instance", client.delete(self._key(service, instance_id), True))
        if deleted is None:
            return False
        if deleted.prev_kv is not None and deleted.prev_kv.lease:
            await self._revoke(client, deleted.prev_kv.lease)
        return True

    async def _set_status(self, service: str, instance_id: str, status: HealthStatus) -> bool:
        client = self._connection()
        txn = client.transactions
        key = self._key(service, instance_id)
        for _ in range(_CAS_TRIES):
            current = await self._call("read an instance", client.get(key))
            held = _decode(current.value) if current is not None else None
            if current is None or held is None:
                return False
            instance, ttl = held
            if instance.status is status:
                return True
            guard = txn.mod(key) == current.mod_revision
            put = txn.put(key, _encode(replace(instance, status=status), ttl), lease=current.lease)
            try:
                done, _ = await self._call(
                    "set a status", client.transaction(compare=[guard], success=[put], failure=[])
                )
            except _LeaseGone:
                return False
            if done:
                return True
        raise Unavailable(f"instance {service}/{instance_id} kept changing while its status was being set")

    async def _list(self, service: str) -> list[Instance]:
        client = self._connection()
        found = await self._call("list instances", client.get_prefix(self._service_prefix(service)))
        return [held[0] for kv in found if (held := _decode(kv.value)) is not None]

    async def _snapshot(self, service: str) -> tuple[list[Instance], str]:
        client = self._connection()
        txn = client.transactions
        prefix = self._service_prefix(service)
        end = require("aetcd.utils", "etcd").prefix_range_end(prefix)
        reads = [txn.get(prefix, end), txn.get(self._epoch_key)]
        first = txn.put(self._epoch_key, uuid.uuid4().hex[:16].encode())  # only where no epoch was written yet
        _, responses = await self._call(
            "read a snapshot",
            client.transaction(compare=[txn.create(self._epoch_key) == 0], success=[first, *reads], failure=reads),
        )
        rows, epoch = responses[-2], responses[-1]
        value, got = epoch[0]  # the epoch key is always there: its header is the transaction's
        instances = [held[0] for row, _ in rows if (held := _decode(row)) is not None]
        return instances, f"{got.header.revision}:{value.decode()}"

    async def _changes(self, service: str, cursor: str) -> tuple[list[LogEntry], str]:
        await self._sweep()
        stream = self._parked.pop((service, cursor), None)
        if stream is None:
            try:
                stream = await self._open(service, cursor)
            except Unavailable as exc:
                if self.closed:  # the registry closed under the watcher: its watch ends
                    raise
                self._lost(service, exc)
                await self._wait_or_close(self.retry_interval)
                return [], cursor
        try:
            return await self._next(service, cursor, stream)
        except BaseException:
            await self._drop(stream)
            raise

    async def _aclose(self) -> None:
        self._shut = True
        self._parked.clear()
        streams, self._streams = list(self._streams), set()
        for stream in streams:
            await stream.aclose()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a channel whose server is gone may complain; it is closed
                await client.close()

    # -- watching -----------------------------------------------------------------------------------------------------

    async def _open(self, service: str, cursor: str) -> _Stream:
        """A watch stream from just after ``cursor``; Resync if the server's history no longer holds it."""
        revision, epoch = _parse_cursor(cursor)
        client = self._connection()
        current = await self._call("read the registry epoch", client.get(self._epoch_key))
        if current is None or current.value.decode() != epoch or current.header.revision < revision:
            log.info(
                "the etcd registry's history changed under the watch of %s: reading a new snapshot",
                service,
                extra={"service": service},
            )
            raise Resync
        rpc = require("aetcd.rpc", "etcd")
        prefix = self._service_prefix(service)
        create = rpc.WatchCreateRequest(
            key=prefix,
            range_end=require("aetcd.utils", "etcd").prefix_range_end(prefix),
            start_revision=revision + 1,
        )
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        stream = _Stream(call, rpc.WatchRequest(create_request=create))
        self._streams.add(stream)
        self.streams_opened += 1
        if service in self._reconnecting:
            self._reconnecting.discard(service)
            log.info("the watch of %s reached etcd again", service, extra={"service": service})
        return stream

    async def _next(self, service: str, cursor: str, stream: _Stream) -> tuple[list[LogEntry], str]:
        """Wait for the stream's next events and turn them into log entries; park the stream for the next call."""
        _, epoch = _parse_cursor(cursor)
        while True:
            events = stream.take()
            if events:
                cursor = f"{events[-1].kv.mod_revision}:{epoch}"
                entries = [entry for event in events if (entry := self._entry(service, event)) is not None]
                if stream.ended:
                    await self._drop(stream)  # the next call opens a new stream from the cursor, or resyncs
                else:
                    stream.parked_at = time.monotonic()
                    self._parked[(service, cursor)] = stream
                return entries, cursor
            if stream.compacted:
                await self._drop(stream)
                raise Resync
            if stream.ended:
                await self._drop(stream)
                if stream.error is not None and not self._shut:
                    self._lost(service, stream.error)
                    await self._wait_or_close(self.retry_interval)
                return [], cursor
            await stream.arrived.wait()

    def _entry(self, service: str, event: Any) -> LogEntry | None:
        prefix = self._service_prefix(service)
        key: bytes = event.kv.key
        if not key.startswith(prefix):
            return None
        instance_id = unquote(key[len(prefix) :].decode())
        if event.type == require("aetcd.rpc", "etcd").Event.DELETE:
            return LogEntry("removed", instance_id, None)
        held = _decode(event.kv.value)
        if held is None:
            return None
        return LogEntry("added" if event.kv.version == 1 else "changed", instance_id, held[0])

    def _lost(self, service: str, exc: BaseException) -> None:
        if service not in self._reconnecting:
            self._reconnecting.add(service)
            log.warning(
                "the watch of %s lost the etcd registry at %s (%s): reconnecting every %gs",
                service,
                redact(self.url),
                exc,
                self.retry_interval,
                extra={"service": service},
            )

    async def _drop(self, stream: _Stream) -> None:
        self._streams.discard(stream)
        await stream.aclose()

    async def _sweep(self) -> None:
        """Close the parked streams no watcher came back for (a watch closed between two reads)."""
        now = time.monotonic()
        for key, stream in list(self._parked.items()):
            if now - stream.parked_at > _IDLE:
                del self._parked[key]
                await self._drop(stream)


def _parse_cursor(cursor: str) -> tuple[int, str]:
    revision, _, epoch = cursor.partition(":")
    try:
        return int(revision), epoch
    except ValueError:
        raise Resync from None


_OPTIONS: dict[str, Parser] = {"prefix": str, "timeout": float, "retry_interval": float}


def from_url(url: str, **options: Any) -> EtcdRegistry:
    """``etcd://host[:port][?option=value&...]`` (port 2379 unless given).

    Options come from the query string or ``options`` (keyword arguments win); unknown ones are refused by name.
    """
    parts = urlsplit(url)
    shown = redact(url)
    if parts.scheme != "etcd":
        raise ConfigurationError(f"not an etcd URL: {shown!r}", hint="use etcd://host:port")
    if "@" in parts.netloc:
        raise ConfigurationError(
            f"the etcd registry URL {shown!r} has credentials; etcd authentication is not supported",
            hint="reach etcd without authentication (a local member, or a network only the services reach)",
        )
    if "," in parts.netloc:
        raise ConfigurationError(
            f"the etcd registry URL {shown!r} names several endpoints; it takes one",
            hint="give one endpoint (a DNS name with several addresses is tried address by address)",
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"bad port in etcd registry URL {shown!r}", hint="use etcd://host:port") from exc
    if not parts.hostname:
        raise ConfigurationError(f"the etcd registry URL {shown!r} names no host", hint="use etcd://host:port")
    if parts.path not in ("", "/"):
        raise ConfigurationError(
            f"the etcd registry URL {shown!r} has a path", hint="set the key prefix with ?prefix=name/ instead"
        )
    given, _ = url_options(url, _OPTIONS, options, what="etcd registry", keywords=("clock",))
    for name in ("timeout", "retry_interval"):
        if name in given and not given[name] > 0:
            raise ConfigurationError(f"etcd registry option {name!r} must be positive, not {given[name]!r}")
    return EtcdRegistry(
        urlunsplit(parts._replace(query="")), host=parts.hostname, port=port if port is not None else 2379, **given
    )
