"""meshkit's OTLP exporters (``meshkit.tracing.export``) against receivers that are not meshkit's: a gRPC OTLP
receiver written here with grpc.aio and the OpenTelemetry protobuf service classes (as Jaeger, Tempo or an
OpenTelemetry collector receive OTLP/gRPC), in plaintext and over TLS; OTLP/HTTP through the same function to the
built-in collector; and the mistakes an endpoint can hold."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from meshkit.errors import ConfigurationError, MissingDependency
from meshkit.tracing.collector import TraceStore
from meshkit.tracing.export import PROTOCOLS, otlp_endpoint, otlp_exporter
from meshkit.tracing.receiver import serve_collector
from meshkit.tracing.spans import provider, span

pytestmark = pytest.mark.anyio


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace service: keeps every request and the metadata (headers) it came with."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []

    async def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        return ExportTraceServiceResponse()

    def spans(self) -> dict[str, tuple[str, Span]]:
        """Every span received by name, with the ``service.name`` of its resource."""
        found: dict[str, tuple[str, Span]] = {}
        for request in self.requests:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for one in scope_spans.spans:
                        found[one.name] = (attributes["service.name"], one)
        return found


@contextlib.asynccontextmanager
async def grpc_receiver(credentials: Any = None) -> AsyncIterator[tuple[TraceService, int]]:
    """A grpc.aio server with :class:`TraceService` on a free loopback port (TLS with ``credentials``)."""
    server = grpc.aio.server()
    service = TraceService()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    try:
        yield service, port
    finally:
        await server.stop(None)
        await server.wait_for_termination()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """The exporter's and the batch processor's threads end with the provider's shutdown."""
    before = set(threading.enumerate())
    yield
    deadline = 30.0
    while (left := set(threading.enumerate()) - before) and deadline > 0:
        threading.Event().wait(0.05)
        deadline -= 0.05
    assert not left, f"threads left running: {left}"


def make_spans(tracing: Any) -> int:
    """A server span with two children (a call and a publish); returns the trace id."""
    tracer = tracing.get_tracer("test")
    with span(tracer, "POST /checkout", kind="server") as root:
        with span(tracer, "POST payments", kind="client", attributes={"peer.service": "payments"}):
            pass
        with span(tracer, "order.created publish", kind="producer"):
            pass
    return int(root.get_span_context().trace_id)


def assert_checkout_trace(received: dict[str, tuple[str, Span]], trace_id: int) -> None:
    assert set(received) == {"POST /checkout", "POST payments", "order.created publish"}
    assert {service for service, _ in received.values()} == {"checkout"}
    root, call, publish = (received[n][1] for n in ("POST /checkout", "POST payments", "order.created publish"))
    assert (root.kind, call.kind, publish.kind) == (
        Span.SpanKind.SPAN_KIND_SERVER,
        Span.SpanKind.SPAN_KIND_CLIENT,
        Span.SpanKind.SPAN_KIND_PRODUCER,
    )
    assert {s.trace_id for s in (root, call, publish)} == {trace_id.to_bytes(16, "big")}
    assert root.parent_span_id == b""
    assert call.parent_span_id == root.span_id and publish.parent_span_id == root.span_id
    assert call.span_id != publish.span_id
    assert {a.key: a.value.string_value for a in call.attributes}["peer.service"] == "payments"


async def test_spans_reach_a_plain_otlp_grpc_receiver() -> None:
    async with grpc_receiver() as (service, port):
        exporter = otlp_exporter(f"http://127.0.0.1:{port}", protocol="grpc", headers={"X-Api-Key": "s3cret"})
        tracing = provider("checkout", exporter=exporter)
        try:
            trace_id = make_spans(tracing)
        finally:
            # shutdown flushes: the export is a blocking gRPC call answered by this loop, so it runs beside it
            await asyncio.to_thread(tracing.shutdown)
    assert_checkout_trace(service.spans(), trace_id)
    assert service.metadata
    assert all(m.get("x-api-key") == "s3cret" for m in service.metadata)  # gRPC metadata keys are lower case


def _tls_files(folder: Path) -> tuple[Path, bytes, bytes]:
    """A CA (its PEM file, to trust) and a server key and certificate it signed, for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if issuer is None:
            return builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        return builder.add_extension(x509.SubjectAlternativeName(names), critical=False)

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test ca", ca_key, None).sign(ca_key, hashes.SHA256())
    server = certificate("collector", server_key, ca).sign(ca_key, hashes.SHA256())
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca_file, key_pem, server.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("form", ["https://127.0.0.1:{port}", "localhost:{port}"])
async def test_https_and_bare_host_port_export_over_tls(
    form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_file, key_pem, cert_pem = _tls_files(tmp_path)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca_file))  # the OpenTelemetry way to trust a CA
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_INSECURE", raising=False)
    # the receiver speaks TLS only: spans arriving prove the exporter used it
    async with grpc_receiver(grpc.ssl_server_credentials([(key_pem, cert_pem)])) as (service, port):
        tracing = provider("checkout", exporter=otlp_exporter(form.format(port=port), protocol="grpc"))
        try:
            trace_id = make_spans(tracing)
        finally:
            await asyncio.to_thread(tracing.shutdown)
    assert_checkout_trace(service.spans(), trace_id)


async def test_http_protobuf_reaches_the_built_in_collector() -> None:
    store = await TraceStore.open(retention_seconds=None)
    try:
        server = await serve_collector("127.0.0.1", 0, store)
        try:
            # the collector's base URL: otlp_exporter adds /v1/traces, as OTEL_EXPORTER_OTLP_ENDPOINT does
            tracing = provider("checkout", exporter=otlp_exporter(server.url, timeout=10))
            try:
                trace_id = make_spans(tracing)
            finally:
                await asyncio.to_thread(tracing.shutdown)
        finally:
            await server.aclose()
        records = {r.name: r for r in await store.trace(f"{trace_id:032x}")}
    finally:
        await store.aclose()
    assert set(records) == {"POST /checkout", "POST payments", "order.created publish"}
    assert {r.service for r in records.values()} == {"checkout"}
    root = records["POST /checkout"]
    assert (root.kind, root.parent_span_id) == ("server", None)
    assert records["POST payments"].kind == "client"
    assert records["order.created publish"].kind == "producer"
    assert records["POST payments"].parent_span_id == root.span_id
    assert records["order.created publish"].parent_span_id == root.span_id


@pytest.mark.parametrize(
    ("endpoint", "protocol", "expected"),
    [
        ("http://collector:4318", "http/protobuf", "http://collector:4318/v1/traces"),
        ("https://collector:4318/", "http/protobuf", "https://collector:4318/v1/traces"),
        ("http://tempo/otlp/v1/traces", "http/protobuf", "http://tempo/otlp/v1/traces"),
        ("jaeger:4317", "grpc", "jaeger:4317"),
        ("http://jaeger:4317/", "grpc", "http://jaeger:4317"),
        ("https://[::1]:4317", "grpc", "https://[::1]:4317"),
    ],
)
def test_endpoints_are_written_as_their_exporter_takes_them(endpoint: str, protocol: str, expected: str) -> None:
    assert otlp_endpoint(endpoint, protocol) == expected


@pytest.mark.parametrize(
    ("endpoint", "protocol", "message", "hint"),
    [
        ("http://jaeger:4317", "zipkin", "unknown OTLP protocol 'zipkin'", "grpc"),
        ("http://jaeger:4317/v1/traces", "grpc", "has a path (/v1/traces)", 'protocol = "http/protobuf"'),
        ("jaeger:4317/api", "grpc", "has a path (/api)", "use 'jaeger:4317'"),
        ("unix:///run/otel.sock", "grpc", "has the scheme 'unix'", "http://host:4317"),
        ("jaeger:4318", "http/protobuf", "not an http:// or https:// URL", 'set protocol = "grpc"'),
        ("http://:4318/v1/traces", "http/protobuf", "names no host", None),
        ("jaeger:http", "grpc", "invalid port", None),
        ("https://user:pw@tempo:4317", "grpc", "credentials", "headers"),
        ("http://tempo:4318/v1/traces?x=1", "http/protobuf", "query", None),
        ("  ", "grpc", "empty", "built-in collector"),
    ],
)
def test_an_endpoint_that_cannot_be_right_is_a_configuration_error(
    endpoint: str, protocol: str, message: str, hint: str | None
) -> None:
    with pytest.raises(ConfigurationError) as info:
        otlp_exporter(endpoint, protocol=protocol)
    assert message in str(info.value)
    if hint is not None:
        assert info.value.hint is not None and hint in info.value.hint
    if protocol not in PROTOCOLS:
        assert "'http/protobuf', 'grpc'" in str(info.value)


@pytest.mark.parametrize(
    ("headers", "timeout", "message"),
    [
        ({"x api key": "k"}, 5.0, "invalid OTLP header name"),
        ({"x-api-key": "k\r\nx-evil: 1"}, 5.0, "line break"),
        ({}, 0.0, "more than 0 seconds"),
    ],
)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_headers_and_timeouts_are_configuration_errors(
    protocol: str, headers: dict[str, str], timeout: float, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        otlp_exporter("http://collector:4317", protocol=protocol, headers=headers, timeout=timeout)


def test_a_missing_grpc_exporter_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)  # import fails
    with pytest.raises(MissingDependency) as info:
        otlp_exporter("http://jaeger:4317", protocol="grpc")
    assert info.value.hint == "pip install 'meshkit[otel]'"
