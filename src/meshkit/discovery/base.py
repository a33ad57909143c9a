"""What a registry is: instances of services, held by TTL leases, listed and watched by name.

A service instance registers itself with a time to live (``ttl``). The returned :class:`Lease` keeps it alive (a
background heartbeat every ``ttl / 3`` seconds, owned by the lease) or lets the caller heartbeat explicitly. An
instance whose lease is not renewed within ``ttl`` seconds expires and leaves the registry: every reader sees it
removed. Closing a lease, or the registry, deregisters its instances.

A backend implements a few primitives (the methods starting with ``_``) over one shared layout idea:

- a table of live instances per service, each with its expiry time;
- a change log per service, ordered by a cursor: ``added`` / ``changed`` / ``removed`` entries, written in the same
  atomic step as the change itself (including removals by expiry, which whoever reads first records, once).

:meth:`Registry.watch` is written once, here: it reads a snapshot with the cursor it was taken at (one atomic read),
yields the snapshot as ``added`` events, then follows the log from that cursor. So a watcher sees every change after
its snapshot, in the order the registry applied them. When the log was trimmed past a slow watcher's cursor, the
watcher reads a new snapshot and yields the difference.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal

from meshkit._core.clock import Clock, MonotonicClock
from meshkit.errors import ConfigurationError, MeshkitError

__all__ = [
    "Capabilities",
    "Change",
    "ChangeKind",
    "HealthStatus",
    "Instance",
    "Lease",
    "LogEntry",
    "Registry",
    "Resync",
    "Watch",
]

log = logging.getLogger("meshkit.discovery")

ChangeKind = Literal["added", "removed", "changed"]


class HealthStatus(StrEnum):
    """The health of an instance, as the registry knows it. Only ``passing`` instances are in rotation."""

    PASSING = "passing"
    WARNING = "warning"  # reachable but degraded: kept out of rotation like critical, shown differently
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance of a service, as registered.

    ``registered`` and ``last_seen`` are wall-clock seconds set by the registry (what you pass is ignored);
    ``status`` starts ``passing`` unless you register it otherwise, and health checks change it.
    """

    service: str
    id: str
    host: str
    port: int
    version: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
    tags: tuple[str, ...] = ()
    status: HealthStatus = HealthStatus.PASSING
    registered: float = field(default=0.0, compare=False)
    last_seen: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        if not self.service or not self.id:
            raise ConfigurationError("an instance needs a service name and an instance id")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port {self.port} of instance {self.id!r} is out of range")
        object.__setattr__(self, "tags", tuple(self.tags))  # a list given at runtime still freezes
        object.__setattr__(self, "status", HealthStatus(self.status))

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def healthy(self) -> bool:
        return self.status is HealthStatus.PASSING

    def descriptor(self) -> str:
        """What the instance says about itself, as canonical JSON (no status, no times): two registrations with
        the same descriptor and status are the same, and re-registering one is not a change."""
        return json.dumps(
            {
                "service": self.service,
                "id": self.id,
                "host": self.host,
                "port": self.port,
                "version": self.version,
                "metadata": dict(self.metadata),
                "tags": list(self.tags),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_stored(cls, descriptor: str, status: str, registered: float, last_seen: float) -> Instance:
        """The inverse of :meth:`descriptor`, with the fields the registry keeps beside it."""
        d: dict[str, Any] = json.loads(descriptor)
        return cls(
            service=d["service"],
            id=d["id"],
            host=d["host"],
            port=int(d["port"]),
            version=d.get("version", ""),
            metadata=dict(d.get("metadata", {})),
            tags=tuple(d.get("tags", ())),
            status=HealthStatus(status),
            registered=float(registered),
            last_seen=float(last_seen),
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One event of :meth:`Registry.watch`."""

    kind: ChangeKind
    instance: Instance


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of a backend's change log: ``instance`` is None for removals (the watcher knows what it had)."""

    kind: ChangeKind
    id: str
    instance: Instance | None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do, so tests and users know what to expect."""

    shared: bool  # several registry objects (and processes) opened on one URL see one view
    durable: bool  # the registrations outlive the registry object that made them (until their TTL)


class Resync(Exception):
    """The change log no longer reaches back to the watcher's cursor: read a new snapshot."""


class Registry(abc.ABC):
    """A service registry. Open one with :func:`meshkit.discovery.connect` and use it as ``async with``."""

    capabilities: Capabilities

    #: seconds between polls of the change log by a watcher (backends that cannot be woken poll)
    poll_interval: float = 0.1

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or MonotonicClock()
        self._leases: set[Lease] = set()
        self._closing = asyncio.Event()
        self._closed = False

    # -- the public API, shared by every backend ----------------------------------------------------------------------

    async def register(self, instance: Instance, ttl: float = 10.0, *, keepalive: bool = True) -> Lease:
        """Add (or update) ``instance``; it expires unless heartbeated within ``ttl`` seconds.

        With ``keepalive`` (the default) the lease heartbeats every ``ttl / 3`` seconds on its own until it is
        closed; otherwise call :meth:`Lease.heartbeat` (or :meth:`heartbeat`) yourself.
        """
        self._check_open()
        if ttl <= 0:
            raise ConfigurationError(f"ttl must be positive, not {ttl!r}")
        stored = await self._put(instance, ttl)
        extra = {"service": instance.service, "instance": instance.id, "ttl": ttl}
        log.debug("registered %s/%s", instance.service, instance.id, extra=extra)
        lease = Lease(self, stored, ttl)
        self._leases.add(lease)
        if keepalive:
            lease.start()
        return lease

    async def heartbeat(self, service: str, instance_id: str) -> bool:
        """Renew the instance's lease for another ``ttl``. False if it had already expired (register it again)."""
        self._check_open()
        return await self._touch(service, instance_id)

    async def deregister(self, service: str, instance_id: str) -> bool:
        """Remove the instance now. False if it was not registered (or had expired)."""
        self._check_open()
        for lease in list(self._leases):
            if (lease.instance.service, lease.instance.id) == (service, instance_id):
                await lease.stop()
                self._leases.discard(lease)
        removed = await self._remove(service, instance_id)
        log.debug("deregistered %s/%s", service, instance_id, extra={"service": service, "instance": instance_id})
        return removed

    async def set_status(self, service: str, instance_id: str, status: HealthStatus) -> bool:
        """Mark the instance's health (health checks do this). False if it is not registered."""
        self._check_open()
        return await self._set_status(service, instance_id, HealthStatus(status))

    async def list(self, service: str, *, healthy_only: bool = True) -> builtins.list[Instance]:
        """The live instances of ``service``, ordered by id; only ``passing`` ones unless ``healthy_only=False``."""
        self._check_open()
        instances = await self._list(service)
        if healthy_only:
            instances = [i for i in instances if i.healthy]
        return sorted(instances, key=lambda i: i.id)

    def watch(self, service: str) -> Watch:
        """The changes of ``service``, starting with its current instances as ``added``::

        async with registry.watch("orders") as changes:
            async for change in changes:
                ...
        """
        self._check_open()
        return Watch(self, service)

    async def aclose(self) -> None:
        """Deregister every instance registered through this object, end its watches and release its resources."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        leases, self._leases = list(self._leases), set()
        for lease in leases:
            await lease.stop()
        for lease in leases:
            with contextlib.suppress(MeshkitError):
                await self._remove(lease.instance.service, lease.instance.id)
        await self._aclose()

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError(f"the registry {self!r} is closed")

    async def _wait_or_close(self, seconds: float) -> None:
        """Sleep up to ``seconds`` (real time: this is polling, not a lease), ending early when the registry closes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    # -- what a backend implements ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def _put(self, instance: Instance, ttl: float) -> Instance:
        """Insert or update; log ``added`` (new) or ``changed`` (descriptor or status differ). Return it as stored."""

    @abc.abstractmethod
    async def _touch(self, service: str, instance_id: str) -> bool:
        """Extend the lease by its ttl and set ``last_seen``; False (and no change) if it is not live."""

    @abc.abstractmethod
    async def _remove(self, service: str, instance_id: str) -> bool:
        """Delete and log ``removed``; False if it was not live."""

    @abc.abstractmethod
    async def _set_status(self, service: str, instance_id: str, status: HealthStatus) -> bool:
        """Set the status, logging ``changed`` if it differs; False if it is not live."""

    @abc.abstractmethod
    async def _list(self, service: str) -> builtins.list[Instance]:
        """Every live instance (expired ones removed and logged first)."""

    @abc.abstractmethod
    async def _snapshot(self, service: str) -> tuple[builtins.list[Instance], str]:
        """The live instances and the log cursor they are current at, read atomically."""

    @abc.abstractmethod
    async def _changes(self, service: str, cursor: str) -> tuple[builtins.list[LogEntry], str]:
        """Log entries after ``cursor`` and the new cursor. May wait a little (up to ``poll_interval``) when there
        are none; raises :class:`Resync` if the log no longer reaches back to ``cursor``."""

    @abc.abstractmethod
    async def _aclose(self) -> None:
        """Release the backend's resources."""


class Lease:
    """One registration held by this process. ``async with`` it, or close it, to deregister."""

    def __init__(self, registry: Registry, instance: Instance, ttl: float) -> None:
        self.registry = registry
        self.instance = instance
        self.ttl = ttl
        self.interval = ttl / 3
        self._task: asyncio.Task[None] | None = None
        self.renewals = 0  # heartbeats that found the lease live
        self.reregistrations = 0  # heartbeats that found it expired and registered it again

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._keepalive(), name=f"meshkit-lease-{self.instance.id}")

    async def _keepalive(self) -> None:
        while True:
            await self.registry.clock.asleep(self.interval)
            try:
                await self.heartbeat()
            except MeshkitError as exc:
                log.warning(
                    "heartbeat of %s/%s failed: %s",
                    self.instance.service,
                    self.instance.id,
                    exc,
                    extra={"service": self.instance.service, "instance": self.instance.id},
                )

    async def heartbeat(self) -> None:
        """Renew now; if the lease had expired (a long pause, a lost connection), register the instance again."""
        if await self.registry._touch(self.instance.service, self.instance.id):
            self.renewals += 1
            return
        log.warning(
            "the lease of %s/%s had expired: registering it again",
            self.instance.service,
            self.instance.id,
            extra={"service": self.instance.service, "instance": self.instance.id},
        )
        self.instance = await self.registry._put(self.instance, self.ttl)
        self.reregistrations += 1

    async def stop(self) -> None:
        """Stop heartbeating (the registration stays until it expires)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Stop heartbeating and deregister."""
        await self.stop()
        if not self.registry.closed:
            await self.registry.deregister(self.instance.service, self.instance.id)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Watch:
    """An async iterator of :class:`Change` for one service (see the module docstring for its order)."""

    def __init__(self, registry: Registry, service: str) -> None:
        self.registry = registry
        self.service = service
        self.ready = asyncio.Event()  # set once the first snapshot is read: later changes will be seen
        self._events = self._run()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Change:
        return await self._events.__anext__()

    async def _run(self) -> AsyncIterator[Change]:
        reg = self.registry
        view: dict[str, Instance] = {}
        snapshot, cursor = await reg._snapshot(self.service)
        self.ready.set()
        for change in _diff(view, snapshot):
            yield change
        while True:
            try:
                entries, cursor = await reg._changes(self.service, cursor)
            except MeshkitError:
                if reg.closed:  # the registry closed under a waiting watcher: the watch ends
                    return
                raise
            except Resync:
                snapshot, cursor = await reg._snapshot(self.service)
                entries = []
                for change in _diff(view, snapshot):
                    yield change
            for entry in entries:
                applied = _apply(view, entry)
                if applied is not None:
                    yield applied
            if reg.closed:
                return

    async def aclose(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _apply(view: dict[str, Instance], entry: LogEntry) -> Change | None:
    """Apply one log entry to a watcher's view; the event it means for the watcher (None if none)."""
    if entry.kind == "removed":
        gone = view.pop(entry.id, None)
        return None if gone is None else Change("removed", gone)
    assert entry.instance is not None
    before = view.get(entry.id)
    view[entry.id] = entry.instance
    if before is None:
        return Change("added", entry.instance)
    if before == entry.instance:
        return None
    return Change("changed", entry.instance)


def _diff(view: dict[str, Instance], snapshot: Sequence[Instance]) -> list[Change]:
    """Turn ``view`` into ``snapshot``; the events that does (removals, then additions and changes by id)."""
    now = {i.id: i for i in snapshot}
    changes = [Change("removed", view.pop(gone)) for gone in sorted(view.keys() - now.keys())]
    for iid in sorted(now, key=lambda k: (now[k].registered, k)):
        before = view.get(iid)
        view[iid] = now[iid]
        if before is None:
            changes.append(Change("added", now[iid]))
        elif before != now[iid]:
            changes.append(Change("changed", now[iid]))
    return changes


def with_times(instance: Instance, registered: float, last_seen: float) -> Instance:
    """``instance`` with the registry's times."""
    return replace(instance, registered=registered, last_seen=last_seen)
