"""meshkit's span recorder and its short propagation paths behave as OpenTelemetry's SDK and W3C propagators do:
the same parents from the same headers, the same headers from the same spans, SDK exporters take its spans."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshkit.tracing import current_headers, extracted
from meshkit.tracing._w3c import parse_traceparent
from meshkit.tracing.propagation import span_headers
from meshkit.tracing.spans import provider, server_span, span

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"

HEADERS = [
    f"00-{TRACE}-{PARENT}-01",  # plain, sampled
    f"00-{TRACE}-{PARENT}-00",  # plain, not sampled
    f"00-{TRACE}-{PARENT}-03",  # other flag bits
    f"00-{TRACE.upper()}-{PARENT}-01",  # upper case: invalid
    f"01-{TRACE}-{PARENT}-01-future",  # a later version with more fields
    f"ff-{TRACE}-{PARENT}-01",  # forbidden version
    f"00-{'0' * 32}-{PARENT}-01",  # zero trace id
    f"00-{TRACE}-{'0' * 16}-01",  # zero span id
    f"  00-{TRACE}-{PARENT}-01  ",  # padded
    f"00-{TRACE}-{PARENT}-01-extra",  # version 00 with more fields: invalid
    f"00-{TRACE[:-1]}-{PARENT}-01",  # short
    "garbage",
]


@pytest.fixture
def exported() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    made = provider("svc", exporter=exporter, batch=False)
    yield made.get_tracer("test"), exporter
    made.shutdown()


def _propagator_parent(header: str) -> trace.SpanContext:
    """What OpenTelemetry's own W3C propagator makes of ``header``."""
    extracted = TraceContextTextMapPropagator().extract({"traceparent": header})
    return trace.get_current_span(extracted).get_span_context()


@pytest.mark.parametrize("header", HEADERS)
def test_a_server_span_has_the_parent_the_w3c_propagator_reads(
    header: str, exported: tuple[Any, InMemorySpanExporter]
) -> None:
    tracer, exporter = exported
    with server_span(tracer, "GET /x", {"traceparent": header}) as current:
        ours = current.get_span_context()
    expected = _propagator_parent(header)
    spans = exporter.get_finished_spans()
    if expected.is_valid:
        assert ours.trace_id == expected.trace_id
        assert ours.trace_flags == expected.trace_flags
        if expected.trace_flags.sampled:
            (done,) = spans
            assert done.parent is not None
            assert (done.parent.trace_id, done.parent.span_id) == (expected.trace_id, expected.span_id)
            assert done.parent.is_remote
            assert done.kind is SpanKind.SERVER
        else:
            assert spans == (), "a caller that did not sample: nothing recorded (parent-based)"
    else:
        assert ours.trace_id != int(TRACE, 16), "an invalid traceparent starts a new trace"
        (done,) = spans
        assert done.parent is None


# what int(text, 16) takes beside lower-case hex digits (upper case, a 0x prefix, signs, underscores, whitespace,
# non-ASCII digits), and characters it refuses
_NEAR_HEX = "0123456789abcdef" + "ABCDEFxX-_+ \t\u0663\u00b2gz"


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 54), st.sampled_from(_NEAR_HEX)), min_size=1, max_size=3),
    st.integers(0, 55),
    st.integers(0, 55),
)
def test_the_short_traceparent_reading_agrees_with_the_w3c_propagator(
    edits: list[tuple[int, str]], cut_from: int, cut_to: int
) -> None:
    """Near misses of a valid header: characters replaced, and a piece cut out. Where the short path reads a
    version-00 header, it reads what the propagator reads; where it reads none, the propagator finds none either
    (other versions and padding it leaves to the propagator)."""
    chars = list(f"00-{TRACE}-{PARENT}-01")
    for at, char in edits:
        chars[at] = char
    header = "".join(chars)
    if cut_from < cut_to:
        header = header[:cut_from] + header[cut_to:]
    ours = parse_traceparent(header)
    expected = _propagator_parent(header)
    if ours is not None:
        assert expected.is_valid
        assert ours == (expected.trace_id, expected.span_id, expected.trace_flags)
    elif header.startswith("00-") and len(header) == 55:
        assert not expected.is_valid, f"the short path refused {header!r}, which the propagator reads"


@pytest.mark.parametrize("header", HEADERS)
def test_extracted_makes_the_context_the_w3c_propagator_makes(header: str) -> None:
    expected = propagate.extract({"traceparent": header})
    with extracted({"traceparent": header, "content-type": "application/json"}):
        ours = context.get_current()
        current = trace.get_current_span()
    assert ours == expected or (
        # the same current span context (the span objects differ): nothing else in either context
        list(ours) == list(expected)
        and current.get_span_context() == trace.get_current_span(expected).get_span_context()
    )
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached on leaving


def test_a_server_span_with_tracestate_and_baggage_takes_the_general_path(
    exported: tuple[Any, InMemorySpanExporter],
) -> None:
    tracer, exporter = exported
    carried = {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "vendor=abc", "baggage": "tenant=acme"}
    with server_span(tracer, "GET /x", carried) as current:
        assert baggage.get_baggage("tenant") == "acme"
        assert current.get_span_context().trace_state.get("vendor") == "abc"
        headers = current_headers()
    assert headers["tracestate"] == "vendor=abc"
    assert headers["baggage"] == "tenant=acme"
    assert headers["traceparent"].split("-")[1] == TRACE
    (done,) = exporter.get_finished_spans()
    assert done.parent is not None and done.parent.span_id == int(PARENT, 16)


def _propagator_headers() -> dict[str, str]:
    carrier: dict[str, str] = {}
    CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]).inject(carrier)
    return carrier


def test_current_headers_are_what_the_w3c_propagators_write(exported: tuple[Any, InMemorySpanExporter]) -> None:
    tracer, _ = exported
    assert current_headers() == {} == _propagator_headers()
    with span(tracer, "root") as root:
        assert current_headers() == _propagator_headers()
        assert current_headers()["traceparent"].endswith(f"{root.get_span_context().span_id:016x}-01")
        with span(tracer, "child", kind="client"):
            token = context.attach(baggage.set_baggage("tenant", "acme co"))
            try:
                assert current_headers() == _propagator_headers()
                assert "baggage" in current_headers()
            finally:
                context.detach(token)
    remote = {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "a=1,b=2"}
    with server_span(tracer, "GET /y", remote), span(tracer, "call", kind="client"):
        assert current_headers() == _propagator_headers()
        assert current_headers()["tracestate"] == "a=1,b=2"
    # spans reuse their trace's id as hex from the caller's header, or from one a parent wrote: the headers must
    # not change for it
    lone = [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())]
    with tracer.start_request_span(lone, "GET /z", {}), span(tracer, "call", kind="client") as call:
        assert current_headers() == _propagator_headers()
        assert current_headers()["traceparent"] == f"00-{TRACE}-{call.get_span_context().span_id:016x}-01"
    with span(tracer, "root") as root:
        with span(tracer, "before the root wrote a header"):
            assert current_headers() == _propagator_headers()
        assert current_headers() == _propagator_headers()  # the root writes one
        with span(tracer, "after"), span(tracer, "grandchild") as grandchild:
            headers = current_headers()
            assert headers == _propagator_headers()
            assert headers["traceparent"].startswith(f"00-{root.get_span_context().trace_id:032x}-")
            assert grandchild.get_span_context().trace_id == root.get_span_context().trace_id


class _OnlyCustom:
    """A propagator that is not W3C: meshkit must hand injection to it."""

    def __init__(self) -> None:
        self.injected = 0

    def inject(self, carrier: dict[str, str], context: Any = None, setter: Any = None) -> None:
        self.injected += 1
        carrier["x-custom-trace"] = "1"
        TraceContextTextMapPropagator().inject(carrier, context)

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        return TraceContextTextMapPropagator().extract(carrier, context)

    @property
    def fields(self) -> set[str]:
        return {"x-custom-trace", "traceparent"}


def test_other_configured_propagators_are_used_instead_of_the_short_paths(
    exported: tuple[Any, InMemorySpanExporter],
) -> None:
    tracer, _ = exported
    custom = _OnlyCustom()
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(custom)  # type: ignore[arg-type]
    try:
        with span(tracer, "root"):
            headers = current_headers()
    finally:
        propagate.set_global_textmap(before)
    assert custom.injected == 1
    assert set(headers) == {"traceparent"}, "only trace headers leave, whoever wrote them"


def test_recorded_spans_are_sdk_spans_for_any_exporter(exported: tuple[Any, InMemorySpanExporter]) -> None:
    tracer, exporter = exported
    sdk_exporter = InMemorySpanExporter()
    sdk = SdkTracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(sdk_exporter))

    def traced_work() -> None:
        with span(tracer, "outer", attributes={"a": 1}) as outer:
            outer.set_attribute("list", ["x", "y"])
            outer.set_attribute("mixed", ["x", 1])  # not an attribute value: dropped
            outer.set_attribute("mapping", {"k": "v"})  # dropped
            outer.set_attributes({"d": 2.5, "bad": object()})  # a dict (the fast path); the object is dropped
            outer.set_attributes(MappingProxyType({"m": True}))  # any other mapping
            outer.add_event("checkpoint", {"n": 2})
            with sdk.get_tracer("user").start_as_current_span("user code"):
                pass
            with span(tracer, "inner", links=[trace.Link(outer.get_span_context())]):
                pass
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        traced_work()
    inner, outer_done = exporter.get_finished_spans()
    (user,) = sdk_exporter.get_finished_spans()
    assert inner.parent is not None and inner.parent.span_id == outer_done.context.span_id
    assert user.parent is not None and user.parent.span_id == outer_done.context.span_id, "SDK spans nest in ours"
    assert [link.context.span_id for link in inner.links] == [outer_done.context.span_id]
    assert dict(outer_done.attributes or {}) == {"a": 1, "list": ("x", "y"), "d": 2.5, "m": True}
    assert outer_done.status.status_code is StatusCode.ERROR
    assert outer_done.status.description == "ValueError: boom"
    assert [e.name for e in outer_done.events] == ["checkpoint", "exception"]
    assert outer_done.events[1].attributes is not None
    assert outer_done.events[1].attributes["exception.type"] == "ValueError"
    assert outer_done.resource.attributes["service.name"] == "svc"
    assert outer_done.end_time is not None and outer_done.start_time is not None
    assert outer_done.end_time >= outer_done.start_time
    assert json.loads(outer_done.to_json())["name"] == "outer"
    assert trace.get_current_span() is trace.INVALID_SPAN, "the context is restored after an exception"
    sdk.shutdown()


def test_ratio_sampling_keeps_the_traces_the_sdk_sampler_keeps() -> None:
    exporter = InMemorySpanExporter()
    made = provider("svc", exporter=exporter, batch=False, sample_ratio=0.3, keep_errors=False)
    tracer = made.get_tracer("test")
    sampler = TraceIdRatioBased(0.3)
    decisions = []
    for _ in range(400):
        with span(tracer, "root") as root:
            trace_id = root.get_span_context().trace_id
            sampled = root.get_span_context().trace_flags.sampled
            with span(tracer, "child") as child:
                assert child.get_span_context().trace_flags.sampled == sampled, "children follow their root"
                assert current_headers()["traceparent"].endswith("-01" if sampled else "-00")
        expected = sampler.should_sample(None, trace_id, "root").decision is Decision.RECORD_AND_SAMPLE
        decisions.append(sampled)
        assert sampled == expected
    assert 60 < sum(decisions) < 180, "about 30 % kept"
    assert len(exporter.get_finished_spans()) == 2 * sum(decisions)
    made.shutdown()


def _request(header: str, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """ASGI headers of a request carrying ``header`` as its traceparent."""
    return [(b"host", b"stock"), (b"traceparent", header.encode("latin-1")), *extra]


@pytest.mark.parametrize("header", HEADERS)
def test_a_request_span_read_from_asgi_headers_has_the_parent_the_w3c_propagator_reads(
    header: str, exported: tuple[Any, InMemorySpanExporter]
) -> None:
    tracer, exporter = exported
    made = tracer.start_request_span(_request(header), "GET", {"url.path": "/x"})
    if parse_traceparent(header) is None:
        assert made is None, "a header the short reading refuses goes to the propagator (server_span)"
        return
    expected = _propagator_parent(header)
    with made as current:
        assert trace.get_current_span() is current
        ours = current.get_span_context()
    assert (ours.trace_id, ours.trace_flags) == (expected.trace_id, expected.trace_flags)
    if expected.trace_flags.sampled:
        (done,) = exporter.get_finished_spans()
        assert done.parent is not None and done.parent.is_remote
        assert (done.parent.trace_id, done.parent.span_id) == (expected.trace_id, expected.span_id)
        assert done.parent is done.parent, "the parent's SpanContext is built once"
        assert done.kind is SpanKind.SERVER
        assert dict(done.attributes or {}) == {"url.path": "/x"}
    else:
        assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    "headers",
    [
        _request(f"00-{TRACE}-{PARENT}-01", (b"tracestate", b"vendor=abc")),
        _request(f"00-{TRACE}-{PARENT}-01", (b"baggage", b"tenant=acme")),
        _request(f"00-{TRACE}-{PARENT}-01", (b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())),
    ],
    ids=["tracestate", "baggage", "two traceparents"],
)
def test_a_request_with_more_than_a_plain_traceparent_is_left_to_the_propagators(
    headers: list[tuple[bytes, bytes]], exported: tuple[Any, InMemorySpanExporter]
) -> None:
    tracer, _ = exported
    assert tracer.start_request_span(headers, "GET", {}) is None


def test_a_request_span_takes_asgi_headers_as_lists_and_without_a_traceparent(
    exported: tuple[Any, InMemorySpanExporter],
) -> None:
    tracer, exporter = exported
    header = f"00-{TRACE}-{PARENT}-01".encode()
    # ASGI allows any two-item iterables: lists, and others (a pair that is neither a tuple nor a list)
    for listed in (
        [[b"host", b"x"], [b"traceparent", header]],
        [iter((b"host", b"x")), iter((b"traceparent", header))],
    ):
        with tracer.start_request_span(listed, "GET", {}) as current:
            assert current.get_span_context().trace_id == int(TRACE, 16)
    assert tracer.start_request_span([(b"traceparent", bytearray(header))], "GET", {}) is None, "not bytes"
    with span(tracer, "caller") as caller, tracer.start_request_span([(b"host", b"x")], "GET", {}) as served:
        # no traceparent: a child of the current span, as server_span makes it
        assert served.get_span_context().trace_id == caller.get_span_context().trace_id
    with tracer.start_request_span([], "GET", {}) as root:
        assert root.get_span_context().trace_id != int(TRACE, 16)
    by_name = {done.context.span_id: done for done in exporter.get_finished_spans()}
    served_done = by_name[served.get_span_context().span_id]
    assert served_done.parent is not None
    assert served_done.parent.span_id == caller.get_span_context().span_id
    assert by_name[root.get_span_context().span_id].parent is None


def test_call_headers_are_what_the_w3c_propagators_write_or_none(exported: tuple[Any, InMemorySpanExporter]) -> None:
    tracer, _ = exported
    with tracer.start_request_span(_request(f"00-{TRACE}-{PARENT}-01"), "GET", {}), span(tracer, "call") as call:
        assert call.call_headers() == _propagator_headers() == span_headers(call)
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            assert call.call_headers() is None, "baggage: the propagators write the headers"
            assert span_headers(call) == _propagator_headers()
            assert "baggage" in span_headers(call)
        finally:
            context.detach(token)
        with span(tracer, "inner"):
            assert call.call_headers() is None, "not the current span"
    custom = _OnlyCustom()
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(custom)  # type: ignore[arg-type]
    try:
        with span(tracer, "root") as root:
            assert root.call_headers() is None
            assert tracer.start_request_span(_request(f"00-{TRACE}-{PARENT}-01"), "GET", {}) is None
            assert set(span_headers(root)) == {"traceparent"}
    finally:
        propagate.set_global_textmap(before)
    assert custom.injected == 1


def test_a_propagator_without_fields_is_not_taken_for_the_default_one(
    exported: tuple[Any, InMemorySpanExporter],
) -> None:
    tracer, _ = exported

    class Bare:  # a propagator that does not say which fields it reads
        def inject(self, carrier: dict[str, str], context: Any = None, setter: Any = None) -> None:
            carrier["x-bare"] = "1"

        def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
            return context

    before = propagate.get_global_textmap()
    propagate.set_global_textmap(Bare())  # type: ignore[arg-type]
    try:
        assert tracer.start_request_span(_request(f"00-{TRACE}-{PARENT}-01"), "GET", {}) is None
        with span(tracer, "root") as root:
            assert root.call_headers() is None
    finally:
        propagate.set_global_textmap(before)
