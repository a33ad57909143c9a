"""Recovery: a saga a crash left unfinished is continued by another instance of the same owner (exactly one), the
step in flight runs again, a compensating saga goes on compensating, and nobody takes what is not theirs."""

from __future__ import annotations

import asyncio
import logging

import pytest

from meshkit.errors import ConflictError
from meshkit.saga import Saga, SagaContext, Sagas, Step
from meshkit.testing import eventually
from tests.saga.helpers import Journal, backdate, crash, opened, three_steps

pytestmark = pytest.mark.anyio


async def status_of(sagas: Sagas, saga_id: str) -> str | None:
    record = await sagas.get(saga_id)
    return None if record is None else record.status


async def has_status(sagas: Sagas, saga_id: str, status: str) -> bool:
    return await status_of(sagas, saga_id) == status


async def test_a_new_instance_completes_a_saga_whose_process_crashed(database_url: str) -> None:
    journal = Journal()
    checkout = three_steps(journal)
    async with opened(database_url) as database:
        first = Sagas(database, owner="orders")
        await first.migrate()
        await crash(first, checkout, journal, "reserve", "s1", order="o-1")
        assert await status_of(first, "s1") == "running"

        # the brief's scenario: a new instance, same owner, a tiny stale_after, started
        second = Sagas(database, owner="orders", stale_after=0.05, recover_interval=0.02)
        second.register(checkout)
        await second.start()
        try:
            await eventually(lambda: has_status(second, "s1", "completed"), "the saga to complete")
        finally:
            await second.aclose()
        assert journal.calls == ["charge", "reserve", "reserve", "schedule"]  # reserve was in flight: it ran again
        record = await second.get("s1")
        assert record is not None
        assert record.owner == "orders"
        assert record.results["schedule"]["order"] == "o-1"  # the input came back from the database
        assert record.results["schedule"]["saw"] == ["charge", "reserve"]
        assert [(e.step, e.status) for e in record.steps] == [
            ("charge", "done"),
            ("reserve", "failed"),  # the interrupted attempt
            ("reserve", "done"),
            ("schedule", "done"),
        ]
        assert record.steps[1].error is not None and "interrupted" in record.steps[1].error


async def test_a_compensating_saga_goes_on_compensating(database_url: str) -> None:
    journal = Journal()
    journal.fail.add("schedule")
    checkout = three_steps(journal)
    async with opened(database_url) as database:
        first = Sagas(database, owner="orders")
        await first.migrate()
        await crash(first, checkout, journal, "undo reserve", "s2")
        assert await status_of(first, "s2") == "compensating"
        await backdate(database, "s2")

        second = Sagas(database, owner="orders")
        second.register(checkout)
        async with second:
            await eventually(lambda: has_status(second, "s2", "compensated"), "the saga to be compensated")
        assert journal.calls == ["charge", "reserve", "schedule", "undo reserve", "undo reserve", "undo charge"]
        record = await second.get("s2")
        assert record is not None
        assert record.failed_step == "schedule" and "schedule broke" in (record.error or "")


async def test_two_recovering_instances_never_both_run_a_saga(database_url: str) -> None:
    journal = Journal()
    checkout = three_steps(journal)
    ids = [f"s{n}" for n in range(6)]
    async with opened(database_url) as database, opened(database_url) as other_connection:
        first = Sagas(database, owner="orders")
        await first.migrate()
        for saga_id in ids:
            await crash(first, checkout, journal, "reserve", saga_id)
            await backdate(database, saga_id)
        assert journal.count("reserve") == len(ids)

        recovering = [Sagas(database, owner="orders"), Sagas(other_connection, owner="orders")]
        for sagas in recovering:
            sagas.register(checkout)
        taken = await asyncio.gather(*(sagas.recover() for sagas in recovering))
        try:
            assert sum(taken) == len(ids)

            async def all_completed() -> bool:
                return all([await status_of(first, saga_id) == "completed" for saga_id in ids])

            await eventually(all_completed, "every saga to complete")
        finally:
            for sagas in recovering:
                await sagas.aclose()
        assert journal.count("reserve") == 2 * len(ids)  # each ran once before the crash and once after
        assert journal.count("schedule") == len(ids)


async def test_other_owners_sagas_are_not_taken(database_url: str) -> None:
    journal = Journal()
    checkout = three_steps(journal)
    async with opened(database_url) as database:
        orders = Sagas(database, owner="orders")
        await orders.migrate()
        await crash(orders, checkout, journal, "reserve", "mine")
        await backdate(database, "mine")

        billing = Sagas(database, owner="billing")
        billing.register(checkout)
        assert await billing.recover() == 0
        assert await status_of(billing, "mine") == "running"

        again = Sagas(database, owner="orders")
        again.register(checkout)
        assert await again.recover() == 1
        await eventually(lambda: has_status(again, "mine", "completed"), "the owner to complete it")
        await again.aclose()


async def test_a_saga_updated_recently_is_not_taken(database_url: str) -> None:
    journal = Journal()
    checkout = three_steps(journal)
    async with opened(database_url) as database:
        first = Sagas(database, owner="orders")
        await first.migrate()
        await crash(first, checkout, journal, "reserve", "fresh")
        patient = Sagas(database, owner="orders", stale_after=3600.0)
        patient.register(checkout)
        assert await patient.recover() == 0
        await backdate(database, "fresh", 7200.0)
        assert await patient.recover() == 1
        await eventually(lambda: has_status(patient, "fresh", "completed"), "the saga to complete")
        await patient.aclose()


async def test_unknown_saga_names_are_logged_once_and_left(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal()
    async with opened(database_url) as database:
        first = Sagas(database, owner="orders")
        await first.migrate()
        await crash(first, three_steps(journal, "legacy"), journal, "reserve", "old")
        await backdate(database, "old")
        second = Sagas(database, owner="orders")
        second.register(three_steps(journal, "checkout"))
        with caplog.at_level(logging.WARNING, logger="meshkit.saga"):
            assert await second.recover() == 0
            assert await second.recover() == 0
        warnings = [r for r in caplog.records if "no saga of that name is registered" in r.getMessage()]
        assert len(warnings) == 1 and getattr(warnings[0], "saga_id", None) == "old"
        assert await status_of(second, "old") == "running"


async def test_sagas_nobody_knows_do_not_keep_the_known_ones_from_recovery(database_url: str) -> None:
    journal = Journal()
    async with opened(database_url) as database:
        first = Sagas(database, owner="orders")
        await first.migrate()
        legacy = three_steps(journal, "legacy")
        for n in range(3):  # older than the known one: they come first in the stale order
            await crash(first, legacy, journal, "reserve", f"old-{n}")
            await backdate(database, f"old-{n}", 7200.0)
        checkout = three_steps(journal)
        await crash(first, checkout, journal, "reserve", "current")
        await backdate(database, "current")
        second = Sagas(database, owner="orders")
        second.register(checkout)
        assert await second.recover(limit=2) == 1
        await eventually(lambda: has_status(second, "current", "completed"), "the known saga recovered")
        await second.aclose()


async def test_a_started_instance_keeps_looking_for_abandoned_sagas(database_url: str) -> None:
    journal = Journal()
    checkout = three_steps(journal)
    async with opened(database_url) as database:
        watcher = Sagas(database, owner="orders", recover_interval=0.02)
        watcher.register(checkout)
        async with watcher:  # started before the crash: its first look found nothing
            crashed = Sagas(database, owner="orders")
            await crash(crashed, checkout, journal, "schedule", "late")
            await backdate(database, "late")
            await eventually(lambda: has_status(watcher, "late", "completed"), "the watcher to complete it")
        assert journal.calls == ["charge", "reserve", "schedule", "schedule"]


async def test_a_slow_step_keeps_its_saga_from_being_taken(database_url: str) -> None:
    release = asyncio.Event()
    runs: list[str] = []

    async def slow(ctx: SagaContext) -> None:
        runs.append(ctx.saga_id)
        await release.wait()

    saga = Saga("slow", [Step("slow", slow)])
    async with opened(database_url) as database:
        running = Sagas(database, owner="orders", stale_after=0.6)
        await running.migrate()
        thief = Sagas(database, owner="orders", stale_after=0.6, recover_interval=0.01)
        thief.register(saga)
        await thief.start()
        try:
            task = asyncio.create_task(running.run(saga, {}, saga_id="slow-1"))
            seen: set[float] = set()

            async def refreshed_for_a_while() -> bool:
                record = await running.get("slow-1")
                if record is not None:
                    seen.add(record.updated)
                return len(seen) >= 8  # created, started, then 6 refreshes every 0.2 s: twice stale_after

            await eventually(refreshed_for_a_while, "the slow step's saga to be refreshed")
            release.set()
            record = await task
        finally:
            await thief.aclose()
        assert record.status == "completed"
        assert runs == ["slow-1"]


async def test_a_run_that_lost_its_saga_stops_with_a_conflict(database_url: str) -> None:
    release = asyncio.Event()
    calls: list[str] = []

    async def first(ctx: SagaContext) -> None:
        calls.append("first")
        await release.wait()

    async def second(ctx: SagaContext) -> None:
        calls.append("second")

    saga = Saga("lost", [Step("first", first), Step("second", second)])
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders")
        await sagas.migrate()
        task = asyncio.create_task(sagas.run(saga, {}, saga_id="lost-1"))
        await eventually(lambda: calls == ["first"], "the first step to start")
        # another process recovered it meanwhile (it took the lease)
        assert await database.execute("UPDATE meshkit_sagas SET lease = 'theirs' WHERE id = ?", "lost-1") == 1
        release.set()
        with pytest.raises(ConflictError, match="taken over"):
            await task
        assert calls == ["first"]
        record = await sagas.get("lost-1")
        assert record is not None and record.status == "running" and record.results == {}


async def test_aclose_stops_a_recovered_saga_and_leaves_it_recoverable(database_url: str) -> None:
    journal = Journal()
    checkout = three_steps(journal)
    async with opened(database_url) as database:
        first = Sagas(database, owner="orders")
        await first.migrate()
        await crash(first, checkout, journal, "reserve", "twice")
        await backdate(database, "twice")
        journal.hang.add("reserve")  # the recovering instance will be stopped in the middle too
        second = Sagas(database, owner="orders")
        second.register(checkout)
        await second.start()
        await eventually(lambda: journal.count("reserve") == 2, "the recovered step to start")
        await second.aclose()
        assert await status_of(second, "twice") == "running"
        await backdate(database, "twice")
        third = Sagas(database, owner="orders")
        third.register(checkout)
        async with third:
            await eventually(lambda: has_status(third, "twice", "completed"), "the third instance to complete it")
        assert journal.calls == ["charge", "reserve", "reserve", "reserve", "schedule"]
