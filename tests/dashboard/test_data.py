"""The dashboard's Sagas page API (``/api/sagas``, ``/api/sagas/{id}``, ``/api/projections``) over real SQLite and
PostgreSQL databases, written by a real saga orchestrator and a real projector (the dashboard only reads)."""

from __future__ import annotations

import pytest

from meshkit import Database, Transaction
from meshkit.dashboard import DashboardApp, DataSource
from meshkit.errors import SagaFailed
from meshkit.eventsourcing import EventStore, NewEvent, RecordedEvent
from meshkit.projections import Projection, Projector
from meshkit.saga import Saga, SagaContext, Sagas, Step
from meshkit.testing import eventually
from meshkit.tracing.collector import TraceStore

from .asgi import call, get_json

pytestmark = pytest.mark.anyio


async def test_an_empty_database_shows_empty_lists(store: TraceStore, database: Database) -> None:
    app = DashboardApp(store, data=DataSource(database))
    assert await get_json(app, "/api/sagas") == {"available": True, "sagas": []}
    assert await get_json(app, "/api/projections") == {"available": True, "projections": []}
    assert (await get_json(app, "/api/info"))["features"]["data"] is True
    reply = await call(app, "GET", "/api/sagas/nope")
    assert reply.status == 404 and reply.json()["error"] == "not_found"


async def test_without_a_database_the_page_says_so(store: TraceStore) -> None:
    app = DashboardApp(store)
    assert await get_json(app, "/api/sagas") == {"available": False, "sagas": []}
    assert await get_json(app, "/api/projections") == {"available": False, "projections": []}


async def test_sagas_with_their_steps_and_compensations(store: TraceStore, database: Database) -> None:
    undone: list[str] = []

    async def charge(ctx: SagaContext) -> dict[str, str]:
        return {"id": f"ch-{ctx.saga_id}"}

    async def refund(ctx: SagaContext) -> None:
        undone.append(ctx.results["charge"]["id"])

    async def reserve(ctx: SagaContext) -> None:
        if ctx.data["quantity"] > 3:
            raise ValueError("out of stock")

    checkout = Saga("checkout", [Step("charge", charge, compensate=refund), Step("reserve", reserve)])
    async with Sagas(database, owner="orders") as sagas:
        sagas.register(checkout)
        await sagas.run(checkout, {"quantity": 1}, saga_id="good")
        with pytest.raises(SagaFailed):
            await sagas.run(checkout, {"quantity": 5}, saga_id="bad")
    assert undone == ["ch-bad"]

    app = DashboardApp(store, data=DataSource(database))
    listed = await get_json(app, "/api/sagas")
    assert [(g["id"], g["status"], g["failed_step"], g["owner"]) for g in listed["sagas"]] == [
        ("bad", "compensated", "reserve", "orders"),
        ("good", "completed", None, "orders"),
    ]
    assert "steps" not in listed["sagas"][0]  # the list is light; the detail has the step log
    only = await get_json(app, "/api/sagas", status="completed")
    assert [g["id"] for g in only["sagas"]] == ["good"]
    detail = await get_json(app, "/api/sagas/bad")
    assert [(st["step"], st["phase"], st["status"]) for st in detail["steps"]] == [
        ("charge", "action", "done"),
        ("reserve", "action", "failed"),
        ("charge", "compensation", "done"),
    ]
    assert detail["results"] == {"charge": {"id": "ch-bad"}} and detail["data"] == {"quantity": 5}
    bad = await call(app, "GET", "/api/sagas", params={"status": "bogus"})
    assert bad.status == 400 and "unknown saga status" in bad.json()["message"]


async def test_projections_with_their_lag_and_errors(store: TraceStore, database: Database) -> None:
    events = EventStore(database)
    await events.migrate()

    async def fussy(tx: Transaction, event: RecordedEvent) -> None:
        if event.data["amount"] == 13:
            raise ValueError("unlucky")

    await events.append(
        "account-1", [NewEvent("MoneyDeposited", {"amount": a}) for a in (5, 13, 7)], expected_version=0
    )
    projector = Projector(events, database, poll_interval=0.05, max_backoff=0.1)
    projector.add(Projection("fussy", fussy))
    app = DashboardApp(store, data=DataSource(database))
    async with projector:

        async def stopped() -> bool:
            rows = (await get_json(app, "/api/projections"))["projections"]
            return [(p["name"], p["position"], p["head"], p["lag"]) for p in rows] == [("fussy", 1, 3, 2)] and bool(
                rows[0]["error"]
            )

        await eventually(stopped, "the stopped projection on the page")
    (row,) = (await get_json(app, "/api/projections"))["projections"]
    assert "ValueError: unlucky" in row["error"]
