"""The event store: append-only streams of events in the service's database (SQLite or PostgreSQL).

Every event has a ``version`` in its stream (1, 2, ...) and a ``position`` in the database's global log (1, 2, ...,
no gaps). Appends are serialized: SQLite's write lock (``BEGIN IMMEDIATE``) does it there, and on PostgreSQL each
append first takes a transaction-scoped advisory lock (:data:`APPEND_LOCK`). So positions are handed out and
committed in the same order, and a reader of ``position > checkpoint`` (a projection) can never miss an event that
commits later with a lower position. The price is that appends to one database run one at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from meshkit._core.database import Database, Transaction
from meshkit._core.ids import new_ids
from meshkit.errors import ConfigurationError, WrongExpectedVersion
from meshkit.eventsourcing.events import (
    NewEvent,
    RecordedEvent,
    Snapshot,
    check_stream,
    decode,
    encode,
    stream_category,
)
from meshkit.tracing.spans import span

__all__ = ["APPEND_LOCK", "SCHEMA", "AppendCallback", "EventStore", "Upcaster"]

log = logging.getLogger("meshkit.eventsourcing")

#: The PostgreSQL advisory lock key every append holds until it commits (``pg_advisory_xact_lock``).
APPEND_LOCK = 7_419_263_811

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
#: Called after each append commits with the events it recorded (in-process; must be quick and not block).
AppendCallback = Callable[[Sequence[RecordedEvent]], None]
U = TypeVar("U", bound=Upcaster)

_TABLES = """
CREATE TABLE IF NOT EXISTS meshkit_events (
    position BIGINT NOT NULL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    stream TEXT NOT NULL,
    version BIGINT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    schema_version BIGINT NOT NULL,
    recorded DOUBLE PRECISION NOT NULL,
    UNIQUE (stream, version)
);
CREATE TABLE IF NOT EXISTS meshkit_snapshots (
    stream TEXT NOT NULL PRIMARY KEY,
    version BIGINT NOT NULL,
    schema_version BIGINT NOT NULL,
    state TEXT NOT NULL,
    recorded DOUBLE PRECISION NOT NULL
);
"""
#: The tables of the event store, shared by every service of one database.
SCHEMA = {"sqlite": _TABLES, "postgresql": _TABLES}

_COLUMNS = "id, stream, version, position, type, data, metadata, schema_version, recorded"
_INSERT = f"INSERT INTO meshkit_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608 (constants)


class EventStore:
    """Streams of events in ``database`` (see the module docstring for the guarantees).

    ::

        store = EventStore(database, tracer=tracer)
        await store.migrate()
        version = await store.append("account-42", [NewEvent("AccountOpened", {"owner": "ada"})], expected_version=0)
        events = await store.load("account-42")
    """

    def __init__(self, database: Database, *, tracer: Any = None) -> None:
        self.database = database
        self.tracer = tracer
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._callbacks: list[AppendCallback] = []

    async def migrate(self) -> None:
        """Create the store's tables if they are missing (safe to repeat, and from several processes)."""
        await self.database.migrate(SCHEMA)

    # -- upcasting --------------------------------------------------------------------------------------------------

    def upcaster(self, event_type: str, *, from_version: int) -> Callable[[U], U]:
        """Register ``fn(data) -> data`` that turns ``event_type``'s data of schema ``from_version`` into
        ``from_version + 1``. Reads apply upcasters in a chain (1 -> 2 -> 3) until none is left::

            @store.upcaster("MoneyWithdrawn", from_version=1)
            def add_currency(data: dict) -> dict:
                return {**data, "currency": "EUR"}
        """
        if from_version < 1:
            raise ConfigurationError(f"from_version must be an int >= 1, not {from_version!r}")
        key = (event_type, from_version)

        def register(fn: U) -> U:
            if key in self._upcasters:
                raise ConfigurationError(f"an upcaster of {event_type!r} from version {from_version} is registered")
            self._upcasters[key] = fn
            return fn

        return register

    def _upcast(self, event_type: str, schema_version: int, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        upcasters = self._upcasters
        while (fn := upcasters.get((event_type, schema_version))) is not None:
            data = fn(data)
            if not isinstance(data, dict):
                raise ConfigurationError(
                    f"the upcaster of {event_type!r} from version {schema_version} returned "
                    f"{type(data).__name__}, not a dict"
                )
            schema_version += 1
        return schema_version, data

    def _event(self, row: Sequence[Any]) -> RecordedEvent:
        event_id, stream, version, position, event_type, data, metadata, schema_version, recorded = row
        schema_version, upcast = self._upcast(event_type, int(schema_version), decode(data))
        return RecordedEvent(
            event_id,
            stream,
            int(version),
            int(position),
            event_type,
            upcast,
            decode(metadata),
            schema_version,
            float(recorded),
        )

    # -- writing ----------------------------------------------------------------------------------------------------

    async def append(self, stream: str, events: Sequence[NewEvent], *, expected_version: int | None) -> int:
        """Append ``events`` to ``stream`` atomically (all or none); returns the stream's new version.

        ``expected_version`` is the version the caller decided on (0: the stream must not exist yet), or None to
        append whatever the version. :class:`~meshkit.errors.WrongExpectedVersion` when the stream is at another
        version (another writer got there first): nothing was appended. With no events, nothing is written and the
        current version is returned (after the same check).
        """
        check_stream(stream)
        if expected_version is not None and expected_version < 0:
            raise ConfigurationError(f"expected_version must be an int >= 0 or None, not {expected_version!r}")
        events = list(events)
        for event in events:
            if not isinstance(event, NewEvent):
                raise ConfigurationError(f"append takes NewEvent objects, not {type(event).__name__}")
        rows = [
            (
                event.type,
                encode(event.data, f"the data of event {event.type!r}"),
                encode(event.metadata, f"the metadata of event {event.type!r}"),
                event.schema_version,
            )
            for event in events
        ]
        attributes = {
            "db.system": self.database.dialect,
            "db.operation.name": "append",
            "meshkit.eventsourcing.stream": stream,
            "meshkit.eventsourcing.events": len(events),
        }
        with span(self.tracer, f"event store append {stream_category(stream)}", attributes=attributes) as current:
            version, recorded = await self._append(stream, events, rows, expected_version)
            if current is not None:
                current.set_attribute("meshkit.eventsourcing.version", version)
        if recorded:
            self._notify(recorded)
        return version

    async def _append(
        self, stream: str, events: list[NewEvent], rows: list[tuple[str, str, str, int]], expected: int | None
    ) -> tuple[int, list[RecordedEvent]]:
        async with self.database.transaction() as tx:
            if tx.dialect == "postgresql":
                await tx.fetch("SELECT pg_advisory_xact_lock(?)", APPEND_LOCK)
            actual = await _stream_version(tx, stream)
            if expected is not None and actual != expected:
                log.debug(
                    "append to %s refused: at version %d, expected %d",
                    stream,
                    actual,
                    expected,
                    extra={"stream": stream, "expected_version": expected, "actual_version": actual},
                )
                raise WrongExpectedVersion(stream, expected=expected, actual=actual)
            if not rows:
                return actual, []
            head = await _head(tx)
            now = time.time()
            ids = new_ids(len(rows))
            stored = [
                (ids[i], stream, actual + 1 + i, head + 1 + i, event_type, data, metadata, schema_version, now)
                for i, (event_type, data, metadata, schema_version) in enumerate(rows)
            ]
            await tx.executemany(_INSERT, stored)
        # as appended (not upcast): an upcaster's failure must not turn a committed append into an error
        return actual + len(rows), [
            RecordedEvent(
                event_id, stream, version, position, event_type, event.data, event.metadata, event.schema_version, now
            )
            for (event_id, stream, version, position, event_type, *_), event in zip(stored, events, strict=True)
        ]

    def on_append(self, callback: AppendCallback) -> Callable[[], None]:
        """Call ``callback(events)`` after each append of this store commits, with the events as appended (not
        upcast; this process only: other processes' appends are found by polling).
        Returns a function that unsubscribes. A callback that raises is logged."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def _notify(self, events: Sequence[RecordedEvent]) -> None:
        for callback in list(self._callbacks):
            try:
                callback(events)
            except Exception:
                log.exception(
                    "an on_append callback failed", extra={"stream": events[0].stream, "callback": repr(callback)}
                )

    async def save_snapshot(self, stream: str, version: int, state: dict[str, Any], *, schema_version: int = 1) -> None:
        """Keep ``state`` as the state of ``stream`` after its event ``version`` (one snapshot per stream: a newer
        one replaces it, an older one is ignored unless its ``schema_version`` differs)."""
        check_stream(stream)
        if version < 1:
            raise ConfigurationError(f"a snapshot's version must be an int >= 1, not {version!r}")
        if not isinstance(state, dict):
            raise ConfigurationError(f"a snapshot's state must be a dict, not {type(state).__name__}")
        text = encode(state, f"the snapshot state of {stream!r}")
        async with self.database.transaction() as tx:
            await tx.execute(
                "INSERT INTO meshkit_snapshots (stream, version, schema_version, state, recorded)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (stream) DO UPDATE SET version = excluded.version,"
                " schema_version = excluded.schema_version, state = excluded.state, recorded = excluded.recorded"
                " WHERE excluded.version > meshkit_snapshots.version"
                " OR excluded.schema_version <> meshkit_snapshots.schema_version",
                stream,
                version,
                schema_version,
                text,
                time.time(),
            )

    # -- reading ----------------------------------------------------------------------------------------------------

    async def load(self, stream: str, after: int = 0) -> list[RecordedEvent]:
        """The events of ``stream`` with a version above ``after``, in order, upcast ([] for a stream with none)."""
        check_stream(stream)
        async with self.database.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT {_COLUMNS} FROM meshkit_events WHERE stream = ? AND version > ? ORDER BY version",  # noqa: S608
                stream,
                int(after),
            )
        return [self._event(row) for row in rows]

    async def read_all(
        self, after: int = 0, limit: int = 1000, *, types: Collection[str] | None = None, until: int | None = None
    ) -> list[RecordedEvent]:
        """Up to ``limit`` events of the global log with a position above ``after`` (and at most ``until``), in
        position order, upcast. ``types`` keeps only events of those types."""
        if limit < 1:
            raise ConfigurationError(f"limit must be an int >= 1, not {limit!r}")
        sql = f"SELECT {_COLUMNS} FROM meshkit_events WHERE position > ?"  # noqa: S608 (constant columns)
        params: list[Any] = [int(after)]
        if until is not None:
            sql += " AND position <= ?"
            params.append(int(until))
        if types is not None:
            wanted = sorted(set(types))
            if not wanted:
                return []
            sql += f" AND type IN ({', '.join('?' for _ in wanted)})"
            params.extend(wanted)
        sql += " ORDER BY position LIMIT ?"
        params.append(limit)
        async with self.database.transaction() as tx:
            rows = await tx.fetch(sql, *params)
        return [self._event(row) for row in rows]

    async def head(self) -> int:
        """The position of the last event in the global log (0 when there is none)."""
        async with self.database.transaction() as tx:
            return await _head(tx)

    async def version(self, stream: str) -> int:
        """The version of ``stream``: how many events it holds (0 when it does not exist)."""
        check_stream(stream)
        async with self.database.transaction() as tx:
            return await _stream_version(tx, stream)

    async def load_snapshot(self, stream: str) -> Snapshot | None:
        """The snapshot of ``stream`` (None when it has none)."""
        check_stream(stream)
        async with self.database.transaction() as tx:
            row = await tx.fetchone(
                "SELECT version, schema_version, state, recorded FROM meshkit_snapshots WHERE stream = ?", stream
            )
        if row is None:
            return None
        version, schema_version, state, recorded = row
        return Snapshot(stream, int(version), decode(state), int(schema_version), float(recorded))


async def _stream_version(tx: Transaction, stream: str) -> int:
    row = await tx.fetchone("SELECT MAX(version) FROM meshkit_events WHERE stream = ?", stream)
    return 0 if row is None or row[0] is None else int(row[0])


async def _head(tx: Transaction) -> int:
    row = await tx.fetchone("SELECT MAX(position) FROM meshkit_events")
    return 0 if row is None or row[0] is None else int(row[0])
