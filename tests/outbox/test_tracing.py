"""The relay's span: ``outbox relay <topic>``, a child of the span that was current at ``tx.publish``, and the
parent of what the consumer's handler does."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshkit import messaging
from meshkit.messaging import Message
from meshkit.outbox import Outbox
from meshkit.testing import eventually
from meshkit.tracing.spans import provider, span
from tests.outbox.support import opened

pytestmark = pytest.mark.anyio


async def test_the_trace_goes_from_the_request_through_the_relay_to_the_consumer(database_url: str) -> None:
    exporter = InMemorySpanExporter()
    tracers = provider("orders", exporter=exporter, batch=False)
    tracer = tracers.get_tracer("meshkit")
    handled: list[Message] = []

    async def send_email(message: Message) -> None:
        with span(tracer, "send email", kind="consumer"):
            handled.append(message)

    async with (
        opened(database_url) as db,
        messaging.connect("memory://") as broker,
        Outbox(db, broker, source="orders", tracer=tracer) as outbox,
    ):
        await broker.subscribe("order.created", send_email, group="email")
        with span(tracer, "POST /orders", kind="server"):
            async with outbox.transaction() as tx:
                message_id = tx.publish("order.created", {"id": "o-1"}, key="o-1")
        # the relay runs later, in its own task, outside the request's span
        await eventually(lambda: len(handled) == 1, "the consumer ran")
        await outbox.flush()
    tracers.force_flush()
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    assert set(by_name) == {"POST /orders", "outbox relay order.created", "send email"}, sorted(by_name)
    request, relay, consumer = by_name["POST /orders"], by_name["outbox relay order.created"], by_name["send email"]
    assert len({s.context.trace_id for s in (request, relay, consumer)}) == 1, "one trace"
    assert relay.parent is not None and relay.parent.span_id == request.context.span_id
    assert consumer.parent is not None and consumer.parent.span_id == relay.context.span_id
    assert relay.kind.name == "PRODUCER"
    attributes: dict[str, Any] = dict(relay.attributes or {})
    assert attributes == {
        "messaging.system": "meshkit",
        "messaging.destination.name": "order.created",
        "messaging.operation.type": "send",
        "messaging.message.id": message_id,
        "meshkit.outbox.source": "orders",
    }
    assert handled[0].traceparent is not None and f"{relay.context.span_id:016x}" in handled[0].traceparent
    tracers.shutdown()


async def test_without_a_tracer_the_message_still_carries_the_publishers_trace(database_url: str) -> None:
    exporter = InMemorySpanExporter()
    tracers = provider("orders", exporter=exporter, batch=False)
    tracer = tracers.get_tracer("meshkit")
    handled: list[Message] = []

    async def collect(message: Message) -> None:
        handled.append(message)

    async with (
        opened(database_url) as db,
        messaging.connect("memory://") as broker,
        Outbox(db, broker, source="orders") as outbox,
    ):
        await broker.subscribe("order.created", collect, group="email")
        with span(tracer, "POST /orders", kind="server") as request:
            async with outbox.transaction() as tx:
                tx.publish("order.created", {"id": "o-1"})
        async with outbox.transaction() as tx:  # outside any trace: none is carried
            tx.publish("order.created", {"id": "o-2"})
        await eventually(lambda: len(handled) == 2, "the consumer ran")
    context = request.get_span_context()
    carried = {m.data["id"]: m.traceparent for m in handled}
    assert carried["o-1"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
    assert carried["o-2"] is None
    tracers.shutdown()
