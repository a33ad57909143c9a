"""The collector over HTTP, through a real uvicorn server: OTLP/HTTP ingest (a plain OpenTelemetry SDK exports to
it), the JSON query API, and the errors the OTLP/HTTP spec asks for."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.rpc.status_pb2 import Status as RpcStatus  # type: ignore[import-untyped]
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshkit.errors import ConfigurationError
from meshkit.tracing.collector import TraceStore
from meshkit.tracing.receiver import CollectorServer, serve_collector

PROTOBUF = {"content-type": "application/x-protobuf"}
JSON = {"content-type": "application/json"}


@dataclass
class Collector:
    store: TraceStore
    server: CollectorServer
    http: aiohttp.ClientSession

    @property
    def traces_url(self) -> str:
        return self.server.traces_endpoint

    async def get(self, path: str, **params: str) -> tuple[int, Any]:
        async with self.http.get(self.server.url + path, params=params) as response:
            assert response.content_type == "application/json"
            return response.status, await response.json()

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, aiohttp.ClientResponse, bytes]:
        async with self.http.post(self.traces_url, data=body, headers=headers) as response:
            return response.status, response, await response.read()


async def start(max_body_bytes: int = 16 << 20) -> AsyncIterator[Collector]:
    store = await TraceStore.open(retention_seconds=None)
    server = await serve_collector("127.0.0.1", 0, store, max_body_bytes=max_body_bytes)
    async with aiohttp.ClientSession() as http:
        yield Collector(store, server, http)
    await server.aclose()
    await store.aclose()


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async for c in start():
        yield c


@pytest.fixture
async def small_collector() -> AsyncIterator[Collector]:
    async for c in start(max_body_bytes=2048):
        yield c


def export_request(service: str = "inventory", spans: int = 1, name: str = "reserve") -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name", value=AnyValue(string_value=service))
    ss = rs.scope_spans.add()
    for n in range(spans):
        s = ss.spans.add(
            trace_id=bytes.fromhex(f"{n + 1:032x}"),
            span_id=bytes.fromhex(f"{n + 1:016x}"),
            name=name,
            start_time_unix_nano=1_700_000_000_000_000_000 + n,
            end_time_unix_nano=1_700_000_000_250_000_000 + n,
        )
        s.attributes.append(KeyValue(key="sku", value=AnyValue(string_value=f"sku-{n}")))
    return bytes(req.SerializeToString())


JSON_REQUEST = {
    "resourceSpans": [
        {
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "mobile-bff"}}]},
            "scopeSpans": [
                {
                    "spans": [
                        {
                            "traceId": "5b8efff798038103d269b633813fc60c",
                            "spanId": "eee19b7ec3c1b174",
                            "name": "GET /home",
                            "kind": 2,
                            "startTimeUnixNano": "1700000000500000000",
                            "endTimeUnixNano": "1700000000620000000",
                            "attributes": [{"key": "http.response.status_code", "value": {"intValue": "200"}}],
                        }
                    ]
                }
            ],
        }
    ]
}


# -- interop with the OpenTelemetry SDK ----------------------------------------------------------------------------


def run_sdk(endpoint: str) -> dict[str, str]:
    """A plain OpenTelemetry SDK (a provider of its own, never the global one) records a parent, a child with an
    event and an error, and a call into a second service; the exporters POST to the collector. Runs in a thread:
    the SDK's exporter blocks on HTTP."""
    checkout = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    checkout.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    payments = TracerProvider(resource=Resource.create({"service.name": "payments"}))
    payments.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, compression=Compression.Gzip)))
    try:
        tracer = checkout.get_tracer("tests.checkout")
        with tracer.start_as_current_span(
            "POST /checkout", kind=SpanKind.SERVER, attributes={"http.request.method": "POST", "cart.items": 3}
        ) as parent:
            with tracer.start_as_current_span("reserve stock", kind=SpanKind.CLIENT) as child:
                child.set_attribute("retry", True)
                child.add_event("stock.low", {"sku": "sku-9", "left": 1})
                child.set_status(Status(StatusCode.ERROR, "out of stock"))
            with tracer.start_as_current_span("charge", kind=SpanKind.CLIENT) as call:
                remote = payments.get_tracer("tests.payments").start_span(
                    "authorize", kind=SpanKind.SERVER, context=trace.set_span_in_context(call)
                )
                remote.end()
        assert payments.force_flush(30_000)
        ctx = parent.get_span_context()
        return {
            "trace_id": format(ctx.trace_id, "032x"),
            "parent": format(ctx.span_id, "016x"),
            "child": format(child.get_span_context().span_id, "016x"),
        }
    finally:
        checkout.shutdown()
        payments.shutdown()


@pytest.mark.anyio
async def test_a_plain_opentelemetry_sdk_exports_to_the_collector(collector: Collector) -> None:
    ids = await asyncio.to_thread(run_sdk, collector.traces_url)
    assert not [t for t in threading.enumerate() if "OtelBatchSpan" in t.name]  # the SDK's thread is gone

    status, found = await collector.get("/api/traces", service="checkout")
    assert status == 200
    [summary] = found["traces"]
    assert summary["trace_id"] == ids["trace_id"]
    assert (summary["root_service"], summary["root_name"]) == ("checkout", "POST /checkout")
    assert (summary["span_count"], summary["error_count"]) == (4, 1)
    assert summary["services"] == ["checkout", "payments"]

    status, got = await collector.get(f"/api/traces/{ids['trace_id']}")
    assert status == 200
    spans = {s["name"]: s for s in got["spans"]}
    assert [s["name"] for s in got["spans"]] == ["POST /checkout", "reserve stock", "charge", "authorize"]
    parent, child = spans["POST /checkout"], spans["reserve stock"]
    assert parent["span_id"] == ids["parent"]
    assert parent["parent_span_id"] is None
    assert parent["kind"] == "server"
    assert parent["attributes"] == {"http.request.method": "POST", "cart.items": 3}
    assert child["span_id"] == ids["child"]
    assert child["parent_span_id"] == ids["parent"]
    assert child["attributes"] == {"retry": True}
    assert (child["status_code"], child["status_message"]) == ("error", "out of stock")
    assert [(e["name"], e["attributes"]) for e in child["events"]] == [("stock.low", {"sku": "sku-9", "left": 1})]
    assert spans["authorize"]["parent_span_id"] == spans["charge"]["span_id"]
    assert spans["authorize"]["resource"]["service.name"] == "payments"
    assert parent["resource"]["telemetry.sdk.language"] == "python"
    assert parent["scope"] == "tests.checkout"

    status, deps = await collector.get("/api/dependencies", since="0")
    assert deps == {"dependencies": [{"caller": "checkout", "callee": "payments", "calls": 1, "errors": 0}]}
    _, services = await collector.get("/api/services")
    assert services == {"services": ["checkout", "payments"]}
    _, operations = await collector.get("/api/services/checkout/operations")
    assert operations == {"service": "checkout", "operations": ["POST /checkout", "charge", "reserve stock"]}


# -- ingest --------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_protobuf_is_answered_with_an_empty_protobuf_response(collector: Collector) -> None:
    status, response, body = await collector.post(export_request(spans=3), PROTOBUF)
    assert status == 200
    assert response.content_type == "application/x-protobuf"
    assert ExportTraceServiceResponse.FromString(body) == ExportTraceServiceResponse()
    assert await collector.store.count() == 3


@pytest.mark.anyio
async def test_json_is_answered_in_json(collector: Collector) -> None:
    status, response, body = await collector.post(json.dumps(JSON_REQUEST).encode(), JSON)
    assert (status, response.content_type, json.loads(body)) == (200, "application/json", {})
    _, found = await collector.get("/api/traces", service="mobile-bff")
    assert [t["trace_id"] for t in found["traces"]] == ["5b8efff798038103d269b633813fc60c"]
    _, got = await collector.get("/api/traces/5B8EFFF798038103D269B633813FC60C")
    assert got["spans"][0]["attributes"] == {"http.response.status_code": 200}


@pytest.mark.anyio
@pytest.mark.parametrize("as_json", [False, True])
async def test_gzip_bodies(collector: Collector, as_json: bool) -> None:
    body = json.dumps(JSON_REQUEST).encode() if as_json else export_request(spans=2000)  # over 64 KiB
    headers = {**(JSON if as_json else PROTOBUF), "content-encoding": "gzip"}
    status, _, _ = await collector.post(gzip.compress(body), headers)
    assert status == 200
    assert await collector.store.count() == (1 if as_json else 2000)


@pytest.mark.anyio
async def test_a_chunked_body_is_read_whole(collector: Collector) -> None:
    body = export_request(spans=50)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    async with collector.http.post(collector.traces_url, data=chunks(), headers=PROTOBUF) as response:
        assert response.status == 200
    assert await collector.store.count() == 50


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"\xff\xff\xff\xff garbage", PROTOBUF),
        (b"not gzip", {**PROTOBUF, "content-encoding": "gzip"}),
        (gzip.compress(export_request())[:-8], {**PROTOBUF, "content-encoding": "gzip"}),
    ],
)
async def test_a_bad_protobuf_body_is_400_with_a_status(
    collector: Collector, body: bytes, headers: dict[str, str]
) -> None:
    status, response, raw = await collector.post(body, headers)
    assert status == 400
    assert response.content_type == "application/x-protobuf"
    rpc = RpcStatus.FromString(raw)
    assert rpc.code == 3  # INVALID_ARGUMENT
    assert rpc.message
    assert await collector.store.count() == 0


@pytest.mark.anyio
async def test_a_bad_json_body_is_400_with_a_json_status(collector: Collector) -> None:
    doc = json.loads(json.dumps(JSON_REQUEST))
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "xyz"
    status, _, raw = await collector.post(json.dumps(doc).encode(), JSON)
    assert status == 400
    error = json.loads(raw)
    assert error["code"] == 3
    assert "traceId must be 32 hex digits" in error["message"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [{"content-type": "text/plain"}, {}, {**PROTOBUF, "content-encoding": "br"}],
)
async def test_other_content_types_and_encodings_are_415(collector: Collector, headers: dict[str, str]) -> None:
    status, _, _ = await collector.post(export_request(), headers)
    assert status == 415
    assert await collector.store.count() == 0


@pytest.mark.anyio
async def test_bodies_over_the_limit_are_413(small_collector: Collector) -> None:
    c = small_collector
    status, _, raw = await c.post(export_request(spans=100), PROTOBUF)  # declared by Content-Length
    assert status == 413
    assert RpcStatus.FromString(raw).code == 8  # RESOURCE_EXHAUSTED

    big = export_request(spans=100)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    async with c.http.post(c.traces_url, data=chunks(), headers=PROTOBUF) as response:
        assert response.status == 413

    bomb = gzip.compress(export_request(spans=100) * 3)  # small on the wire, large inflated
    assert len(bomb) < 2048
    status, _, _ = await c.post(bomb, {**PROTOBUF, "content-encoding": "gzip"})
    assert status == 413
    assert await c.store.count() == 0

    status, _, _ = await c.post(export_request(spans=2), PROTOBUF)
    assert status == 200


@pytest.mark.anyio
async def test_a_closed_store_is_503_with_retry_after(collector: Collector) -> None:
    await collector.store.aclose()
    status, response, raw = await collector.post(export_request(), PROTOBUF)
    assert status == 503
    assert response.headers["retry-after"] == "1"
    assert RpcStatus.FromString(raw).code == 14  # UNAVAILABLE
    status, body = await collector.get("/api/services")
    assert status == 503
    assert body["error"] == "unavailable"


# -- queries -------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_query_filters_over_http(collector: Collector) -> None:
    await collector.post(export_request("inventory", spans=3), PROTOBUF)  # 250 ms each
    await collector.post(json.dumps(JSON_REQUEST).encode(), JSON)  # 120 ms

    async def trace_ids(**params: str) -> list[str]:
        status, found = await collector.get("/api/traces", **params)
        assert status == 200, found
        return [t["trace_id"] for t in found["traces"]]

    inventory = [f"{n:032x}" for n in (3, 2, 1)]
    home = "5b8efff798038103d269b633813fc60c"
    assert await trace_ids() == [home, *inventory]  # newest first
    assert await trace_ids(service="", operation="") == [home, *inventory]  # empty form fields: no filter
    assert await trace_ids(service="inventory") == inventory
    assert await trace_ids(operation="GET /home") == [home]
    assert await trace_ids(min_duration_ms="200") == inventory
    assert await trace_ids(max_duration_ms="200.5") == [home]
    assert await trace_ids(**{"attr.sku": "sku-1"}) == [f"{2:032x}"]
    assert await trace_ids(**{"attr.http.response.status_code": "200"}) == [home]
    assert await trace_ids(since="2023-11-14T22:13:20Z", until="1700000000") == [f"{1:032x}"]
    assert await trace_ids(since="2023-11-14T22:13:21") == []
    assert await trace_ids(since="1h") == []  # 2023 is long ago
    assert await trace_ids(status="error") == []
    assert await trace_ids(limit="2", service="inventory") == inventory[:2]


@pytest.mark.anyio
async def test_a_service_name_with_a_slash_in_the_path(collector: Collector) -> None:
    await collector.post(export_request("billing/eu west"), PROTOBUF)
    status, body = await collector.get("/api/services/billing%2Feu%20west/operations")
    assert (status, body) == (200, {"service": "billing/eu west", "operations": ["reserve"]})


@pytest.mark.anyio
async def test_an_unknown_trace_is_404(collector: Collector) -> None:
    status, body = await collector.get(f"/api/traces/{'ab' * 16}")
    assert status == 404
    assert body["error"] == "not_found"
    status, body = await collector.get("/api/traces/not-an-id")
    assert status == 400
    status, body = await collector.get(f"/api/traces/{'0' * 32}")
    assert (status, body["error"]) == (400, "bad_request")
    assert "all zeros" in body["message"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/api/traces", {"status": "broken"}, "status must be one of"),
        ("/api/traces", {"limit": "0"}, "limit must be between 1 and 1000"),
        ("/api/traces", {"limit": "many"}, "limit must be an integer"),
        ("/api/traces", {"min_duration_ms": "-1"}, "non-negative"),
        ("/api/traces", {"max_duration_ms": "slow"}, "milliseconds"),
        ("/api/traces", {"min_duration_ms": "5", "max_duration_ms": "1"}, "larger than"),
        ("/api/traces", {"since": "yesterday"}, "Unix seconds, an ISO 8601 time or an age"),
        ("/api/traces", {"since": "2h", "until": "3h"}, "since is later than until"),
        ("/api/traces", {"servce": "orders"}, "unknown query parameter 'servce'"),
        ("/api/traces", {"attr.": "x"}, "attr.KEY needs a non-empty KEY"),
        ("/api/services", {"limit": "5"}, "unknown query parameter"),
        ("/api/dependencies", {"since": "soon"}, "since must be"),
    ],
)
async def test_bad_query_parameters_are_400(
    collector: Collector, path: str, params: dict[str, str], message: str
) -> None:
    status, body = await collector.get(path, **params)
    assert status == 400
    assert body["error"] == "bad_request"
    assert message in body["message"]


@pytest.mark.anyio
async def test_a_repeated_parameter_is_400(collector: Collector) -> None:
    async with collector.http.get(collector.server.url + "/api/traces?service=a&service=b") as response:
        assert response.status == 400
        assert "given twice" in (await response.json())["message"]


@pytest.mark.anyio
async def test_methods_and_unknown_paths(collector: Collector) -> None:
    async with collector.http.get(collector.traces_url) as response:
        assert (response.status, response.headers["allow"]) == (405, "POST")
    async with collector.http.post(collector.server.url + "/api/traces") as response:
        assert (response.status, response.headers["allow"]) == (405, "GET")
    for path in ("/", "/v1/metrics", "/api/nothing"):
        status, body = await collector.get(path)
        assert (status, body["error"]) == (404, "not_found")


@pytest.mark.anyio
async def test_two_collectors_can_share_a_port_and_a_file(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    async with (
        await TraceStore.open(path, retention_seconds=None) as one,
        await TraceStore.open(path, retention_seconds=None) as two,
    ):
        first = await serve_collector("127.0.0.1", 0, one, reuse_port=True)
        second = await serve_collector("127.0.0.1", first.port, two, reuse_port=True)
        try:
            assert second.port == first.port
            connector = aiohttp.TCPConnector(force_close=True)  # a connection per request: both get some
            async with aiohttp.ClientSession(connector=connector) as http:
                for n in range(8):
                    body = export_request(f"svc-{n}")
                    async with http.post(first.traces_endpoint, data=body, headers=PROTOBUF) as response:
                        assert response.status == 200
            assert await one.services() == await two.services() == [f"svc-{n}" for n in range(8)]
        finally:
            await first.aclose()
            await second.aclose()


@pytest.mark.anyio
async def test_a_taken_port_is_a_configuration_error(collector: Collector) -> None:
    with pytest.raises(ConfigurationError, match="cannot listen"):
        await serve_collector("127.0.0.1", collector.server.port, collector.store)
