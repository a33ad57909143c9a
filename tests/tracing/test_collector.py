"""The collector's decoding (OTLP protobuf and OTLP/JSON) and its SQLite store."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from meshkit._core.clock import FakeClock
from meshkit.errors import ConfigurationError, Unavailable
from meshkit.tracing.collector import (
    Dependency,
    OtlpDecodeError,
    SpanBatch,
    SpanEvent,
    SpanLink,
    SpanRecord,
    TraceStore,
    _pieces,
    decode_otlp_json,
    decode_otlp_protobuf,
)

T1 = "0af7651916cd43dd8448eb211c80319c"
T2 = "4bf92f3577b34da6a3ce929d0e0e4736"
T3 = "00000000000000000000000000000abc"
NOW = 1_700_000_000 * 10**9
MS = 10**6


def any_value(value: Any) -> AnyValue:
    """A Python value as an OTLP AnyValue (the inverse of the decoder's mapping)."""
    if value is None:
        return AnyValue()
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(values=[kv(k, v) for k, v in value.items()]))
    return AnyValue(string_value=value)


def kv(key: str, value: Any) -> KeyValue:
    return KeyValue(key=key, value=any_value(value))


def request(*resources: tuple[dict[str, Any], list[Span]], scope: str = "tests") -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for attributes, spans in resources:
        rs = req.resource_spans.add()
        rs.resource.attributes.extend([kv(k, v) for k, v in attributes.items()])
        ss = rs.scope_spans.add()
        ss.scope.name = scope
        ss.spans.extend(spans)
    return req


def span(
    trace: str, span_id: str, name: str, start_ms: int, end_ms: int, parent: str | None = None, **extra: Any
) -> Span:
    s = Span(
        trace_id=bytes.fromhex(trace),
        span_id=bytes.fromhex(span_id),
        name=name,
        start_time_unix_nano=NOW + start_ms * MS,
        end_time_unix_nano=NOW + end_ms * MS,
        kind=extra.pop("kind", Span.SPAN_KIND_SERVER),
    )
    if parent:
        s.parent_span_id = bytes.fromhex(parent)
    s.attributes.extend([kv(k, v) for k, v in extra.pop("attributes", {}).items()])
    if "status" in extra:
        code, message = extra.pop("status")
        s.status.CopyFrom(Status(code=code, message=message))
    assert not extra
    return s


def record(trace: str, span_id: str, service: str, name: str, start_ms: int, end_ms: int, **extra: Any) -> SpanRecord:
    return SpanRecord(
        trace_id=trace,
        span_id=span_id,
        service=service,
        name=name,
        start_ns=NOW + start_ms * MS,
        end_ns=NOW + end_ms * MS,
        resource={"service.name": service},
        **extra,
    )


# -- protobuf ------------------------------------------------------------------------------------------------------


def test_protobuf_decodes_every_field_and_value_type() -> None:
    s = span(
        T1,
        "b7ad6b7169203331",
        "GET /orders/{id}",
        0,
        25,
        parent="00f067aa0ba902b7",
        kind=Span.SPAN_KIND_CLIENT,
        attributes={
            "http.route": "/orders/{id}",
            "http.response.status_code": 500,
            "ratio": 0.25,
            "cached": False,
            "raw": b"\x00\xffbytes",
            "tags": ["a", 1, [True]],
            "nested": {"deep": {"list": [1.5, "x"]}},
            "unset": None,
            "long": "é" * 300,
        },
        status=(Status.STATUS_CODE_ERROR, "upstream timed out"),
    )
    event = s.events.add(name="exception", time_unix_nano=NOW + 3 * MS)
    event.attributes.extend([kv("exception.type", "TimeoutError")])
    link = s.links.add(trace_id=bytes.fromhex(T2), span_id=bytes.fromhex("1111111111111111"))
    link.attributes.extend([kv("reason", "batch")])
    body = request(({"service.name": "orders", "service.version": "1.4.2", "pid": 42}, [s])).SerializeToString()

    [got] = decode_otlp_protobuf(body)

    assert got == SpanRecord(
        trace_id=T1,
        span_id="b7ad6b7169203331",
        parent_span_id="00f067aa0ba902b7",
        name="GET /orders/{id}",
        kind="client",
        service="orders",
        start_ns=NOW,
        end_ns=NOW + 25 * MS,
        status_code="error",
        status_message="upstream timed out",
        attributes={
            "http.route": "/orders/{id}",
            "http.response.status_code": 500,
            "ratio": 0.25,
            "cached": False,
            "raw": base64.b64encode(b"\x00\xffbytes").decode(),
            "tags": ["a", 1, [True]],
            "nested": {"deep": {"list": [1.5, "x"]}},
            "unset": None,
            "long": "é" * 300,
        },
        events=[SpanEvent("exception", NOW + 3 * MS, {"exception.type": "TimeoutError"})],
        links=[SpanLink(T2, "1111111111111111", {"reason": "batch"})],
        resource={"service.name": "orders", "service.version": "1.4.2", "pid": 42},
        scope="tests",
    )
    assert got.duration_ns == 25 * MS


def test_protobuf_maps_kinds_statuses_and_missing_service_name() -> None:
    spans = [
        span(T1, f"{n + 1:016x}", f"s{n}", n, n + 1, kind=kind)
        for n, kind in enumerate([0, 1, 2, 3, 4, 5, 99])  # 0 (unspecified) and unknown values read as internal
    ]
    spans[0].status.CopyFrom(Status(code=Status.STATUS_CODE_OK))
    got = decode_otlp_protobuf(request(({"host.name": "n1"}, spans)).SerializeToString())
    assert [s.kind for s in got] == ["internal", "internal", "server", "client", "producer", "consumer", "internal"]
    assert [s.status_code for s in got] == ["ok"] + ["unset"] * 6
    assert {s.service for s in got} == {"unknown_service"}


def test_non_finite_doubles_become_the_json_mapping_strings() -> None:
    s = span(T1, "0000000000000001", "x", 0, 1, attributes={"a": math.inf, "b": -math.inf, "c": math.nan})
    [got] = decode_otlp_protobuf(request(({}, [s])).SerializeToString())
    assert got.attributes == {"a": "Infinity", "b": "-Infinity", "c": "NaN"}


def test_an_empty_body_is_an_empty_request() -> None:
    assert decode_otlp_protobuf(b"") == []


@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff\xff", b"\x0a\x05abc", b"not protobuf at all, just text"],
)
def test_garbage_raises_a_clear_value_error(body: bytes) -> None:
    with pytest.raises(OtlpDecodeError, match="not a valid protobuf ExportTraceServiceRequest") as caught:
        decode_otlp_protobuf(body)
    assert isinstance(caught.value, ValueError)


def test_ids_of_the_wrong_size_are_rejected_with_where() -> None:
    bad = span(T1, "0000000000000001", "x", 0, 1)
    bad.trace_id = b"\x01" * 5
    body = request(({}, [span(T1, "0000000000000002", "ok", 0, 1), bad])).SerializeToString()
    with pytest.raises(OtlpDecodeError, match=r"resource_spans\[0\]\.scope_spans\[0\]\.spans\[1\]: trace_id must be"):
        decode_otlp_protobuf(body)


def test_all_zero_ids_are_rejected() -> None:
    zero = span(T1, "0000000000000001", "x", 0, 1)
    zero.trace_id = bytes(16)
    with pytest.raises(OtlpDecodeError, match="all zeros"):
        decode_otlp_protobuf(request(({}, [zero])).SerializeToString())


def test_invalid_utf8_in_an_attribute_is_a_decode_error() -> None:
    # Serialize with a placeholder value, then swap its bytes for invalid UTF-8 of the same length.
    body = request(({}, [span(T1, "0000000000000001", "x", 0, 1, attributes={"k": "@@@@"})])).SerializeToString()
    assert body.count(b"@@@@") == 1
    with pytest.raises(OtlpDecodeError):
        decode_otlp_protobuf(body.replace(b"@@@@", b"\xff\xfe\xfd\xfc"))


def test_the_first_span_with_a_bad_id_is_named() -> None:
    """Ids are checked for a whole scope at once; the error still names the first bad span."""
    cases: list[tuple[str, bytes, str]] = [
        ("span_id", bytes(8), r"spans\[2\]: an id is all zeros"),
        ("trace_id", bytes(16), r"spans\[2\]: an id is all zeros"),
        ("parent_span_id", b"\x01" * 4, r"spans\[2\]: trace_id must be 16 bytes, span_id and parent_span_id 8"),
        ("span_id", b"\x01" * 9, r"spans\[2\]: .* got 16, 9 and 0"),
    ]
    for field, value, message in cases:
        spans = [span(T1 if n % 2 else T2, f"{n + 1:016x}", "x", 0, 1) for n in range(4)]
        setattr(spans[2], field, value)
        spans[3].span_id = bytes(8)  # a later bad span is not the one named
        body = request(({}, spans)).SerializeToString()
        with pytest.raises(OtlpDecodeError, match=message):
            decode_otlp_protobuf(body)


def test_roots_and_children_of_one_scope_keep_their_parents() -> None:
    spans = [span(T1, "0000000000000001", "root", 0, 9)]
    spans += [span(T1, f"{n + 2:016x}", "child", n, n + 1, parent="0000000000000001") for n in range(3)]
    got = decode_otlp_protobuf(request(({}, spans)).SerializeToString())
    assert [s.parent_span_id for s in got] == [None] + ["0000000000000001"] * 3
    batch = SpanBatch.from_protobuf(request(({}, spans)).SerializeToString())
    assert [bytes(t) for t in batch.groups[0].traces] == [bytes.fromhex(T1)]  # once per group


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["k", "http.route", "url.path", "x" * 120]),
            st.text(alphabet='ab"\\é\n', max_size=6) | st.integers(0, 3),
            max_size=4,
        ),
        min_size=1,
        max_size=12,
    )
)
def test_attributes_repeating_keys_and_lengths_decode_alike(attributes: list[dict[str, Any]]) -> None:
    """Keys that repeat with values of one length share a cached head in the decoder: every value still comes
    out as its own, escaped as JSON."""
    spans = [span(T1, f"{n + 1:016x}", "x", 0, 1, attributes=a) for n, a in enumerate(attributes)]
    body = request(({"service.name": "s"}, spans)).SerializeToString()
    assert [s.attributes for s in decode_otlp_protobuf(body)] == attributes
    batch = SpanBatch.from_protobuf(body)
    assert SpanBatch.from_records(batch.records()).groups == batch.groups


def test_a_span_ending_before_it_starts_is_stored_with_no_duration() -> None:
    spans = [span(T1, "0000000000000001", "ok", 0, 5), span(T1, "0000000000000002", "skewed", 5, 2)]
    batch = SpanBatch.from_protobuf(request(({}, spans)).SerializeToString())
    assert [row[8] for row in batch.groups[0].rows] == [5 * MS, 0]  # the duration_ns column


def test_a_key_value_with_more_than_a_string_takes_the_general_path() -> None:
    """A KeyValue whose head was seen before, but with another field after its value, is not read as a string."""
    first = span(T1, "0000000000000001", "x", 0, 1, attributes={"k": "ab"})
    extra = kv("k", "cd").SerializeToString() + b"\x18\x01"  # an unknown field 3 after the value
    base = span(T1, "0000000000000002", "x", 0, 1).SerializeToString()
    second = Span.FromString(base + b"\x4a" + bytes([len(extra)]) + extra)
    empty = span(T1, "0000000000000003", "x", 0, 1)
    empty.attributes.add()  # key "", no value: encodes to no bytes at all
    got = decode_otlp_protobuf(request(({}, [first, second, empty])).SerializeToString())
    assert [s.attributes for s in got] == [{"k": "ab"}, {"k": "cd"}, {"": None}]


def test_invalid_utf8_after_a_cached_head_is_a_decode_error() -> None:
    spans = [span(T1, "0000000000000001", "x", 0, 1, attributes={"k": "ab"})]
    spans.append(span(T1, "0000000000000002", "x", 0, 1, attributes={"k": "@@"}))
    body = request(({}, spans)).SerializeToString()
    assert body.count(b"@@") == 1
    with pytest.raises(OtlpDecodeError):
        decode_otlp_protobuf(body.replace(b"@@", b"\xff\xfe"))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=150), json_values, max_size=6))
def test_both_encoders_write_the_same_json(attributes: dict[str, Any]) -> None:
    """The protobuf decoder builds attribute JSON from encoded bytes (with a fast path for short strings); the
    store builds it from SpanRecords: the stored text must not depend on which one ran."""
    body = request(({"service.name": "s"}, [span(T1, "0000000000000001", "x", 0, 1, attributes=attributes)]))
    batch = SpanBatch.from_protobuf(body.SerializeToString())
    again = SpanBatch.from_records(batch.records())
    assert again.groups == batch.groups
    [got] = batch.records()
    expected = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in attributes.items()}
    assert got.attributes == json.loads(json.dumps(expected, default=_b64))


def _b64(value: object) -> str:
    assert isinstance(value, bytes)
    return base64.b64encode(value).decode()


# -- OTLP/JSON -----------------------------------------------------------------------------------------------------


def otlp_json() -> dict[str, Any]:
    """A document written by hand from the OTLP/JSON spec (opentelemetry-proto/docs/specification.md)."""
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "checkout"}},
                        {"key": "process.pid", "value": {"intValue": "4242"}},
                    ]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "my.library", "version": "1.0.0"},
                        "spans": [
                            {
                                "traceId": T1.upper(),  # hex, either case
                                "spanId": "EEE19B7EC3C1B174",
                                "parentSpanId": "EEE19B7EC3C1B173",
                                "name": "charge",
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": 1544712661000000000,  # a number is accepted too
                                "kind": 3,
                                "attributes": [
                                    {"key": "amount.cents", "value": {"intValue": "1999"}},
                                    {"key": "ratio", "value": {"doubleValue": 0.5}},
                                    {"key": "inf", "value": {"doubleValue": "Infinity"}},
                                    {"key": "retry", "value": {"boolValue": True}},
                                    {
                                        "key": "blob",
                                        "value": {"bytesValue": base64.b64encode(b"\x00\x01\xfe").decode()},
                                    },
                                    {
                                        "key": "cart",
                                        "value": {
                                            "arrayValue": {
                                                "values": [
                                                    {"stringValue": "sku-1"},
                                                    {
                                                        "kvlistValue": {
                                                            "values": [
                                                                {"key": "qty", "value": {"intValue": 2}},
                                                                {"key": "gift", "value": {"boolValue": False}},
                                                            ]
                                                        }
                                                    },
                                                ]
                                            }
                                        },
                                    },
                                    {"key": "empty", "value": {}},
                                ],
                                "events": [
                                    {
                                        "timeUnixNano": "1544712660500000000",
                                        "name": "retry",
                                        "attributes": [{"key": "attempt", "value": {"intValue": "2"}}],
                                    }
                                ],
                                "links": [{"traceId": T2, "spanId": "1111111111111111", "attributes": []}],
                                "status": {"code": 2, "message": "card declined"},
                                "droppedAttributesCount": 0,
                                "someFutureField": {"ignored": True},
                            }
                        ],
                    }
                ],
            }
        ]
    }


def test_json_decodes_the_spec_mapping() -> None:
    [got] = decode_otlp_json(json.dumps(otlp_json()).encode())
    assert got == SpanRecord(
        trace_id=T1,
        span_id="eee19b7ec3c1b174",
        parent_span_id="eee19b7ec3c1b173",
        name="charge",
        kind="client",
        service="checkout",
        start_ns=1544712660000000000,
        end_ns=1544712661000000000,
        status_code="error",
        status_message="card declined",
        attributes={
            "amount.cents": 1999,
            "ratio": 0.5,
            "inf": "Infinity",
            "retry": True,
            "blob": base64.b64encode(b"\x00\x01\xfe").decode(),
            "cart": ["sku-1", {"qty": 2, "gift": False}],
            "empty": None,
        },
        events=[SpanEvent("retry", 1544712660500000000, {"attempt": 2})],
        links=[SpanLink(T2, "1111111111111111", {})],
        resource={"service.name": "checkout", "process.pid": 4242},
        scope="my.library",
    )


def test_json_and_protobuf_of_the_same_spans_store_the_same_rows() -> None:
    doc = otlp_json()
    pb = decode_otlp_json(json.dumps(doc))
    s = pb[0]
    proto = span(s.trace_id, s.span_id, s.name, 0, 1, parent=s.parent_span_id, kind=Span.SPAN_KIND_CLIENT)
    proto.start_time_unix_nano, proto.end_time_unix_nano = s.start_ns, s.end_ns
    raw_attributes = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"]
    proto.attributes.extend(
        [kv(a["key"], b"\x00\x01\xfe" if a["key"] == "blob" else s.attributes[a["key"]]) for a in raw_attributes]
    )
    proto.attributes[2].value.double_value = math.inf
    proto.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="card declined"))
    proto.events.add(name="retry", time_unix_nano=1544712660500000000).attributes.extend([kv("attempt", 2)])
    proto.links.add(trace_id=bytes.fromhex(T2), span_id=bytes.fromhex("1111111111111111"))
    body = request(({"service.name": "checkout", "process.pid": 4242}, [proto]), scope="my.library")
    assert SpanBatch.from_protobuf(body.SerializeToString()).groups == SpanBatch.from_json(json.dumps(doc)).groups


def test_json_accepts_proto_field_names_and_enum_names() -> None:
    doc = {
        "resource_spans": [
            {
                "scope_spans": [
                    {
                        "spans": [
                            {
                                "trace_id": T1,
                                "span_id": "0000000000000001",
                                "name": "x",
                                "kind": "SPAN_KIND_PRODUCER",
                                "status": {"code": "STATUS_CODE_OK"},
                            }
                        ]
                    }
                ]
            }
        ]
    }
    [got] = decode_otlp_json(json.dumps(doc).encode())
    assert (got.kind, got.status_code, got.service, got.parent_span_id) == ("producer", "ok", "unknown_service", None)


def _with_span(**fields: Any) -> bytes:
    doc = otlp_json()
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0].update(fields)
    return json.dumps(doc).encode()


def _with_attribute(value: Any) -> bytes:
    return _with_span(attributes=[{"key": "k", "value": value}])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"resourceSpans": {}}).encode(), r"resourceSpans: expected an array"),
        (_with_span(traceId="abc"), r"spans\[0\]\.traceId must be 32 hex digits"),
        (_with_span(spanId="zzzzzzzzzzzzzzzz"), r"spanId must be 16 hex digits"),
        (_with_span(traceId="0" * 32), "must not be all zeros"),
        (_with_span(startTimeUnixNano="soon"), r"startTimeUnixNano: expected an integer"),
        (_with_span(endTimeUnixNano="-5"), "out of range"),
        (_with_span(kind="SERVER"), r"kind: expected an enum value"),
        (_with_span(name=5), r"name: expected a string, got a number"),
        (_with_attribute({"intValue": "12a"}), r"attributes\[0\]\.value\.intValue: expected an integer"),
        (_with_attribute({"intValue": str(2**63)}), "out of range"),
        (_with_attribute({"doubleValue": "fast"}), "expected a number"),
        (_with_attribute({"boolValue": "yes"}), "expected true or false"),
        (_with_attribute({"bytesValue": "***"}), "is not base64"),
        (_with_attribute({"stringValue": "a", "intValue": "1"}), "an AnyValue holds one value"),
        (_with_attribute({"arrayValue": {"values": "x"}}), r"arrayValue\.values: expected an array"),
    ],
)
def test_json_errors_say_what_and_where(body: bytes, message: str) -> None:
    with pytest.raises(OtlpDecodeError, match=message):
        decode_otlp_json(body)


def test_json_nesting_is_bounded() -> None:
    value: dict[str, Any] = {"stringValue": "leaf"}
    for _ in range(40):
        value = {"arrayValue": {"values": [value]}}
    with pytest.raises(OtlpDecodeError, match="nested deeper"):
        decode_otlp_json(_with_attribute(value))


# -- the store -----------------------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "file"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    path = ":memory:" if request.param == "memory" else tmp_path / "traces.db"
    s = await TraceStore.open(path, retention_seconds=None, max_spans=None)
    yield s
    await s.aclose()


def shop() -> list[SpanRecord]:
    """Three traces: a checkout across three services (one call failed), a fast health check, an orphan."""
    return [
        record(T1, "0000000000000001", "gateway", "POST /checkout", 100, 400, kind="server",
               attributes={"http.response.status_code": 502, "user": "ada", "retried": True}),
        record(T1, "0000000000000002", "gateway", "POST", 110, 390, parent_span_id="0000000000000001", kind="client"),
        record(T1, "0000000000000003", "orders", "POST /orders", 120, 380, parent_span_id="0000000000000002",
               kind="server", attributes={"order.id": "o-17"}),
        record(T1, "0000000000000004", "orders", "POST", 130, 300, parent_span_id="0000000000000003", kind="client"),
        record(T1, "0000000000000005", "payments", "charge", 140, 290, parent_span_id="0000000000000004",
               kind="server", status_code="error", status_message="card declined",
               events=[SpanEvent("exception", NOW + 150 * MS, {"exception.type": "Declined"})]),
        record(T2, "0000000000000011", "gateway", "GET /healthz", 500, 502, kind="server",
               attributes={"http.response.status_code": 200, "user": "bob", "retried": False}),
        # the root of T3 never arrived: its earliest span whose parent is missing stands in
        record(T3, "0000000000000022", "orders", "consume order.created", 700, 760, parent_span_id="00000000000000ff",
               kind="consumer", links=[SpanLink(T1, "0000000000000003", {"kind": "follows"})]),
        record(T3, "0000000000000021", "orders", "consume order.created", 650, 900, parent_span_id="00000000000000fe",
               kind="consumer"),
    ]  # fmt: skip


@pytest.mark.anyio
async def test_a_trace_comes_back_whole_and_ordered_by_start(store: TraceStore) -> None:
    spans = shop()
    assert await store.add(list(reversed(spans))) == len(spans)
    got = await store.trace(T1)
    assert got == sorted((s for s in spans if s.trace_id == T1), key=lambda s: s.start_ns)
    assert await store.trace(T1.upper()) == got
    assert await store.trace(T2.replace("4", "5")) == []
    with pytest.raises(ValueError, match="32 hex digits"):
        await store.trace("nope")


@pytest.mark.anyio
async def test_summaries_name_the_root_and_count(store: TraceStore) -> None:
    await store.add(shop())
    found = {t.trace_id: t for t in await store.traces()}
    assert [t.trace_id for t in await store.traces()] == [T3, T2, T1]  # newest first
    checkout = found[T1]
    assert (checkout.root_service, checkout.root_name) == ("gateway", "POST /checkout")
    assert (checkout.start_ns, checkout.duration_ns) == (NOW + 100 * MS, 300 * MS)
    assert (checkout.span_count, checkout.error_count) == (5, 1)
    assert checkout.services == ("gateway", "orders", "payments")
    orphan = found[T3]
    assert (orphan.root_name, orphan.start_ns, orphan.span_count) == ("consume order.created", NOW + 650 * MS, 2)
    assert orphan.to_json()["services"] == ["orders"]


async def ids(store: TraceStore, **filters: Any) -> list[str]:
    return [t.trace_id for t in await store.traces(**filters)]


@pytest.mark.anyio
async def test_each_filter_selects_traces_by_one_matching_span(store: TraceStore) -> None:
    await store.add(shop())
    assert await ids(store, service="payments") == [T1]
    assert await ids(store, service="orders") == [T3, T1]
    assert await ids(store, operation="GET /healthz") == [T2]
    assert await ids(store, service="gateway", operation="charge") == []  # both on one span
    assert await ids(store, status="error") == [T1]
    assert await ids(store, status="unset", service="payments") == []
    assert await ids(store, min_duration_ns=250 * MS) == [T3, T1]
    assert await ids(store, max_duration_ns=2 * MS) == [T2]
    assert await ids(store, min_duration_ns=100 * MS, max_duration_ns=200 * MS) == [T1]
    assert await ids(store, since_ns=NOW + 450 * MS) == [T3, T2]
    assert await ids(store, until_ns=NOW + 105 * MS) == [T1]
    assert await ids(store, since_ns=NOW + 450 * MS, until_ns=NOW + 600 * MS) == [T2]
    assert await ids(store, limit=2) == [T3, T2]


@pytest.mark.anyio
async def test_attribute_filters_compare_values_as_text(store: TraceStore) -> None:
    await store.add(shop())
    assert await ids(store, attributes={"user": "ada"}) == [T1]
    assert await ids(store, attributes={"http.response.status_code": "502"}) == [T1]  # a number
    assert await ids(store, attributes={"http.response.status_code": "502.0"}) == [T1]
    assert await ids(store, attributes={"retried": "false"}) == [T2]  # a boolean
    assert await ids(store, attributes={"user": "ada", "retried": "false"}) == []  # same span
    assert await ids(store, attributes={"service.name": "payments"}) == [T1]  # resource attributes count too
    assert await ids(store, attributes={"order.id": "o-17"}, service="orders") == [T1]
    assert await ids(store, attributes={"user": "nobody"}) == []
    with pytest.raises(ValueError, match="attribute names"):
        await store.traces(attributes={'a"b': "x"})
    with pytest.raises(ValueError, match="status"):
        await store.traces(status="failed")
    with pytest.raises(ValueError, match="limit"):
        await store.traces(limit=0)


@pytest.mark.anyio
async def test_services_operations_and_dependencies(store: TraceStore) -> None:
    await store.add(shop())
    assert await store.services() == ["gateway", "orders", "payments"]
    assert await store.operations("orders") == ["POST", "POST /orders", "consume order.created"]
    assert await store.operations("nobody") == []
    assert await store.dependencies() == [Dependency("gateway", "orders", 1, 0), Dependency("orders", "payments", 1, 1)]
    assert await store.dependencies(since_ns=NOW + 125 * MS) == [Dependency("orders", "payments", 1, 1)]
    assert await store.dependencies(until_ns=NOW + 125 * MS) == [Dependency("gateway", "orders", 1, 0)]


@pytest.mark.anyio
async def test_a_span_sent_twice_is_stored_once(store: TraceStore) -> None:
    spans = shop()
    assert await store.add(spans[:3]) == 3
    assert await store.add(spans[:4]) == 1
    assert await store.count() == 4
    assert len(await store.trace(T1)) == 4


@pytest.mark.anyio
async def test_ingest_decodes_on_the_writer_and_one_bad_body_fails_alone(store: TraceStore) -> None:
    good = request(({"service.name": "a"}, [span(T1, "0000000000000001", "x", 0, 5)])).SerializeToString()
    also_good = json.dumps(otlp_json()).encode()
    results = await asyncio.gather(
        store.ingest(good), store.ingest(b"\xff\xff"), store.ingest(also_good, json=True), return_exceptions=True
    )
    assert results[0] == 1
    assert isinstance(results[1], OtlpDecodeError)
    assert results[2] == 1
    assert await store.services() == ["a", "checkout"]


@pytest.mark.anyio
async def test_invalid_records_are_rejected_before_the_store() -> None:
    async with await TraceStore.open() as store:
        for bad in (
            record("xyz", "0000000000000001", "s", "n", 0, 1),
            record(T1, "0000000000000001", "s", "n", 0, 1, kind="sideways"),
            record(T1, "0000000000000001", "s", "n", 0, 1, status_code="fine"),
            record(T1, "0000000000000001", "s", "n", 0, 1, attributes={"when": object()}),
        ):
            with pytest.raises(OtlpDecodeError):
                await store.add([bad])
        assert await store.count() == 0


@pytest.mark.anyio
async def test_retention_by_age_prunes_spans_operations_and_services() -> None:
    clock = FakeClock(wall_start=NOW / 1e9 + 10)
    async with await TraceStore.open(retention_seconds=60, max_spans=None, clock=clock) as store:
        await store.add(shop()[:5])  # T1, around NOW
        clock.advance(30)
        fresh = record(T2, "0000000000000011", "mailer", "send", 35_000, 35_100)
        await store.add([fresh])
        assert await store.prune() == 0
        clock.advance(40)  # T1 is now 80 s old, the mailer span 45 s
        assert await store.prune() == 5
        assert await store.services() == ["mailer"]
        assert await store.operations("gateway") == []
        assert await store.trace(T1) == []
        assert await store.trace(T2) == [fresh]


@pytest.mark.anyio
async def test_age_is_checked_on_insert_every_prune_interval() -> None:
    clock = FakeClock(wall_start=NOW / 1e9)
    async with await TraceStore.open(retention_seconds=10, max_spans=None, prune_interval=5, clock=clock) as store:
        await store.add([record(T1, "0000000000000001", "old", "x", 0, 1)])
        clock.advance(20)
        await store.add([record(T2, "0000000000000002", "new", "x", 20_000, 20_001)])
        assert await store.count() == 1
        assert await store.services() == ["new"]


@pytest.mark.anyio
async def test_max_spans_keeps_the_newest(tmp_path: Path) -> None:
    async with await TraceStore.open(tmp_path / "t.db", retention_seconds=None, max_spans=20) as store:
        spans = [record(f"{n + 1:032x}", f"{n + 1:016x}", "s", f"op{n}", n, n + 1) for n in range(25)]
        for n in range(0, 25, 5):  # the newest batches arrive first: age, not arrival, decides
            await store.add(spans[20 - n : 25 - n])
        # 25 > 20: the oldest go, down to 95% of max_spans, so that not every later insert prunes
        assert await store.count() == 19
        assert sorted(await ids(store, limit=100)) == sorted(s.trace_id for s in spans[6:])
        await store.add([record(T1, "00000000000000aa", "s", "late", 100, 101)])
        assert await store.count() == 20


@pytest.mark.anyio
async def test_two_stores_can_write_one_file(tmp_path: Path) -> None:
    """As two collector processes on one file do: each store its own connections and threads."""
    path = tmp_path / "t.db"
    async with (
        await TraceStore.open(path, retention_seconds=None) as one,
        await TraceStore.open(path, retention_seconds=None) as two,
    ):
        spans = shop()
        results = await asyncio.gather(*(store.add([s]) for s, store in zip(spans, [one, two] * 4, strict=True)))
        assert results == [1] * 8
        for store in (one, two):
            assert await store.trace(T1) == sorted(spans[:5], key=lambda s: s.start_ns)
            assert await store.count() == 8
        assert await one.add(spans) == 0
        db = sqlite3.connect(path)
        assert db.execute("SELECT count(*) FROM resources").fetchone() == (3,)
        assert db.execute("SELECT count(*) FROM traces").fetchone() == (3,)
        db.close()


@pytest.mark.anyio
async def test_stores_opening_a_new_file_together_all_open(tmp_path: Path) -> None:
    """Two connections creating one file's schema at once can be answered "locked" without a wait."""
    for n in range(15):
        path = tmp_path / f"t{n}.db"
        stores = await asyncio.gather(*(TraceStore.open(path) for _ in range(4)), return_exceptions=True)
        for store in stores:
            assert isinstance(store, TraceStore), store
            await store.aclose()


@pytest.mark.anyio
async def test_a_file_store_persists_and_checks_its_layout(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    async with await TraceStore.open(path, retention_seconds=None) as store:
        await store.add(shop())
    async with await TraceStore.open(path, retention_seconds=None) as store:
        assert len(await store.trace(T1)) == 5
        assert await store.services() == ["gateway", "orders", "payments"]
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(ConfigurationError, match="layout version 99"):
        await TraceStore.open(path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        await TraceStore.open(tmp_path / "missing" / "traces.db")


@pytest.mark.anyio
async def test_bad_options_are_configuration_errors() -> None:
    bad: list[dict[str, Any]] = [
        {"retention_seconds": 0},
        {"max_spans": 0},
        {"prune_interval": 0},
        {"max_pending_bytes": 0},
    ]
    for options in bad:
        with pytest.raises(ConfigurationError):
            await TraceStore.open(**options)


@pytest.mark.anyio
async def test_a_store_far_behind_refuses_more() -> None:
    async with await TraceStore.open(max_pending_bytes=1000) as store:
        body = request(({}, [span(T1, f"{n + 1:016x}", "x", 0, 1) for n in range(20)])).SerializeToString()
        first = asyncio.ensure_future(store.ingest(body))
        await asyncio.sleep(0)  # the first write is queued
        with pytest.raises(Unavailable, match="behind") as caught:
            await store.ingest(body)
        assert caught.value.retry_after == 1.0
        assert await first == 20


@pytest.mark.anyio
async def test_aclose_joins_the_threads_and_later_calls_fail(tmp_path: Path) -> None:
    store = await TraceStore.open(tmp_path / "t.db", retention_seconds=None)
    assert {t.name for t in threading.enumerate()} >= {"meshkit-trace-writer", "meshkit-trace-reader"}
    pending = asyncio.ensure_future(store.add(shop()))
    await asyncio.sleep(0)
    await store.aclose()
    assert await pending == 8  # queued writes finish before the close
    assert not {t.name for t in threading.enumerate()} & {"meshkit-trace-writer", "meshkit-trace-reader"}
    await store.aclose()
    with pytest.raises(Unavailable, match="closed"):
        await store.services()
    with pytest.raises(Unavailable, match="closed"):
        await store.add(shop())


def test_records_and_summaries_render_as_json() -> None:
    s = shop()[4]
    doc = s.to_json()
    assert doc["events"] == [
        {"name": "exception", "time_ns": NOW + 150 * MS, "attributes": {"exception.type": "Declined"}}
    ]
    assert doc["duration_ns"] == 150 * MS
    assert json.loads(json.dumps(doc)) == doc


@pytest.mark.anyio
async def test_large_batches_are_stored_in_pieces(tmp_path: Path) -> None:
    """Spans go in a few hundred per statement and trace ids a thousand per statement: every size of batch, over
    and under those, is stored whole, once, with roots' parents NULL."""
    path = tmp_path / "t.db"
    async with await TraceStore.open(path, retention_seconds=None, max_spans=None) as store:
        roots = [span(f"{n + 1:032x}", f"{n + 1:016x}", f"op{n % 3}", n, n + 1) for n in range(1100)]
        children = [
            span(f"{n + 1:032x}", f"{n + 5001:016x}", "child", n, n + 1, parent=f"{n + 1:016x}") for n in range(301)
        ]
        for size, new in ((1, 1), (255, 254), (256, 1), (257, 1)):
            part = request(({"service.name": f"s{size}"}, roots[:size])).SerializeToString()
            assert await store.ingest(part) == new
        body = request(({"service.name": "big"}, roots + children)).SerializeToString()
        assert await store.ingest(body) == 1401 - 257
        assert await store.count() == 1401
        assert await store.operations("big") == ["child", "op0", "op1", "op2"]
        trace = await store.trace(f"{7:032x}")
        assert [(s.name, s.parent_span_id) for s in trace] == [("op0", None), ("child", f"{7:016x}")]
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM traces").fetchone() == (1100,)
    assert db.execute("SELECT count(*) FROM spans WHERE parent_span_id IS NULL").fetchone() == (1100,)
    assert db.execute("SELECT count(*) FROM spans WHERE length(parent_span_id) = 8").fetchone() == (301,)
    db.close()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3000), st.sampled_from([1, 2, 256, 1024]))
def test_pieces_cover_the_rows_in_few_sizes(count: int, most: int) -> None:
    pieces = list(_pieces(count, most))
    assert [start for start, _ in pieces] == [sum(size for _, size in pieces[:n]) for n in range(len(pieces))]
    assert sum(size for _, size in pieces) == count
    sizes = {size for _, size in pieces}
    assert all(size == most or (size < most and size & (size - 1) == 0) for size in sizes)


@pytest.mark.anyio
async def test_a_new_file_gets_large_pages_and_an_older_file_keeps_its_own(tmp_path: Path) -> None:
    new, old, empty = tmp_path / "new.db", tmp_path / "old.db", tmp_path / "empty.db"
    db = sqlite3.connect(old)  # as an older meshkit made it: SQLite's default page size
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE unrelated (x)")
    db.close()
    empty.touch()
    for path in (new, old, empty):
        async with await TraceStore.open(path, retention_seconds=None) as store:
            assert await store.add(shop()) == 8
            assert len(await store.trace(T1)) == 5
    pages = {}
    for path in (new, old, empty):
        db = sqlite3.connect(path)
        pages[path.name] = db.execute("PRAGMA page_size").fetchone()[0]
        db.close()
    assert pages == {"new.db": 16384, "old.db": 4096, "empty.db": 16384}


@pytest.mark.anyio
async def test_the_reader_thread_checkpoints_the_wal_beside_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans reach the database file itself while the store is open (not only its WAL): a checkpoint ran on the
    reader thread. The writer's own automatic checkpoint would wait for 64 MiB of WAL."""
    monkeypatch.setattr("meshkit.tracing.collector._CHECKPOINT_SPANS", 10)
    path = tmp_path / "t.db"
    async with await TraceStore.open(path, retention_seconds=None, max_spans=None) as store:
        before = path.stat().st_size
        for n in range(3):
            await store.add([record(f"{n + 1:032x}", f"{m + 1:016x}", "s", "x", m, m + 1) for m in range(5)])
        deadline = asyncio.get_running_loop().time() + 30
        while path.stat().st_size <= before:
            assert asyncio.get_running_loop().time() < deadline, "no checkpoint reached the database file"
            await asyncio.sleep(0.01)
        assert await store.count() == 15
        assert len(await store.traces()) == 3
