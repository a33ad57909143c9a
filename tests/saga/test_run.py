"""Running sagas against a real SQLite file and a real PostgreSQL: results flow from step to step, a failure is
compensated in reverse order, compensations are retried with backoff, and everything is written down."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from meshkit._core.clock import FakeClock
from meshkit.errors import ConfigurationError, ConflictError, SagaFailed
from meshkit.resilience import Constant, Exponential
from meshkit.saga import Saga, SagaContext, SagaRecord, Sagas, Step
from tests.saga.helpers import Journal, opened, three_steps

pytestmark = pytest.mark.anyio


def log_of(record: SagaRecord) -> list[tuple[str, str, str]]:
    return [(entry.step, entry.phase, entry.status) for entry in record.steps]


async def test_the_happy_path_passes_results_on_and_records_every_step(database_url: str) -> None:
    seen: dict[str, Any] = {}

    async def charge(ctx: SagaContext) -> dict[str, Any]:
        seen["charge"] = (ctx.saga_id, ctx.name, dict(ctx.data), dict(ctx.results))
        return {"payment": f"pay-{ctx.data['order']}", "amount": ctx.data["amount"]}

    async def reserve(ctx: SagaContext) -> str:
        seen["reserve"] = dict(ctx.results)
        return f"hold-for-{ctx.results['charge']['payment']}"

    async def schedule(ctx: SagaContext) -> None:
        seen["schedule"] = dict(ctx.results)

    async def undo(ctx: SagaContext) -> None:
        raise AssertionError("nothing failed: nothing to undo")

    checkout = Saga(
        "checkout", [Step("charge", charge, compensate=undo), Step("reserve", reserve), Step("schedule", schedule)]
    )
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders")
        await sagas.migrate()
        record = await sagas.run(checkout, {"order": "o-1", "amount": 42}, saga_id="saga-1")

        assert seen["charge"] == ("saga-1", "checkout", {"order": "o-1", "amount": 42}, {})
        assert seen["reserve"] == {"charge": {"payment": "pay-o-1", "amount": 42}}
        assert seen["schedule"]["reserve"] == "hold-for-pay-o-1"
        assert record.id == "saga-1"
        assert (record.name, record.owner, record.status) == ("checkout", "orders", "completed")
        assert record.data == {"order": "o-1", "amount": 42}
        assert record.results == {
            "charge": {"payment": "pay-o-1", "amount": 42},
            "reserve": "hold-for-pay-o-1",
            "schedule": None,
        }
        assert (record.error, record.failed_step) == (None, None)
        assert log_of(record) == [
            ("charge", "action", "done"),
            ("reserve", "action", "done"),
            ("schedule", "action", "done"),
        ]
        assert all(e.started <= e.ended for e in record.steps if e.ended is not None)
        assert all(e.ended is not None and e.error is None and e.attempt == 1 for e in record.steps)
        assert record.created <= record.steps[0].started <= record.updated
        assert record.finished
        assert await sagas.get("saga-1") == record
        assert json.loads(json.dumps(record.to_dict()))["steps"][1]["step"] == "reserve"


@pytest.mark.parametrize("failing", [0, 1, 2, 3])
async def test_a_failure_undoes_the_completed_steps_in_reverse_order(database_url: str, failing: int) -> None:
    journal = Journal()
    names = ["a", "b", "c", "d"]
    # b has no compensation: it is skipped when undoing
    saga = Saga("four", [journal.step(name, compensate=name != "b") for name in names])
    journal.fail.add(names[failing])
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders")
        await sagas.start()
        try:
            with pytest.raises(SagaFailed) as raised:
                await sagas.run(saga, {"order": "o-2"}, saga_id=f"s-{failing}")
        finally:
            await sagas.aclose()
        done = names[:failing]
        undone = [f"undo {name}" for name in reversed(done) if name != "b"]
        assert journal.calls == [*done, names[failing], *undone]
        error = raised.value
        assert (error.saga, error.saga_id, error.step, error.status) == (
            "four",
            f"s-{failing}",
            names[failing],
            "compensated",
        )
        assert isinstance(error.__cause__, RuntimeError)
        assert f"{names[failing]} broke" in error.reason
        record = await sagas.get(f"s-{failing}")
        assert record is not None
        assert (record.status, record.failed_step) == ("compensated", names[failing])
        assert record.error is not None and f"{names[failing]} broke" in record.error
        assert log_of(record) == [
            *[(name, "action", "done") for name in done],
            (names[failing], "action", "failed"),
            *[(name, "compensation", "done") for name in reversed(done) if name != "b"],
        ]
        assert sorted(record.results) == sorted(done)


async def test_failure_at_the_third_step_of_checkout(database_url: str) -> None:
    journal = Journal()
    journal.fail.add("schedule")
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders")
        await sagas.migrate()
        with pytest.raises(SagaFailed, match="'schedule'") as raised:
            await sagas.run(three_steps(journal), {"order": "o-3"})
        assert journal.calls == ["charge", "reserve", "schedule", "undo reserve", "undo charge"]
        assert (raised.value.step, raised.value.status) == ("schedule", "compensated")
        record = await sagas.get(raised.value.saga_id)
        assert record is not None and record.status == "compensated"
        assert [(e.step, e.phase) for e in record.steps][-2:] == [
            ("reserve", "compensation"),
            ("charge", "compensation"),
        ]


async def test_a_compensation_that_fails_once_is_retried_with_backoff(database_url: str) -> None:
    journal = Journal()
    journal.fail.add("schedule")
    journal.fail_times["undo reserve"] = 1
    clock = FakeClock(auto_advance=True)
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders", clock=clock, backoff=Exponential(0.5, jitter="full"))
        await sagas.migrate()
        with pytest.raises(SagaFailed) as raised:
            await sagas.run(three_steps(journal), {})
        assert raised.value.status == "compensated"
        assert journal.calls == ["charge", "reserve", "schedule", "undo reserve", "undo reserve", "undo charge"]
        assert len(clock.sleeps) == 1 and 0.0 <= clock.sleeps[0] <= 0.5  # one wait, jittered below the base
        record = await sagas.get(raised.value.saga_id)
        assert record is not None and record.status == "compensated"
        compensations = [(e.step, e.attempt, e.status) for e in record.steps if e.phase == "compensation"]
        assert compensations == [("reserve", 1, "failed"), ("reserve", 2, "done"), ("charge", 1, "done")]
        assert "undo reserve broke (transient)" in (record.steps[3].error or "")


async def test_a_compensation_that_keeps_failing_ends_the_saga_failed(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal()
    journal.fail |= {"schedule", "undo reserve"}
    clock = FakeClock(auto_advance=True)
    async with opened(database_url) as database:
        sagas = Sagas(
            database, owner="orders", clock=clock, compensation_attempts=3, backoff=Exponential(0.1, jitter="none")
        )
        await sagas.migrate()
        with caplog.at_level(logging.WARNING, logger="meshkit.saga"), pytest.raises(SagaFailed) as raised:
            await sagas.run(three_steps(journal), {}, saga_id="stuck")
        assert (raised.value.status, raised.value.step) == ("failed", "schedule")
        assert isinstance(raised.value.__cause__, RuntimeError) and "schedule broke" in str(raised.value.__cause__)
        # tried 3 times, waiting 0.1 then 0.2 between; the earlier step is left for a person to look at
        assert journal.calls == ["charge", "reserve", "schedule", "undo reserve", "undo reserve", "undo reserve"]
        assert clock.sleeps == [0.1, 0.2]
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and getattr(errors[0], "saga_id", None) == "stuck"
        record = await sagas.get("stuck")
        assert record is not None
        assert (record.status, record.failed_step) == ("failed", "schedule")
        assert record.error is not None and "compensation of step 'reserve' failed" in record.error
        assert [e.status for e in record.steps if e.phase == "compensation"] == ["failed"] * 3


async def test_a_step_with_retry_is_tried_again_before_compensating(database_url: str) -> None:
    journal = Journal()
    journal.fail_times["flaky"] = 2
    saga = Saga("retrying", [journal.step("first"), journal.step("flaky", retry=2)])
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders", backoff=Constant(0.0))
        await sagas.migrate()
        record = await sagas.run(saga, {})
        assert journal.calls == ["first", "flaky", "flaky", "flaky"]
        assert record.status == "completed"
        assert [(e.step, e.attempt, e.status) for e in record.steps] == [
            ("first", 1, "done"),
            ("flaky", 1, "failed"),
            ("flaky", 2, "failed"),
            ("flaky", 3, "done"),
        ]
        journal.calls.clear()
        journal.fail_times["flaky"] = 3  # one more failure than retries: compensated
        with pytest.raises(SagaFailed):
            await sagas.run(saga, {})
        assert journal.calls == ["first", "flaky", "flaky", "flaky", "undo first"]


async def test_a_saga_id_used_twice_is_a_conflict(database_url: str) -> None:
    journal = Journal()
    saga = three_steps(journal)
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders")
        await sagas.migrate()
        with pytest.raises(ConfigurationError, match="no saga named 'checkout' is registered"):
            await sagas.run("checkout", {})
        first = await sagas.run(saga, {"order": "o-4"}, saga_id="once")
        with pytest.raises(ConflictError):
            await sagas.run("checkout", {"order": "other"}, saga_id="once")  # (a registered saga, by name)
        assert journal.calls == ["charge", "reserve", "schedule"]
        assert await sagas.get("once") == first


async def test_data_and_results_must_be_json(database_url: str) -> None:
    calls: list[str] = []

    async def first(ctx: SagaContext) -> int:
        calls.append("first")
        return 1

    async def undo_first(ctx: SagaContext) -> None:
        calls.append("undo first")

    async def odd(ctx: SagaContext) -> object:
        calls.append("odd")  # its work is done; only its result cannot be kept
        return object()

    async def undo_odd(ctx: SagaContext) -> None:
        calls.append("undo odd")

    saga = Saga("odd", [Step("first", first, compensate=undo_first), Step("odd", odd, compensate=undo_odd, retry=2)])
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders")
        await sagas.migrate()
        with pytest.raises(ConfigurationError, match="not JSON-able"):
            await sagas.run(saga, {"when": object()})
        assert calls == [] and await sagas.list() == []
        with pytest.raises(SagaFailed, match="result of step 'odd' is not JSON-able") as raised:
            await sagas.run(saga, {})
        assert raised.value.status == "compensated"
        # the step that did its work is undone too (first), then the ones before it; it is not tried again
        # (retry=2): that would do its work twice
        assert calls == ["first", "odd", "undo odd", "undo first"]


async def test_compensate_failed_undoes_a_step_whose_outcome_is_unknown(database_url: str) -> None:
    calls: list[str] = []

    async def charge(ctx: SagaContext) -> dict[str, str]:
        calls.append("charge")
        return {"id": "c1"}

    async def refund(ctx: SagaContext) -> None:
        calls.append(f"refund {ctx.results['charge']['id']}")

    async def reserve(ctx: SagaContext) -> None:
        calls.append("reserve")
        raise TimeoutError("no answer (the reservation may have been made)")

    async def release(ctx: SagaContext) -> None:
        assert "reserve" not in ctx.results  # it failed: no result to go by
        calls.append(f"release {ctx.saga_id}")

    saga = Saga(
        "checkout",
        [
            Step("charge", charge, compensate=refund),
            Step("reserve", reserve, compensate=release, compensate_failed=True),
        ],
    )
    async with opened(database_url) as database:
        async with Sagas(database, owner="orders") as sagas:
            with pytest.raises(SagaFailed) as raised:
                await sagas.run(saga, {}, saga_id="s1")
            record = await sagas.get("s1")
        assert raised.value.status == "compensated" and raised.value.step == "reserve"
        assert calls == ["charge", "reserve", "release s1", "refund c1"]
        assert record is not None
        assert log_of(record) == [
            ("charge", "action", "done"),
            ("reserve", "action", "failed"),
            ("reserve", "compensation", "done"),
            ("charge", "compensation", "done"),
        ]
    with pytest.raises(ConfigurationError, match="compensate_failed=True but no compensation"):
        Step("reserve", reserve, compensate_failed=True)


async def test_list_and_get_filter_and_order_newest_first(database_url: str) -> None:
    journal = Journal()
    a, b = three_steps(journal, "a"), three_steps(journal, "b")
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders")
        await sagas.migrate()
        await sagas.run(a, {}, saga_id="a1")
        journal.fail.add("schedule")
        with pytest.raises(SagaFailed):
            await sagas.run(a, {}, saga_id="a2")
        journal.fail.clear()
        await sagas.run(b, {}, saga_id="b1")

        # an instance that was only migrated (the dashboard's) reads every owner's sagas
        reader = Sagas(database, owner="dashboard")
        await reader.migrate()
        assert [r.id for r in await reader.list()] == ["b1", "a2", "a1"]
        assert [r.id for r in await reader.list(name="a")] == ["a2", "a1"]
        assert [r.id for r in await reader.list(status="completed")] == ["b1", "a1"]
        assert [r.id for r in await reader.list(name="a", status="compensated")] == ["a2"]
        assert [r.id for r in await reader.list(limit=1)] == ["b1"]
        assert await reader.list(name="nope") == []
        listed = {r.id: r for r in await reader.list()}
        assert listed["a2"] == await reader.get("a2")
        assert len(listed["a2"].steps) == 5
        assert await reader.get("missing") is None
        with pytest.raises(ConfigurationError):
            await reader.list(limit=0)
