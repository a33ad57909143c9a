"""The event store on real SQLite and PostgreSQL: versions, positions, optimistic concurrency, atomic appends,
gap-safe global positions under concurrent writers, upcasting, snapshots, wake-ups and spans."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from meshkit._core.database import Database, connect_database
from meshkit.errors import ConfigurationError, ConflictError, DatabaseError, WrongExpectedVersion
from meshkit.eventsourcing import EventStore, NewEvent, RecordedEvent
from meshkit.tracing.spans import provider

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(database: Database) -> EventStore:
    store = EventStore(database)
    await store.migrate()
    return store


def opened(owner: str = "ada") -> NewEvent:
    return NewEvent("AccountOpened", {"owner": owner})


def deposited(amount: int) -> NewEvent:
    return NewEvent("MoneyDeposited", {"amount": amount}, {"by": "test"})


async def test_append_and_load_round_trip_with_versions_and_positions(store: EventStore) -> None:
    before = time.time()
    assert await store.head() == 0
    assert await store.append("account-1", [opened(), deposited(10)], expected_version=0) == 2
    assert await store.append("account-2", [opened("bob")], expected_version=0) == 1
    assert await store.append("account-1", [deposited(5)], expected_version=2) == 3

    events = await store.load("account-1")
    assert [(e.version, e.position, e.type) for e in events] == [
        (1, 1, "AccountOpened"),
        (2, 2, "MoneyDeposited"),
        (3, 4, "MoneyDeposited"),
    ]
    assert events[1].data == {"amount": 10}
    assert events[1].metadata == {"by": "test"}
    assert events[0].metadata == {}
    assert all(e.stream == "account-1" and e.schema_version == 1 for e in events)
    assert all(before - 1 <= e.recorded <= time.time() + 1 for e in events)
    assert len({e.id for e in events}) == 3
    assert [e.version for e in await store.load("account-1", after=2)] == [3]
    assert await store.load("account-3") == []
    assert await store.version("account-1") == 3
    assert await store.version("account-3") == 0

    everything = await store.read_all()
    assert [(e.position, e.stream) for e in everything] == [
        (1, "account-1"),
        (2, "account-1"),
        (3, "account-2"),
        (4, "account-1"),
    ]
    assert [e.position for e in await store.read_all(after=1, limit=2)] == [2, 3]
    assert [e.position for e in await store.read_all(types={"AccountOpened"})] == [1, 3]
    assert [e.position for e in await store.read_all(until=2)] == [1, 2]
    assert await store.read_all(types=[]) == []
    assert await store.head() == 4
    assert everything[0].to_dict()["stream"] == "account-1"


async def test_expected_version_conflicts_raise_with_expected_and_actual(store: EventStore) -> None:
    await store.append("account-1", [opened(), deposited(10)], expected_version=0)

    with pytest.raises(WrongExpectedVersion) as new:
        await store.append("account-1", [opened()], expected_version=0)
    assert (new.value.stream, new.value.expected, new.value.actual) == ("account-1", 0, 2)
    with pytest.raises(WrongExpectedVersion) as stale:
        await store.append("account-1", [deposited(1)], expected_version=1)
    assert (stale.value.expected, stale.value.actual) == (1, 2)
    with pytest.raises(WrongExpectedVersion) as ahead:
        await store.append("account-1", [deposited(1)], expected_version=7)
    assert (ahead.value.expected, ahead.value.actual) == (7, 2)
    assert isinstance(stale.value, ConflictError)
    assert await store.head() == 2  # nothing of the refused appends was written

    assert await store.append("account-1", [deposited(1)], expected_version=None) == 3
    assert await store.append("account-9", [opened()], expected_version=None) == 1
    assert await store.append("account-1", [], expected_version=3) == 3
    assert await store.append("account-1", [], expected_version=None) == 3
    with pytest.raises(WrongExpectedVersion):
        await store.append("account-1", [], expected_version=2)


async def test_two_concurrent_appenders_to_one_stream_exactly_one_wins(database_url: str) -> None:
    # separate databases (connections) so that the appends really race, on SQLite too
    databases = [await connect_database(database_url) for _ in range(2)]
    try:
        stores = [EventStore(db) for db in databases]
        await stores[0].migrate()
        await stores[0].append("account-1", [opened()], expected_version=0)
        for round_ in range(5):
            results = await asyncio.gather(
                *(
                    stores[i % 2].append("account-1", [deposited(i), deposited(i)], expected_version=1 + 2 * round_)
                    for i in range(6)
                ),
                return_exceptions=True,
            )
            winners = [r for r in results if isinstance(r, int)]
            losers = [r for r in results if isinstance(r, WrongExpectedVersion)]
            assert winners == [3 + 2 * round_], results
            assert len(losers) == 5
            assert all(e.actual == 3 + 2 * round_ for e in losers)
        events = await stores[1].load("account-1")
        assert [e.version for e in events] == list(range(1, 12))
        # each winner's two events are together: one writer's whole append, not a mix
        assert all(events[i].data == events[i + 1].data for i in range(1, 11, 2))
    finally:
        for db in databases:
            await db.aclose()


async def test_concurrent_appends_to_different_streams_are_never_skipped_by_a_polling_reader(
    database_url: str,
) -> None:
    databases = [await connect_database(database_url) for _ in range(3)]
    try:
        writers = [EventStore(db) for db in databases[:2]]
        reader = EventStore(databases[2])
        await reader.migrate()
        done = asyncio.Event()
        seen: list[int] = []

        async def write(n: int) -> None:
            store = writers[n % 2]
            for i in range(15):
                await store.append(f"account-{n}", [deposited(i)] * (1 + i % 3), expected_version=None)

        async def read() -> None:
            after = 0
            while True:
                finished = done.is_set()  # read to the end once more after the writers are done
                page = await reader.read_all(after=after, limit=7)
                for event in page:
                    seen.append(event.position)
                    after = event.position
                if finished and not page:
                    return
                await asyncio.sleep(0)

        reading = asyncio.create_task(read())
        await asyncio.gather(*(write(n) for n in range(6)))
        done.set()
        await reading
        head = await reader.head()
        assert head == 6 * sum(1 + i % 3 for i in range(15))
        assert seen == list(range(1, head + 1))  # strictly increasing, none skipped, none twice
    finally:
        for db in databases:
            await db.aclose()


_POISON = {
    "sqlite": "CREATE TRIGGER poison BEFORE INSERT ON meshkit_events WHEN NEW.type = 'Poison'"
    " BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
    "postgresql": "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN"
    " IF NEW.type = 'Poison' THEN RAISE EXCEPTION 'poisoned'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql;"
    " CREATE TRIGGER poison BEFORE INSERT ON meshkit_events FOR EACH ROW EXECUTE FUNCTION poison();",
}


async def test_an_append_is_atomic(store: EventStore, database: Database) -> None:
    await store.append("account-1", [opened()], expected_version=0)
    # a trigger refuses the third event, inside the append's transaction, after the first two were inserted
    await database.migrate(_POISON)
    with pytest.raises(DatabaseError, match="poisoned"):
        await store.append("account-2", [opened(), deposited(1), NewEvent("Poison", {})], expected_version=0)
    assert await store.load("account-2") == []
    assert await store.version("account-2") == 0
    assert await store.head() == 1
    assert await store.append("account-2", [opened(), deposited(1)], expected_version=0) == 2
    assert [e.position for e in await store.load("account-2")] == [2, 3]

    # bad data in the last event: nothing of the first is written either
    with pytest.raises(ConfigurationError, match="MoneyDeposited"):
        await store.append(
            "account-1", [deposited(1), NewEvent("MoneyDeposited", {"amount": {1, 2}})], expected_version=1
        )
    assert await store.version("account-1") == 1


async def test_upcasters_upgrade_old_events_in_a_chain_when_read(store: EventStore, database: Database) -> None:
    await store.append(
        "account-1",
        [
            NewEvent("MoneyWithdrawn", {"amount": 5}),  # schema 1: amount in euros
            NewEvent("MoneyWithdrawn", {"cents": 700}, schema_version=2),  # schema 2: cents
            NewEvent("MoneyWithdrawn", {"cents": 100, "currency": "USD"}, schema_version=3),
            opened(),
        ],
        expected_version=0,
    )

    @store.upcaster("MoneyWithdrawn", from_version=1)
    def to_cents(data: dict[str, Any]) -> dict[str, Any]:
        return {"cents": data["amount"] * 100}

    @store.upcaster("MoneyWithdrawn", from_version=2)
    def add_currency(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "currency": "EUR"}

    expected = [
        (3, {"cents": 500, "currency": "EUR"}),
        (3, {"cents": 700, "currency": "EUR"}),
        (3, {"cents": 100, "currency": "USD"}),
        (1, {"owner": "ada"}),
    ]
    assert [(e.schema_version, e.data) for e in await store.load("account-1")] == expected
    assert [(e.schema_version, e.data) for e in await store.read_all()] == expected
    # stored as appended: upcasting happens on read only
    raw = EventStore(database)
    assert [(e.schema_version, e.data) for e in await raw.load("account-1")][:2] == [
        (1, {"amount": 5}),
        (2, {"cents": 700}),
    ]
    with pytest.raises(ConfigurationError):
        store.upcaster("MoneyWithdrawn", from_version=2)(add_currency)
    with pytest.raises(ConfigurationError, match="from_version"):
        store.upcaster("MoneyWithdrawn", from_version=0)

    @raw.upcaster("AccountOpened", from_version=1)
    def broken(data: dict[str, Any]) -> Any:
        return ["not", "a", "dict"]

    with pytest.raises(ConfigurationError, match="AccountOpened"):
        await raw.load("account-1")


async def test_bad_input_is_refused_with_clear_errors(store: EventStore) -> None:
    for bad in ["", "has space", "-starts-with-dash", "x" * 201, "new\nline", "ünïcode"]:
        with pytest.raises(ConfigurationError, match="bad stream name"):
            await store.append(bad, [opened()], expected_version=None)
    with pytest.raises(ConfigurationError, match="stream name"):
        await store.load(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not JSON-able"):
        await store.append("account-1", [NewEvent("Odd", {"when": time})], expected_version=None)
    with pytest.raises(ConfigurationError, match="not JSON-able"):
        await store.append("account-1", [NewEvent("Odd", {"x": math.nan})], expected_version=None)
    with pytest.raises(ConfigurationError, match="metadata"):
        await store.append("account-1", [NewEvent("Odd", {}, {"x": object()})], expected_version=None)
    with pytest.raises(ConfigurationError, match="must be a dict"):
        NewEvent("Odd", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="event type"):
        NewEvent("", {})
    with pytest.raises(ConfigurationError, match="schema_version"):
        NewEvent("Odd", {}, schema_version=0)
    with pytest.raises(ConfigurationError, match="expected_version"):
        await store.append("account-1", [opened()], expected_version=-1)
    with pytest.raises(ConfigurationError, match="NewEvent"):
        await store.append("account-1", [{"type": "x"}], expected_version=None)  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="limit"):
        await store.read_all(limit=0)
    assert await store.head() == 0


async def test_snapshots_keep_the_newest(store: EventStore) -> None:
    assert await store.load_snapshot("account-1") is None
    await store.save_snapshot("account-1", 10, {"balance": 100})
    await store.save_snapshot("account-1", 5, {"balance": 50})  # older: ignored
    snapshot = await store.load_snapshot("account-1")
    assert snapshot is not None
    assert (snapshot.stream, snapshot.version, snapshot.state, snapshot.schema_version) == (
        "account-1",
        10,
        {"balance": 100},
        1,
    )
    await store.save_snapshot("account-1", 20, {"balance": 200})
    await store.save_snapshot("account-1", 8, {"cents": 800}, schema_version=2)  # another shape replaces it
    snapshot = await store.load_snapshot("account-1")
    assert snapshot is not None
    assert (snapshot.version, snapshot.state, snapshot.schema_version) == (8, {"cents": 800}, 2)
    with pytest.raises(ConfigurationError, match="not JSON-able"):
        await store.save_snapshot("account-1", 30, {"x": {1}})
    with pytest.raises(ConfigurationError, match="version"):
        await store.save_snapshot("account-1", 0, {})


async def test_on_append_wakes_callbacks_after_commit(store: EventStore, caplog: pytest.LogCaptureFixture) -> None:
    got: list[list[tuple[str, int, int]]] = []

    def callback(events: Sequence[RecordedEvent]) -> None:
        got.append([(e.stream, e.version, e.position) for e in events])

    def broken(events: Sequence[RecordedEvent]) -> None:
        raise RuntimeError("boom")

    unsubscribe = store.on_append(callback)
    store.on_append(broken)
    with caplog.at_level(logging.ERROR, logger="meshkit.eventsourcing"):
        await store.append("account-1", [opened(), deposited(1)], expected_version=0)
    assert got == [[("account-1", 1, 1), ("account-1", 2, 2)]]
    assert any("on_append callback failed" in r.message and r.exc_info for r in caplog.records)
    with pytest.raises(WrongExpectedVersion):
        await store.append("account-1", [deposited(1)], expected_version=0)
    assert len(got) == 1  # refused appends wake nobody
    unsubscribe()
    unsubscribe()
    await store.append("account-1", [deposited(1)], expected_version=2)
    assert len(got) == 1


async def test_migrate_is_idempotent(store: EventStore) -> None:
    await store.append("account-1", [opened()], expected_version=0)
    await store.migrate()
    assert await store.version("account-1") == 1


async def test_append_runs_in_a_span(database: Database) -> None:
    exporter = InMemorySpanExporter()
    made = provider("accounts", exporter=exporter, batch=False)
    store = EventStore(database, tracer=made.get_tracer("test"))
    await store.migrate()
    await store.append("account-42", [opened(), deposited(3)], expected_version=0)
    with pytest.raises(WrongExpectedVersion):
        await store.append("account-42", [deposited(3)], expected_version=0)

    ok, refused = exporter.get_finished_spans()
    assert ok.name == refused.name == "event store append account"
    assert ok.kind == SpanKind.INTERNAL
    assert dict(ok.attributes or {}) == {
        "db.system": database.dialect,
        "db.operation.name": "append",
        "meshkit.eventsourcing.stream": "account-42",
        "meshkit.eventsourcing.events": 2,
        "meshkit.eventsourcing.version": 2,
    }
    assert refused.status.status_code == StatusCode.ERROR
    made.shutdown()
