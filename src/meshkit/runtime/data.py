"""A service's data patterns: its outbox, its sagas, its event store and its projections.

A service declares what it uses at import time, like its routes; the runtime opens the service's database and
starts each one when the service starts, and stops them (and closes the database) when it stops::

    orders = Service("orders")
    checkout = orders.saga(Saga("checkout", [Step("charge", charge, compensate=refund), ...]))

    @orders.http.post("/orders")
    async def create(order: OrderIn) -> dict:
        async with orders.outbox.transaction() as tx:      # the order row and the message commit together
            await tx.execute("INSERT INTO orders (id, total) VALUES (?, ?)", order_id, total)
            tx.publish("order.created", {"id": order_id}, key=order_id)
        await orders.sagas.run(checkout, {"order": order_id})

The database is ``RunContext.database_url`` (``meshkit.toml``'s ``[database] url``: the embedded SQLite file by
default, PostgreSQL by changing the URL), or the file ``data.db`` in the service's data folder when the runner gives
none. Several services may share one database: the outbox keeps each service's rows apart, sagas belong to the
service that runs them, and event streams are named by the caller.

Each handle below is what the service's attribute returns: usable at import time to declare (``saga``,
``upcaster``), and forwarding to the running object (:class:`meshkit.outbox.Outbox`, :class:`meshkit.saga.Sagas`,
:class:`meshkit.eventsourcing.EventStore`, :class:`meshkit.projections.Projector`) while the service runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from meshkit._core.database import Database
from meshkit.errors import ConfigurationError
from meshkit.eventsourcing import Aggregate, EventStore, NewEvent, RecordedEvent, Repository, Snapshot
from meshkit.messaging import Message
from meshkit.outbox import Outbox, OutboxTransaction
from meshkit.projections import Projection, ProjectionStatus, Projector
from meshkit.saga import Saga, SagaRecord, Sagas

__all__ = ["EventsHandle", "OutboxHandle", "ProjectionsHandle", "SagasHandle"]

T = TypeVar("T")
A = TypeVar("A", bound=Aggregate)
F = TypeVar("F", bound=Callable[..., Any])


class _Bound(Generic[T]):
    """What a handle forwards to once the service runs."""

    def __init__(self, service: str, what: str) -> None:
        self._service = service
        self._what = what
        self._running: T | None = None

    @property
    def running(self) -> T:
        if self._running is None:
            raise ConfigurationError(
                f"service {self._service!r} is not running, so its {self._what} cannot be used yet",
                hint=f"use the {self._what} from routes, handlers and on_stop hooks: it starts after the on_start"
                " hooks (which run first, to make the service's tables)",
            )
        return self._running


class OutboxHandle(_Bound[Outbox]):
    """``service.outbox``: business rows and the messages they announce, committed in one transaction, then
    relayed to the broker (see :mod:`meshkit.outbox`)."""

    def __init__(self, service: str) -> None:
        super().__init__(service, "outbox")

    def transaction(self) -> contextlib.AbstractAsyncContextManager[OutboxTransaction]:
        return self.running.transaction()

    def receive(self, message: Message, *, consumer: str | None = None) -> Any:
        """The inbox: ``async with service.outbox.receive(message) as tx:`` (``tx.duplicate`` when this consumer
        handled the message before). ``consumer`` defaults to the service's name."""
        return self.running.receive(message, consumer=consumer or self._service)

    async def pending(self) -> int:
        return await self.running.pending()

    async def flush(self, timeout: float = 30.0) -> None:
        await self.running.flush(timeout=timeout)


class SagasHandle(_Bound[Sagas]):
    """``service.sagas``: runs the sagas the service declared with ``service.saga(...)`` (see :mod:`meshkit.saga`)."""

    def __init__(self, service: str) -> None:
        super().__init__(service, "sagas")
        self.declared: dict[str, Saga] = {}

    def declare(self, saga: Saga) -> Saga:
        if saga.name in self.declared and self.declared[saga.name] is not saga:
            raise ConfigurationError(f"service {self._service!r} already declares a saga named {saga.name!r}")
        self.declared[saga.name] = saga
        return saga

    async def run(
        self, saga: Saga | str, data: Mapping[str, Any] | None = None, *, saga_id: str | None = None
    ) -> SagaRecord:
        return await self.running.run(saga, data, saga_id=saga_id)

    async def get(self, saga_id: str) -> SagaRecord | None:
        return await self.running.get(saga_id)

    async def list(
        self, *, name: str | None = None, status: str | None = None, limit: int = 100
    ) -> Sequence[SagaRecord]:
        return await self.running.list(name=name, status=status, limit=limit)


class EventsHandle(_Bound[EventStore]):
    """``service.events``: the event store (see :mod:`meshkit.eventsourcing`)."""

    def __init__(self, service: str) -> None:
        super().__init__(service, "event store")
        self.upcasters: list[tuple[str, int, Callable[..., Any]]] = []

    def upcaster(self, type: str, *, from_version: int) -> Callable[[F], F]:
        """Declare an upcaster at import time (see :meth:`meshkit.eventsourcing.EventStore.upcaster`)."""

        def register(fn: F) -> F:
            self.upcasters.append((type, from_version, fn))
            if self._running is not None:
                self._running.upcaster(type, from_version=from_version)(fn)
            return fn

        return register

    @property
    def store(self) -> EventStore:
        return self.running

    def repository(self, aggregate: type[A], *, snapshot_every: int | None = None) -> Repository[A]:
        return Repository(self.running, aggregate, snapshot_every=snapshot_every)

    async def append(self, stream: str, events: Sequence[NewEvent], *, expected_version: int | None = None) -> int:
        return await self.running.append(stream, events, expected_version=expected_version)

    async def load(self, stream: str, *, after: int = 0) -> list[RecordedEvent]:
        return await self.running.load(stream, after=after)

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        return await self.running.load_snapshot(stream)


class ProjectionsHandle(_Bound[Projector]):
    """``service.projections``: the read models the service keeps from the event store (see
    :mod:`meshkit.projections`)."""

    def __init__(self, service: str) -> None:
        super().__init__(service, "projections")
        self.declared: dict[str, Projection] = {}

    def declare(self, projection: Projection) -> Projection:
        if projection.name in self.declared:
            raise ConfigurationError(f"service {self._service!r} already declares a projection {projection.name!r}")
        self.declared[projection.name] = projection
        return projection

    async def status(self) -> list[ProjectionStatus]:
        return await self.running.status()

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        await self.running.wait_caught_up(timeout=timeout)


class DataPatterns:
    """The data patterns of one service, and their lifecycle (the service's start and stop call these)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.outbox: OutboxHandle | None = None
        self.sagas: SagasHandle | None = None
        self.events: EventsHandle | None = None
        self.projections: ProjectionsHandle | None = None
        self.database: Database | None = None

    def late(self, what: str) -> ConfigurationError:
        """The error for a data pattern first named while the service runs (it was not started with it)."""
        return ConfigurationError(
            f"service {self.service!r} is running without {what}: it was first named after the service started",
            hint=f"name {what} at import time (e.g. at the top of the module), so the service starts it",
        )

    @property
    def declared(self) -> bool:
        return any(h is not None for h in (self.outbox, self.sagas, self.events, self.projections))

    async def start(self, database: Database, broker: Any, tracer: Any) -> None:
        """Start what was declared, on ``database`` (which the caller opened and will close)."""
        self.database = database
        if self.projections is not None and self.events is None:  # the projections' store is there to use too
            self.events = EventsHandle(self.service)
        if self.events is not None:
            store = EventStore(database, tracer=tracer)
            if self.projections is None or not self.projections.declared:
                await store.migrate()  # (else the projector's start does)
            for type_, version, fn in self.events.upcasters:
                store.upcaster(type_, from_version=version)(fn)
            self.events._running = store
            if self.projections is not None and self.projections.declared:
                projector = Projector(store, database, tracer=tracer)
                for projection in self.projections.declared.values():
                    projector.add(projection)
                await projector.start()
                self.projections._running = projector
        if self.outbox is not None:
            outbox = Outbox(database, broker, source=self.service, tracer=tracer)
            await outbox.start()
            self.outbox._running = outbox
        if self.sagas is not None:
            sagas = Sagas(database, owner=self.service, tracer=tracer)
            for saga in self.sagas.declared.values():
                sagas.register(saga)
            await sagas.start()
            self.sagas._running = sagas

    async def stop(self) -> None:
        """Stop what :meth:`start` started (each one even if another fails to stop); safe to call twice."""
        handles: list[_Bound[Any] | None] = [self.sagas, self.outbox, self.projections, self.events]
        failures: list[BaseException] = []
        for handle in handles:
            if handle is None or handle._running is None:
                continue
            running, handle._running = handle._running, None
            closer = getattr(running, "aclose", None)
            if closer is not None:
                try:
                    await closer()
                except Exception as exc:
                    failures.append(exc)
        self.database = None
        if failures:
            raise failures[0]
