"""The Service runtime in one process: memory broker and registry, calls through the in-process transport."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest

from meshkit import Service, discovery, messaging
from meshkit.client import AsgiTransport
from meshkit.errors import ConfigurationError
from meshkit.messaging import Message, SubscriptionOptions
from meshkit.resilience import Exponential, Retry
from meshkit.runtime import RunContext
from meshkit.testing import eventually
from meshkit.tracing import current_headers


def test_bad_declarations_are_refused_clearly() -> None:
    with pytest.raises(ConfigurationError, match="invalid service name"):
        Service("orders service")
    service = Service("orders")

    def not_async(message: Message) -> None:
        pass

    with pytest.raises(ConfigurationError, match="is not async") as info:
        service.subscribe("order.created")(not_async)  # type: ignore[type-var]
    assert info.value.hint is not None and "async def" in info.value.hint


@pytest.mark.anyio
async def test_a_client_called_before_the_service_runs_says_so() -> None:
    service = Service("orders")
    payments = service.client("payments")
    assert service.client("payments") is payments, "one client per downstream"
    with pytest.raises(ConfigurationError, match="is not running") as info:
        await payments.get("/x")
    assert info.value.hint is not None


async def _asgi_get(app: Any, path: str) -> tuple[int, dict[str, Any]]:
    """Call an ASGI app directly (what a server would do) and decode its JSON answer."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b"", "http_version": "1.1"}
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


@pytest.mark.anyio
async def test_lifecycle_registers_serves_handles_and_leaves_in_order(tmp_path: Path) -> None:
    events: list[str] = []
    payments = Service("payments", version="2.1.0", metadata={"zone": "a"})
    orders = Service("orders")
    to_payments = orders.client("payments")
    database_up = True

    @payments.http.post("/charges", status_code=201)
    async def charge(body: dict[str, int]) -> dict[str, int]:
        return {"charged": body["amount"]}

    @payments.readiness("database")
    async def database() -> None:
        if not database_up:
            raise ConnectionError("database unreachable")

    @payments.on_start
    async def started() -> None:
        events.append("payments started")

    @payments.on_stop
    async def stopped() -> None:
        events.append("payments stopped")

    @orders.subscribe("charge.made")
    async def on_charge(message: Message) -> None:
        events.append(f"orders saw {message.data['amount']}")

    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        transport = AsgiTransport({"payments": payments.asgi, "orders": orders.asgi})
        for service in (payments, orders):
            await service.start(RunContext(broker, registry, transport, data_dir=tmp_path / service.name))
        status, report = await _asgi_get(payments.asgi, "/readyz")
        assert status == 503 and report["checks"]["registered"] == "not registered"
        instance = await payments.register("127.0.0.1", 8001)
        await orders.register("127.0.0.1", 8002)
        assert instance.version == "2.1.0" and instance.metadata["zone"] == "a"
        assert [i.id for i in await registry.list("payments")] == [instance.id]
        assert (tmp_path / "payments").is_dir(), "each service gets its data folder"

        status, report = await _asgi_get(payments.asgi, "/readyz")
        assert status == 200 and report["ready"] is True, report
        database_up = False
        status, report = await _asgi_get(payments.asgi, "/readyz")
        assert status == 503 and "database unreachable" in report["checks"]["database"]
        assert (await _asgi_get(payments.asgi, "/healthz"))[0] == 200, "liveness does not depend on readiness"

        response = await to_payments.post("/charges", json={"amount": 7})
        assert response.status == 201 and response.json() == {"charged": 7}
        await payments.publish("charge.made", {"amount": 7})
        await eventually(lambda: "orders saw 7" in events, "orders' handler (group 'orders') got the message")

        await payments.deregister()
        assert await registry.list("payments") == [], "deregister leaves the registry at once"
        status, report = await _asgi_get(payments.asgi, "/readyz")
        assert status == 503, "a leaving instance is not ready"
        for service in (orders, payments):
            await service.stop()
        await transport.aclose()
    assert events == ["payments started", "orders saw 7", "payments stopped"]
    with pytest.raises(ConfigurationError, match="is not running"):
        await to_payments.get("/x")


def test_an_attached_asgi_app_that_is_not_fastapi_is_served_but_has_no_http_routes() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    service = Service("legacy", http=app)
    with pytest.raises(ConfigurationError, match="not FastAPI"):
        _ = service.http


@pytest.mark.anyio
async def test_a_request_runs_in_the_trace_context_its_traceparent_carries() -> None:
    service = Service("traced")
    seen: list[dict[str, str]] = []

    @service.http.get("/where")
    async def where() -> dict[str, str]:
        seen.append(current_headers())
        return {}

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    for headers in ([(b"traceparent", parent.encode())], []):
        scope = {"type": "http", "method": "GET", "path": "/where", "headers": headers, "query_string": b""}
        scope["http_version"] = "1.1"
        await service.asgi(scope, receive, send)
    assert sent[0]["status"] == 200
    assert "0af7651916cd43dd8448eb211c80319c" in seen[0].get("traceparent", "")
    assert "0af7651916cd43dd8448eb211c80319c" not in seen[1].get("traceparent", "")


@pytest.mark.anyio
async def test_a_service_serves_prometheus_metrics_of_requests_messages_breakers_and_dead_letters(
    tmp_path: Path,
) -> None:
    service = Service("stock")
    restocked: list[str] = []
    service.client("pricing")  # a downstream: its breaker state is a gauge
    audits = asyncio.Event()

    @service.subscribe("audit")
    async def audit(message: Message) -> None:
        await audits.wait()  # holds its messages: they show as lag

    @service.http.get("/stock/{sku}")
    async def stock(sku: str) -> dict[str, int]:
        return {"quantity": 1}

    @service.subscribe("restock", options=SubscriptionOptions(retry=Retry(attempts=2, backoff=Exponential(0.01))))
    async def restock(message: Message) -> None:
        if message.data == "bad":
            raise ValueError("cannot restock")
        restocked.append(message.data)

    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        transport = AsgiTransport({"stock": service.asgi})
        await service.start(RunContext(broker, registry, transport, data_dir=tmp_path))
        await service.register("127.0.0.1", 8000)
        for path in ("/stock/a", "/stock/b", "/nope"):
            sent: list[MutableMapping[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: MutableMapping[str, Any], sent: list[MutableMapping[str, Any]] = sent) -> None:
                sent.append(message)

            scope: dict[str, Any] = {
                "type": "http",
                "method": "GET",
                "path": path,
                "headers": [],
                "query_string": b"",
                "http_version": "1.1",
            }
            await service.asgi(scope, receive, send)
        await broker.publish("restock", "good")
        await broker.publish("restock", "bad")

        async def settled() -> bool:
            return restocked == ["good"] and len(await broker.dead_letters("restock").list(10)) == 1

        await eventually(settled, "the good message handled, the bad one in the dead letter topic")
        for n in range(3):
            await broker.publish("audit", n)

        async def behind() -> bool:
            text = (await service.metrics_text()).decode()
            held = 'meshkit_consumer_lag{group="stock",service="stock",state="in_flight",topic="audit"}'
            waiting = 'meshkit_consumer_lag{group="stock",service="stock",state="waiting",topic="audit"}'
            counts = {
                line.split()[0]: float(line.split()[1])
                for line in text.splitlines()
                if line.startswith(("meshkit_consumer_lag{",))
            }
            return counts.get(held, 0) >= 1 and counts.get(held, 0) + counts.get(waiting, 0) == 3

        await eventually(behind, "three audit messages held or waiting, in the lag gauge")
        text = (await service.metrics_text()).decode()
        audits.set()
        await service.stop()
        await transport.aclose()
    assert 'meshkit_http_requests_total{method="GET",route="/stock/{sku}",service="stock",status="200"} 2.0' in text
    assert 'meshkit_http_requests_total{method="GET",route="unmatched",service="stock",status="404"} 1.0' in text
    assert 'meshkit_messages_handled_total{group="stock",outcome="ok",service="stock",topic="restock"} 1.0' in text
    assert 'meshkit_messages_handled_total{group="stock",outcome="error",service="stock",topic="restock"} 2.0' in text
    assert 'meshkit_dead_letters{group="stock",service="stock",topic="restock"} 1.0' in text
    assert 'meshkit_consumer_lag{group="stock",service="stock",state="waiting",topic="restock"} 0.0' in text
    assert 'meshkit_consumer_lag{group="stock",service="stock",state="in_flight",topic="restock"} 0.0' in text
    assert 'meshkit_client_breaker_state{downstream="pricing",service="stock"} 0.0' in text
    assert "meshkit_http_request_duration_seconds_bucket" in text


GLOBAL_PROVIDER_SCRIPT = """
import asyncio, json, tempfile
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshkit import Service, discovery, messaging
from meshkit.client import AsgiTransport, ServiceClient
from meshkit.runtime import RunContext
from meshkit.tracing.spans import provider

global_spans = InMemorySpanExporter()
made = TracerProvider()
made.add_span_processor(SimpleSpanProcessor(global_spans))
trace.set_tracer_provider(made)  # what auto-instrumentation or the application itself does

own_spans = InMemorySpanExporter()
own = provider("stock", exporter=own_spans, batch=False)
service = Service("stock")


@service.http.get("/stock/{sku}")
async def stock(sku: str) -> dict[str, int]:
    return {"quantity": 1}


async def main() -> None:
    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        transport = AsgiTransport({"stock": service.asgi})
        with tempfile.TemporaryDirectory() as folder:
            await service.start(RunContext(broker, registry, transport, Path(folder), tracer=own.get_tracer("s")))
            await service.register("127.0.0.1", 8000)
            async with ServiceClient("stock", registry, transport=transport) as client:
                assert (await client.get("/stock/book")).status == 200
            await service.stop()
        await transport.aclose()


asyncio.run(main())
print(json.dumps({
    "global": [s.name for s in global_spans.get_finished_spans()],
    "own": [s.name for s in own_spans.get_finished_spans()],
}))
"""


def test_fastapi_makes_no_second_server_span_beside_the_services_own(tmp_path: Path) -> None:
    """FastAPI's own telemetry (newer FastAPIs trace every request once a global provider is set) is off in the app
    a service makes: one server span per request, the service's."""
    script = tmp_path / "global_provider.py"
    script.write_text(GLOBAL_PROVIDER_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    spans = json.loads(done.stdout.strip().splitlines()[-1])
    assert spans["own"] == ["GET /stock/{sku}"]
    assert spans["global"] == []
