"""The spans of a saga: one span for the saga, a child per step and per compensation, the calls a step makes as
children of its span, error spans where things failed, and a recovered saga as a new trace linked to the first."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshkit.errors import SagaFailed
from meshkit.saga import Saga, SagaContext, Sagas, Step
from meshkit.testing import eventually
from meshkit.tracing.spans import provider, span
from tests.saga.helpers import Journal, backdate, crash, opened, three_steps

pytestmark = pytest.mark.anyio


@pytest.fixture
def traced() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    made = provider("orders", exporter=exporter, batch=False)
    yield made.get_tracer("test"), exporter
    made.shutdown()


def by_name(spans: Sequence[Any]) -> dict[str, Any]:
    named: dict[str, Any] = {}
    for s in spans:
        assert s.name not in named, f"two spans named {s.name!r}"
        named[s.name] = s
    return named


def parent_name(spans: Sequence[Any], child: Any) -> str | None:
    if child.parent is None:
        return None
    return str(next(s.name for s in spans if s.context.span_id == child.parent.span_id))


def is_error(s: Any) -> bool:
    return bool(s.status.status_code == trace.StatusCode.ERROR)


async def test_a_completed_saga_is_one_span_with_a_child_per_step(
    database_url: str, traced: tuple[Any, InMemorySpanExporter]
) -> None:
    tracer, exporter = traced

    async def charge(ctx: SagaContext) -> str:
        with span(tracer, "POST payments", kind="client"):  # a call the step makes
            return "paid"

    async def reserve(ctx: SagaContext) -> None:
        return None

    saga = Saga("checkout", [Step("charge", charge), Step("reserve", reserve)])
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders", tracer=tracer)
        await sagas.migrate()
        with span(tracer, "POST /orders", kind="server"):
            record = await sagas.run(saga, {}, saga_id="traced-1")
    spans = exporter.get_finished_spans()
    named = by_name(spans)
    assert set(named) == {
        "POST /orders",
        "saga checkout",
        "saga checkout step charge",
        "POST payments",
        "saga checkout step reserve",
    }
    assert len({s.context.trace_id for s in spans}) == 1
    assert parent_name(spans, named["saga checkout"]) == "POST /orders"
    assert parent_name(spans, named["saga checkout step charge"]) == "saga checkout"
    assert parent_name(spans, named["saga checkout step reserve"]) == "saga checkout"
    assert parent_name(spans, named["POST payments"]) == "saga checkout step charge"
    saga_span = named["saga checkout"]
    assert saga_span.kind == trace.SpanKind.INTERNAL
    assert dict(saga_span.attributes or {}) == {
        "meshkit.saga.name": "checkout",
        "meshkit.saga.id": "traced-1",
        "meshkit.saga.status": "completed",
    }
    assert (named["saga checkout step charge"].attributes or {})["meshkit.saga.step"] == "charge"
    assert not any(is_error(s) for s in spans)
    assert record.status == "completed"


async def test_a_failing_step_is_an_error_span_and_compensations_are_spans_too(
    database_url: str, traced: tuple[Any, InMemorySpanExporter]
) -> None:
    tracer, exporter = traced
    journal = Journal()
    journal.fail.add("schedule")
    async with opened(database_url) as database:
        sagas = Sagas(database, owner="orders", tracer=tracer)
        await sagas.migrate()
        with pytest.raises(SagaFailed):
            await sagas.run(three_steps(journal), {})
    spans = exporter.get_finished_spans()
    named = by_name(spans)
    assert [s.name for s in sorted(spans, key=lambda s: s.start_time or 0)] == [
        "saga checkout",
        "saga checkout step charge",
        "saga checkout step reserve",
        "saga checkout step schedule",
        "saga checkout compensate reserve",
        "saga checkout compensate charge",
    ]
    assert all(parent_name(spans, s) == "saga checkout" for s in spans if s.name != "saga checkout")
    assert {s.name for s in spans if is_error(s)} == {"saga checkout", "saga checkout step schedule"}
    assert (named["saga checkout"].attributes or {})["meshkit.saga.status"] == "compensated"
    assert (named["saga checkout compensate reserve"].attributes or {})["meshkit.saga.step"] == "reserve"


async def test_a_recovered_saga_is_a_new_trace_linked_to_the_first(
    database_url: str, traced: tuple[Any, InMemorySpanExporter]
) -> None:
    tracer, exporter = traced
    journal = Journal()
    checkout = three_steps(journal)
    async with opened(database_url) as database:
        first = Sagas(database, owner="orders", tracer=tracer)
        await first.migrate()
        await crash(first, checkout, journal, "reserve", "traced-2")
        await backdate(database, "traced-2")
        first_run = next(s for s in exporter.get_finished_spans() if s.name == "saga checkout")
        exporter.clear()

        second = Sagas(database, owner="orders", tracer=tracer)
        second.register(checkout)
        with span(tracer, "service startup"):  # recovery must not hang its sagas under whatever started it
            await second.start()

        async def completed() -> bool:
            record = await second.get("traced-2")
            return record is not None and record.status == "completed"

        try:
            await eventually(completed, "the recovered saga to complete")
        finally:
            await second.aclose()
    spans = [s for s in exporter.get_finished_spans() if s.name != "service startup"]
    named = by_name(spans)
    assert set(named) == {"saga checkout", "saga checkout step reserve", "saga checkout step schedule"}
    recovered = named["saga checkout"]
    assert recovered.parent is None
    assert recovered.context.trace_id != first_run.context.trace_id
    assert [link.context.span_id for link in recovered.links] == [first_run.context.span_id]
    assert (recovered.attributes or {})["meshkit.saga.recovered"] is True
    assert (recovered.attributes or {})["meshkit.saga.status"] == "completed"
    assert parent_name(spans, named["saga checkout step reserve"]) == "saga checkout"
