from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from meshkit.messaging import Message, SubscriptionOptions, connect
from meshkit.messaging.testing import eventually
from meshkit.tracing import current_headers, extracted, propagation

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FAST = SubscriptionOptions(poll_interval=0.05)


@pytest.fixture(params=["opentelemetry", "no opentelemetry"])
def otel_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "no opentelemetry":
        monkeypatch.setattr(propagation, "_otel", lambda: None)
    return str(request.param)


@pytest.mark.anyio
async def test_context_flows_from_publisher_through_handlers_to_their_messages(otel_mode: str) -> None:
    seen: dict[str, str | None] = {}
    async with connect("memory://") as broker:

        async def create_order(message: Message) -> None:
            seen["order.created"] = message.traceparent
            await broker.publish("payment.charge", {"order": message.data["order"]})

        async def charge(message: Message) -> None:
            seen["payment.charge"] = message.traceparent
            seen["inside handler"] = current_headers().get("traceparent")

        await broker.subscribe("order.created", create_order, group="payments", options=FAST)
        await broker.subscribe("payment.charge", charge, group="payments", options=FAST)
        with extracted({"traceparent": PARENT}):
            await broker.publish("order.created", {"order": 1})
        await eventually(lambda: len(seen) == 3, "both hops")

    trace_id = PARENT.split("-")[1]
    for hop in ("order.created", "payment.charge", "inside handler"):
        value = seen[hop]
        assert value is not None and value.split("-")[1] == trace_id, f"{hop} lost the trace ({otel_mode})"


@pytest.mark.anyio
async def test_an_opentelemetry_span_at_publish_is_the_parent_in_the_handler() -> None:
    tracer = TracerProvider().get_tracer("test")
    handler_trace: list[int] = []
    async with connect("memory://") as broker:

        async def handle(message: Message) -> None:
            handler_trace.append(trace.get_current_span().get_span_context().trace_id)

        await broker.subscribe("t", handle, group="g", options=FAST)
        with tracer.start_as_current_span("checkout") as span:
            await broker.publish("t", {"x": 1})
        await eventually(lambda: bool(handler_trace), "the handler")
    assert handler_trace == [span.get_span_context().trace_id]


@pytest.mark.anyio
async def test_no_context_means_no_trace_headers(otel_mode: str) -> None:
    got: list[Message] = []
    async with connect("memory://") as broker:

        async def handle(message: Message) -> None:
            got.append(message)

        await broker.subscribe("t", handle, group="g", options=FAST)
        await broker.publish("t", 1)
        await eventually(lambda: bool(got), "the message")
    assert got[0].traceparent is None
    assert "tracestate" not in got[0].headers


def test_explicit_headers_win_and_nothing_leaks_out_of_the_block() -> None:
    headers = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    with extracted({"traceparent": PARENT}):
        propagation.inject(headers)
        assert current_headers()["traceparent"].split("-")[1] == PARENT.split("-")[1]
    assert headers["traceparent"].startswith("00-111")
    assert "traceparent" not in current_headers()
