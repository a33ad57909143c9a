"""Projections on real SQLite and PostgreSQL: a read model built from events, exactly once (checkpoint and rows in
one transaction, also across replicas), an error that stops only its projection, rebuild, lag, type filters,
wake-ups in process and polling across processes, spans."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from meshkit._core.database import Database, Transaction, connect_database
from meshkit.errors import ConfigurationError, TimeoutExceeded
from meshkit.eventsourcing import EventStore, NewEvent, RecordedEvent
from meshkit.projections import Projection, ProjectionStatus, Projector, read_status
from meshkit.testing import eventually
from meshkit.tracing.spans import provider

pytestmark = pytest.mark.anyio

BALANCES = (
    "CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, owner TEXT NOT NULL, amount BIGINT NOT NULL);"
)
APPLIED = "CREATE TABLE IF NOT EXISTS applied (projection TEXT NOT NULL, position BIGINT NOT NULL);"


async def balances(tx: Transaction, event: RecordedEvent) -> None:
    account = event.stream.split("-", 1)[1]
    if event.type == "AccountOpened":
        await tx.execute("INSERT INTO balances (account, owner, amount) VALUES (?, ?, 0)", account, event.data["owner"])
    elif event.type == "MoneyDeposited":
        await tx.execute("UPDATE balances SET amount = amount + ? WHERE account = ?", event.data["amount"], account)
    elif event.type == "MoneyWithdrawn":
        await tx.execute("UPDATE balances SET amount = amount - ? WHERE account = ?", event.data["amount"], account)


async def clear_balances(tx: Transaction) -> None:
    await tx.execute("DELETE FROM balances")


def balances_projection() -> Projection:
    return Projection(
        "account_balances", balances, schema={"sqlite": BALANCES, "postgresql": BALANCES}, reset=clear_balances
    )


def opened(owner: str) -> NewEvent:
    return NewEvent("AccountOpened", {"owner": owner})


def deposited(amount: int) -> NewEvent:
    return NewEvent("MoneyDeposited", {"amount": amount})


def withdrawn(amount: int) -> NewEvent:
    return NewEvent("MoneyWithdrawn", {"amount": amount})


@pytest.fixture
async def store(database: Database) -> EventStore:
    store = EventStore(database)
    await store.migrate()
    return store


async def read_balances(database: Database) -> dict[str, tuple[str, int]]:
    rows = await database.fetch("SELECT account, owner, amount FROM balances")
    return {account: (owner, int(amount)) for account, owner, amount in rows}


async def status_of(projector: Projector, name: str) -> ProjectionStatus:
    return next(s for s in await projector.status() if s.name == name)


async def test_a_read_model_is_built_from_events_and_kept_up_to_date(store: EventStore, database: Database) -> None:
    await store.append("account-1", [opened("ada"), deposited(100), withdrawn(30)], expected_version=0)
    await store.append("account-2", [opened("bob")], expected_version=0)
    # a long poll interval: later appends of this process must wake the projector, not the poll
    projector = Projector(store, database, poll_interval=60.0, batch_size=2)
    projector.add(balances_projection())
    await projector.start()
    try:
        await projector.wait_caught_up(timeout=30)
        assert await read_balances(database) == {"1": ("ada", 70), "2": ("bob", 0)}
        await store.append("account-2", [deposited(5)], expected_version=1)
        await eventually(
            lambda: _position(projector, "account_balances") == 5, "the append woke the projector", timeout=20
        )
        assert await read_balances(database) == {"1": ("ada", 70), "2": ("bob", 5)}
        (status,) = await projector.status()
        assert (status.name, status.position, status.head, status.lag, status.error) == (
            "account_balances",
            5,
            5,
            0,
            None,
        )
        assert status.updated is not None
        assert json.loads(json.dumps(status.to_dict())) == status.to_dict()
    finally:
        await projector.aclose()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("meshkit projection")]


def _position(projector: Projector, name: str) -> int:
    return projector._runs[name].position


async def test_appends_of_another_process_are_found_by_polling(database_url: str) -> None:
    mine, theirs = await connect_database(database_url), await connect_database(database_url)
    try:
        store, other = EventStore(mine), EventStore(theirs)
        projector = Projector(store, mine, poll_interval=0.05)
        projector.add(balances_projection())
        async with projector:
            await other.append("account-9", [opened("eve"), deposited(3)], expected_version=0)
            await eventually(lambda: _position(projector, "account_balances") == 2, "a poll found the append")
            assert await read_balances(mine) == {"9": ("eve", 3)}
    finally:
        await mine.aclose()
        await theirs.aclose()


async def test_a_crash_after_writing_rolls_the_write_back_and_the_event_is_applied_once(
    store: EventStore, database: Database
) -> None:
    failing = {"MoneyDeposited"}
    attempts: list[int] = []

    async def log_then_crash(tx: Transaction, event: RecordedEvent) -> None:
        await tx.execute("INSERT INTO applied (projection, position) VALUES ('log', ?)", event.position)
        attempts.append(event.position)
        if event.type in failing:
            raise RuntimeError(f"crash after writing event {event.position}")

    await store.append("account-1", [opened("ada"), deposited(1), withdrawn(1)], expected_version=0)
    projector = Projector(store, database, poll_interval=0.05, max_backoff=0.05)
    projector.add(Projection("log", log_then_crash, schema={"sqlite": APPLIED, "postgresql": APPLIED}))
    async with projector:
        await eventually(lambda: attempts.count(2) >= 3, "the failing event was retried")
        status = await status_of(projector, "log")
        assert status.position == 1  # stopped right before the failing event, the one before it committed
        assert status.error is not None
        assert "RuntimeError: crash after writing event 2" in status.error
        assert "MoneyDeposited" in status.error
        rows = await database.fetch("SELECT position FROM applied ORDER BY position")
        assert rows == [(1,)]  # every write of the failed attempts was rolled back with the checkpoint
        failing.clear()
        await projector.wait_caught_up(timeout=30)
        rows = await database.fetch("SELECT position FROM applied ORDER BY position")
        assert rows == [(1,), (2,), (3,)]
        assert (await status_of(projector, "log")).error is None


async def test_an_error_stops_only_its_projection_and_shows_in_status(
    store: EventStore, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    broken = True

    async def picky(tx: Transaction, event: RecordedEvent) -> None:
        if broken and event.data.get("amount") == 13:
            raise ValueError("unlucky amount")

    await store.append("account-1", [opened("ada"), deposited(5), deposited(13), deposited(7)], expected_version=0)
    projector = Projector(store, database, poll_interval=0.05, max_backoff=0.1)
    projector.add(balances_projection())
    projector.add(Projection("picky", picky))
    with caplog.at_level(logging.ERROR, logger="meshkit.projections"):
        async with projector:
            await eventually(lambda: _position(projector, "account_balances") == 4, "the healthy one caught up")
            await eventually(lambda: projector._runs["picky"].error is not None, "the error is seen")
            with pytest.raises(TimeoutExceeded, match="picky at 2") as timeout:
                await projector.wait_caught_up(timeout=0.3)
            assert "unlucky amount" in str(timeout.value)
            healthy, picky_status = await projector.status()
            assert (healthy.position, healthy.lag, healthy.error) == (4, 0, None)
            assert (picky_status.position, picky_status.head, picky_status.lag) == (2, 4, 2)
            assert picky_status.error == "ValueError: unlucky amount at event 3 (MoneyDeposited of account-1)"
            # a reader that runs no projection (the dashboard, another process) sees the same, from the database
            assert await read_status(store, database) == [healthy, picky_status]
            assert await read_balances(database) == {"1": ("ada", 25)}
            broken = False
            await projector.wait_caught_up(timeout=30)
            assert (await status_of(projector, "picky")).error is None

            async def read_back_healthy() -> bool:
                return [(s.position, s.lag, s.error) for s in await read_status(store, database)] == [(4, 0, None)] * 2

            await eventually(read_back_healthy, "the stored error cleared")
    failures = [r for r in caplog.records if r.name == "meshkit.projections" and r.levelno == logging.ERROR]
    assert failures
    assert getattr(failures[0], "projection", None) == "picky"
    assert getattr(failures[0], "event_position", None) == 3
    assert failures[0].exc_info is not None


async def test_rebuild_resets_the_read_model_and_replays_every_event(store: EventStore, database: Database) -> None:
    calls: list[int] = []

    async def counting(tx: Transaction, event: RecordedEvent) -> None:
        calls.append(event.position)
        await balances(tx, event)

    await store.append("account-1", [opened("ada"), deposited(10)], expected_version=0)
    await store.append("account-2", [opened("bob"), deposited(20)], expected_version=0)
    schema = {"sqlite": BALANCES, "postgresql": BALANCES}
    projector = Projector(store, database, poll_interval=0.05)
    projector.add(Projection("account_balances", counting, schema=schema, reset=clear_balances))
    async with projector:
        await projector.wait_caught_up(timeout=30)
        await database.execute("UPDATE balances SET amount = 999")  # the read model went wrong
        await projector.rebuild("account_balances")
        await projector.wait_caught_up(timeout=30)
        assert await read_balances(database) == {"1": ("ada", 10), "2": ("bob", 20)}
        assert calls == [1, 2, 3, 4, 1, 2, 3, 4]
        with pytest.raises(ConfigurationError, match="no projection named 'nope'"):
            await projector.rebuild("nope")


async def test_status_shows_the_lag_of_a_projection_that_is_behind(database_url: str) -> None:
    mine, theirs = await connect_database(database_url), await connect_database(database_url)
    try:
        store, other = EventStore(mine), EventStore(theirs)
        await store.migrate()
        await store.append("account-0", [opened("ada")], expected_version=0)
        # polls only every minute: appends of another process stay unseen until this process appends
        projector = Projector(store, mine, poll_interval=60.0)
        projector.add(balances_projection())
        with pytest.raises(ConfigurationError, match="not started"):
            await projector.status()
        async with projector:
            await projector.wait_caught_up(timeout=30)
            (status,) = await projector.status()
            assert (status.position, status.head, status.lag, status.error) == (1, 1, 0, None)
            first_update = status.updated
            assert first_update is not None
            for n in range(1, 6):
                await other.append(f"account-{n}", [opened("bob")], expected_version=0)
            (status,) = await projector.status()
            assert (status.position, status.head, status.lag, status.updated) == (1, 6, 5, first_update)
            await store.append("account-9", [opened("eve")], expected_version=0)
            await projector.wait_caught_up(timeout=20)
            (status,) = await projector.status()
            assert (status.position, status.head, status.lag) == (7, 7, 0)
            assert status.updated is not None
            assert status.updated >= first_update
    finally:
        await mine.aclose()
        await theirs.aclose()


async def test_a_type_filter_keeps_only_those_events_and_still_reaches_the_head(
    store: EventStore, database: Database
) -> None:
    seen: list[str] = []

    async def deposits(tx: Transaction, event: RecordedEvent) -> None:
        seen.append(event.type)

    await store.append("account-1", [opened("ada"), deposited(1), withdrawn(1), deposited(2)], expected_version=0)
    projector = Projector(store, database, poll_interval=0.05, batch_size=1)
    projector.add(Projection("deposits", deposits, types={"MoneyDeposited"}))
    async with projector:
        await projector.wait_caught_up(timeout=30)
        await store.append("account-1", [withdrawn(1), opened("x")], expected_version=4)
        await projector.wait_caught_up(timeout=30)
        (status,) = await projector.status()
        assert (status.position, status.lag) == (6, 0)
    assert seen == ["MoneyDeposited", "MoneyDeposited"]


async def test_replicas_of_one_projection_apply_each_event_once(database_url: str) -> None:
    databases = [await connect_database(database_url) for _ in range(2)]
    try:
        stores = [EventStore(db) for db in databases]
        await stores[0].migrate()

        async def record(tx: Transaction, event: RecordedEvent) -> None:
            await tx.execute("INSERT INTO applied (projection, position) VALUES ('shared', ?)", event.position)

        schema = {"sqlite": APPLIED, "postgresql": APPLIED}
        projectors = [
            Projector(store, db, poll_interval=0.02, batch_size=3) for store, db in zip(stores, databases, strict=True)
        ]
        for projector in projectors:
            projector.add(Projection("shared", record, schema=schema))
            await projector.start()
        try:
            for n in range(20):
                await stores[n % 2].append(f"account-{n}", [opened("ada"), deposited(n)], expected_version=0)
            for projector in projectors:
                await projector.wait_caught_up(timeout=30)
            rows = await databases[0].fetch("SELECT position FROM applied ORDER BY position")
            assert [int(p) for (p,) in rows] == list(range(1, 41))
        finally:
            for projector in projectors:
                await projector.aclose()
    finally:
        for db in databases:
            await db.aclose()


async def test_a_rebuild_by_another_process_is_followed_not_overtaken(database_url: str) -> None:
    """Another process resets the checkpoint (its rebuild) while this one is caught up: this one must replay from
    the reset checkpoint, not apply only what came after its own position (which lost every earlier event)."""
    databases = [await connect_database(database_url) for _ in range(2)]
    try:
        store = EventStore(databases[0])
        await store.migrate()

        async def record(tx: Transaction, event: RecordedEvent) -> None:
            await tx.execute("INSERT INTO applied (projection, position) VALUES ('shared', ?)", event.position)

        projector = Projector(store, databases[0], poll_interval=0.02)
        projector.add(Projection("shared", record, schema={"sqlite": APPLIED, "postgresql": APPLIED}))
        async with projector:
            for n in range(5):
                await store.append(f"account-{n}", [opened("ada"), deposited(n)], expected_version=0)
            await projector.wait_caught_up(timeout=30)
            async with databases[1].transaction() as tx:  # the other process's rebuild: reset, checkpoint to 0
                await tx.execute("DELETE FROM applied")
                await tx.execute("UPDATE meshkit_projections SET position = 0 WHERE name = 'shared'")
            await EventStore(databases[1]).append("account-9", [opened("bob")], expected_version=0)

            async def replayed() -> bool:
                rows = await databases[1].fetch("SELECT position FROM applied ORDER BY position")
                return [int(p) for (p,) in rows] == list(range(1, 12))

            await eventually(replayed, "every event replayed after the reset")
            await projector.wait_caught_up(timeout=30)
            assert (await status_of(projector, "shared")).position == 11
    finally:
        for db in databases:
            await db.aclose()


async def test_a_batch_runs_in_a_projection_span(store: EventStore, database: Database) -> None:
    exporter = InMemorySpanExporter()
    made = provider("accounts", exporter=exporter, batch=False)
    await store.append("account-1", [opened("ada"), deposited(1)], expected_version=0)
    projector = Projector(store, database, tracer=made.get_tracer("test"), poll_interval=0.05)
    projector.add(balances_projection())
    async with projector:
        await projector.wait_caught_up(timeout=30)
    (batch,) = exporter.get_finished_spans()
    assert batch.name == "projection account_balances"
    assert batch.kind == SpanKind.INTERNAL
    assert dict(batch.attributes or {}) == {
        "db.system": database.dialect,
        "meshkit.projection.name": "account_balances",
        "meshkit.projection.events": 2,
        "meshkit.projection.position": 2,
    }
    made.shutdown()


async def test_bad_projections_and_projectors_are_refused(store: EventStore, database: Database) -> None:
    with pytest.raises(ConfigurationError, match="bad projection name"):
        Projection("has space", balances)
    with pytest.raises(ConfigurationError, match="not one str"):
        Projection("p", balances, types="MoneyDeposited")
    with pytest.raises(ConfigurationError, match="poll_interval"):
        Projector(store, database, poll_interval=0)
    projector = Projector(store, database)
    projector.add(balances_projection())
    with pytest.raises(ConfigurationError, match="already added"):
        projector.add(balances_projection())
    with pytest.raises(ConfigurationError, match="not started"):
        await projector.wait_caught_up()
    async with projector:
        with pytest.raises(ConfigurationError, match="before the projector starts"):
            projector.add(Projection("late", balances))
    with pytest.raises(ConfigurationError, match="closed"):
        await projector.start()
