"""Spans of a request through two services: server, client, server, producer, consumer; one trace, every parent
present, the consumer linked to its publish span, baggage carried to every hop; error traces kept whatever the
sampling ratio."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshkit import Service, discovery, messaging
from meshkit.client import AsgiTransport, ServiceClient
from meshkit.messaging import Message
from meshkit.runtime import RunContext
from meshkit.testing import eventually
from meshkit.tracing.spans import TraceLogFilter, provider, span


@pytest.mark.anyio
async def test_a_call_and_a_message_make_one_complete_trace(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    providers = {name: provider(name, exporter=exporter, batch=False) for name in ("orders", "payments", "email")}
    orders, payments, email = Service("orders"), Service("payments"), Service("email")
    to_payments = orders.client("payments")
    handled: list[str] = []
    tenants: dict[str, object] = {}

    @payments.http.post("/charges/{who}", status_code=201)
    async def charge(who: str) -> dict[str, str]:
        tenants["payments"] = baggage.get_baggage("tenant")
        return {"charged": who}

    @orders.http.post("/orders")
    async def create() -> dict[str, str]:
        await to_payments.post("/charges/ada")
        await orders.publish("order.created", {"id": "o1"})
        return {"id": "o1"}

    @email.subscribe("order.created")
    async def send_mail(message: Message) -> None:
        tenants["email"] = baggage.get_baggage("tenant")
        handled.append(message.data["id"])

    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        transport = AsgiTransport({"orders": orders.asgi, "payments": payments.asgi, "email": email.asgi})
        services = (orders, payments, email)
        for service in services:
            tracer = providers[service.name].get_tracer("meshkit")
            await service.start(RunContext(broker, registry, transport, tmp_path / service.name, tracer=tracer))
        await payments.register("127.0.0.1", 8001)
        async with ServiceClient("orders", registry, transport=transport) as caller:
            await orders.register("127.0.0.1", 8002)
            response = await caller.post("/orders", headers={"baggage": "tenant=acme,plan=pro"})
        assert response.status == 200
        await eventually(lambda: handled == ["o1"], "email handled order.created")
        # W3C baggage set by the first caller reaches the next service and the consumer of the message
        assert tenants == {"payments": "acme", "email": "acme"}
        for service in services:
            await service.stop()
        await transport.aclose()
    for p in providers.values():
        p.force_flush()
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {
        "POST /orders",
        "POST payments",
        "POST /charges/{who}",
        "order.created publish",
        "order.created process",
    }, sorted(by_name)
    assert len({s.context.trace_id for s in spans}) == 1, "one trace"
    ids = {s.context.span_id for s in spans}
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["POST /orders"]
    assert all(s.parent is None or s.parent.span_id in ids for s in spans), "every parent is in the trace"

    def parent_of(name: str) -> str:
        parent = by_name[name].parent
        assert parent is not None
        return next(s.name for s in spans if s.context.span_id == parent.span_id)

    assert parent_of("POST payments") == "POST /orders"
    assert parent_of("POST /charges/{who}") == "POST payments"
    assert parent_of("order.created publish") == "POST /orders"
    assert parent_of("order.created process") == "order.created publish"
    consumer = by_name["order.created process"]
    assert [link.context.span_id for link in consumer.links] == [by_name["order.created publish"].context.span_id]

    # semantic conventions
    def attrs(name: str) -> dict[str, Any]:
        return dict(by_name[name].attributes or {})

    assert attrs("POST /charges/{who}")["http.route"] == "/charges/{who}"
    assert attrs("POST /charges/{who}")["http.response.status_code"] == 201
    assert attrs("POST payments")["peer.service"] == "payments"
    assert attrs("order.created process")["messaging.consumer.group.name"] == "email"
    assert by_name["POST /charges/{who}"].kind == trace.SpanKind.SERVER
    assert by_name["order.created publish"].kind == trace.SpanKind.PRODUCER
    assert {s.resource.attributes["service.name"] for s in spans} == {"orders", "payments", "email"}
    for p in providers.values():
        p.shutdown()


def test_error_traces_are_kept_when_the_ratio_drops_the_rest() -> None:
    exporter = InMemorySpanExporter()
    tracing = provider("svc", exporter=exporter, batch=False, sample_ratio=0.0)
    tracer = tracing.get_tracer("test")
    with span(tracer, "fine"), span(tracer, "fine child"):
        pass
    assert exporter.get_finished_spans() == ()  # ratio 0: dropped
    with span(tracer, "parent"):
        with span(tracer, "sibling that ended well"):
            pass
        with pytest.raises(RuntimeError), span(tracer, "failing"):
            raise RuntimeError("boom")
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["failing", "parent", "sibling that ended well"]
    tracing.shutdown()


def test_log_records_carry_the_trace_and_span_ids() -> None:
    exporter = InMemorySpanExporter()
    tracing = provider("svc", exporter=exporter, batch=False)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(TraceLogFilter())
    log = logging.getLogger("test.trace.ids")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with span(tracing.get_tracer("t"), "work") as current:
            log.info("inside")
        log.info("outside")
    finally:
        log.removeHandler(handler)
        tracing.shutdown()
    inside: Any = records[0]
    outside: Any = records[1]
    assert inside.trace_id == f"{current.get_span_context().trace_id:032x}"
    assert inside.span_id == f"{current.get_span_context().span_id:016x}"
    assert (outside.trace_id, outside.span_id) == ("", "")
