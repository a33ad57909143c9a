"""A service's data patterns (meshkit.runtime.data): declared at import time, started and stopped with the service,
on the database the runner names (real SQLite and PostgreSQL) or the service's own data.db."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshkit import Service, Transaction, discovery, messaging
from meshkit.client import AsgiTransport
from meshkit.errors import ConfigurationError, SagaFailed
from meshkit.eventsourcing import Aggregate, Event, NewEvent, RecordedEvent
from meshkit.messaging import Message
from meshkit.projections import Projection
from meshkit.runtime import RunContext
from meshkit.saga import Saga, SagaContext, Step
from meshkit.testing import eventually

pytestmark = pytest.mark.anyio


class Counter(Aggregate):
    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.count = 0

    def apply(self, event: Event) -> None:
        self.count += event.data["by"]


async def test_outbox_saga_events_and_projections_run_with_the_service(database_url: str, tmp_path: Path) -> None:
    service = Service("orders")
    outbox = service.outbox
    undone: list[str] = []
    seen: list[object] = []

    async def charge(ctx: SagaContext) -> dict[str, str]:
        return {"id": f"ch-{ctx.saga_id}"}

    async def refund(ctx: SagaContext) -> None:
        undone.append(ctx.saga_id)

    async def ship(ctx: SagaContext) -> None:
        if ctx.data.get("fail"):
            raise RuntimeError("no truck")

    checkout = service.saga(Saga("checkout", [Step("charge", charge, compensate=refund), Step("ship", ship)]))
    assert service.saga(checkout) is checkout, "declaring the same saga twice is fine"
    with pytest.raises(ConfigurationError, match="already declares a saga"):
        service.saga(Saga("checkout", [Step("charge", charge)]))

    async def totals(tx: Transaction, event: RecordedEvent) -> None:
        await tx.execute("UPDATE totals SET total = total + ?", event.data["by"])

    table = (
        "CREATE TABLE IF NOT EXISTS totals (total BIGINT);"
        " INSERT INTO totals SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM totals);"
    )
    service.projection(Projection("totals", totals, schema={"sqlite": table, "postgresql": table}))

    @service.on_start
    async def tables() -> None:
        await service.database.execute("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY)")

    @service.subscribe("order.created")
    async def handled(message: Message) -> None:
        async with service.outbox.receive(message) as tx:
            if not tx.duplicate:
                seen.append(message.data)

    with pytest.raises(ConfigurationError, match="not running"):
        outbox.transaction()
    with pytest.raises(ConfigurationError, match="no database open"):
        _ = service.database

    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        ctx = RunContext(broker, registry, AsgiTransport({}), tmp_path, database_url=database_url)
        await service.start(ctx)
        try:
            async with outbox.transaction() as tx:
                await tx.execute("INSERT INTO orders (id) VALUES (?)", "o-1")
                tx.publish("order.created", {"id": "o-1"}, key="o-1")
            await eventually(lambda: seen == [{"id": "o-1"}], "the relayed message handled")
            assert await outbox.pending() == 0

            done = await service.sagas.run(checkout, {"fail": False}, saga_id="s-1")
            assert done.status == "completed" and done.results["charge"] == {"id": "ch-s-1"}
            with pytest.raises(SagaFailed) as failed:
                await service.sagas.run("checkout", {"fail": True}, saga_id="s-2")
            assert failed.value.status == "compensated" and undone == ["s-2"]
            assert [r.id for r in await service.sagas.list()] == ["s-2", "s-1"]

            counters = service.events.repository(Counter)
            counter = await counters.load("c1")
            counter.record("Counted", {"by": 2})
            counter.record("Counted", {"by": 3})
            await counters.save(counter)
            await service.events.append("counter-c2", [NewEvent("Counted", {"by": 10})], expected_version=0)
            assert [e.type for e in await service.events.load("counter-c1")] == ["Counted", "Counted"]
            await service.projections.wait_caught_up()
            assert await service.database.fetch("SELECT total FROM totals") == [(15,)]
            assert [(s.name, s.lag) for s in await service.projections.status()] == [("totals", 0)]

            _, report = await service.readiness_report()
            assert report["database"] == "ok"
        finally:
            await service.stop()
    with pytest.raises(ConfigurationError, match="not running"):
        await service.sagas.get("s-1")
    with pytest.raises(ConfigurationError, match="no database open"):
        _ = service.database


async def test_without_a_database_url_the_service_keeps_its_own_file(tmp_path: Path) -> None:
    service = Service("accounts")
    events = service.events
    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        await service.start(RunContext(broker, registry, AsgiTransport({}), tmp_path / "accounts"))
        try:
            await events.append("a-1", [NewEvent("Opened", {})], expected_version=0)
            assert service.database.url.endswith("accounts/data.db")
        finally:
            await service.stop()
    assert (tmp_path / "accounts" / "data.db").is_file()


async def test_a_service_that_declares_no_data_pattern_opens_no_database(tmp_path: Path) -> None:
    service = Service("email")
    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        ctx = RunContext(
            broker, registry, AsgiTransport({}), tmp_path, database_url="postgresql://nobody@127.0.0.1:1/x"
        )
        await service.start(ctx)  # the unreachable database is never opened
        try:
            _, report = await service.readiness_report()
            assert "database" not in report
        finally:
            await service.stop()
    assert not (tmp_path / "data.db").exists()


async def test_an_unreachable_database_fails_the_start_clearly(tmp_path: Path) -> None:
    service = Service("orders")
    _ = service.outbox
    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        ctx = RunContext(
            broker, registry, AsgiTransport({}), tmp_path, database_url="postgresql://nobody@127.0.0.1:1/x"
        )
        with pytest.raises(Exception, match="cannot reach the database") as info:
            await service.start(ctx)
    assert type(info.value).__name__ == "Unavailable"
    with pytest.raises(ConfigurationError, match="not running"):
        service.outbox.transaction()
