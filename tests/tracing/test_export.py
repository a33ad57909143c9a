"""A meshkit service exports to an OTLP/HTTP endpoint that is not meshkit's: a plain receiver written here with
aiohttp and the OpenTelemetry protobuf classes, as Jaeger or an OpenTelemetry collector would receive it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from meshkit import Service, discovery, messaging
from meshkit.client import AsgiTransport, ServiceClient
from meshkit.runtime import RunContext
from meshkit.tracing.spans import provider
from tests.local_http import LocalServer

pytestmark = pytest.mark.anyio


class Receiver(LocalServer):
    """An OTLP/HTTP traces endpoint: stores (service, span name, trace id) of what it receives."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        self.content_types: set[str] = set()
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        super().__init__(app)

    async def handle(self, request: web.Request) -> web.Response:
        self.content_types.add(request.content_type)
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((service, span.name, span.trace_id.hex()))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )


async def test_a_service_exports_its_spans_to_any_otlp_endpoint(tmp_path: Path) -> None:
    receiver = await Receiver().start()
    endpoint = f"http://127.0.0.1:{receiver.port}/v1/traces"
    tracing = provider("inventory", endpoint=endpoint)
    service = Service("inventory")

    @service.http.get("/stock/{sku}")
    async def stock(sku: str) -> dict[str, int]:
        return {"quantity": 3}

    try:
        async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
            transport = AsgiTransport({"inventory": service.asgi})
            await service.start(RunContext(broker, registry, transport, tmp_path, tracer=tracing.get_tracer("m")))
            await service.register("127.0.0.1", 8000)
            async with ServiceClient("inventory", registry, transport=transport) as client:
                assert (await client.get("/stock/book")).status == 200
            await service.stop()
            await transport.aclose()
        await asyncio.to_thread(tracing.force_flush)
        async with asyncio.timeout(30):
            while not receiver.spans:  # noqa: ASYNC110 - the exporter posts from its own thread
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(tracing.shutdown)
        await receiver.close()
    assert ("inventory", "GET /stock/{sku}", receiver.spans[0][2]) in receiver.spans
    assert receiver.content_types == {"application/x-protobuf"}
