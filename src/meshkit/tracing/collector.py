"""meshkit's built-in trace collector: OTLP decoding and a SQLite span store with a query API.

Any OpenTelemetry SDK exports spans to it over OTLP/HTTP (:mod:`meshkit.tracing.receiver` serves ``/v1/traces``);
the dashboard and ``curl`` read them back through :class:`TraceStore`'s queries. It is the embedded default of
DESIGN.md: one file, no server; past one machine, export OTLP to Jaeger, Tempo or any OTel collector instead.

- :func:`decode_otlp_protobuf` / :func:`decode_otlp_json` turn an ``ExportTraceServiceRequest`` body into
  :class:`SpanRecord` values. Malformed input raises :class:`OtlpDecodeError` (a ``ValueError``) with a message that
  says what is wrong and where; no protobuf internals leak out.
- :class:`SpanBatch` is the same spans already encoded for storage (decoding straight into it skips a Python
  object per span); :meth:`TraceStore.add` takes either form, :meth:`TraceStore.ingest` a raw OTLP body.
- :class:`TraceStore` keeps spans in SQLite (stdlib ``sqlite3``, WAL) and answers: :meth:`~TraceStore.traces`
  (trace summaries filtered by service, operation, status, duration, time and attributes),
  :meth:`~TraceStore.trace`, :meth:`~TraceStore.services`, :meth:`~TraceStore.operations`,
  :meth:`~TraceStore.dependencies` (calls between services, for the topology map), with retention by age and by
  count (:meth:`~TraceStore.prune`).

Layout of the file (plain SQL readers are welcome; ids are raw bytes, ``hex(trace_id)`` shows them)::

    spans(seq, trace_seq, trace_id, span_id, parent_span_id, name, kind, service, start_ns, end_ns, duration_ns,
          status, status_message, attributes JSON, events JSON, links JSON, scope, resource_id)
    traces(seq, trace_id UNIQUE)               one row per trace: spans point at it by ``trace_seq``
    resources(id, attributes JSON UNIQUE, last_seen_ns)      resource attributes, stored once
    operations(service, name, last_seen_ns)    what services() and operations() list

Why ``traces``: trace ids are random, and an index on a random key costs a scattered page write per span. Spans
point at a trace number handed out in arrival order instead, so their trace index grows at its end like the time
indexes do; only the first span of a trace touches the random ``traces`` index, later spans (from other services,
in other batches) only read it. Durations are not indexed for the same reason (they arrive in random order and an
index on them halved the ingest rate): a duration filter is checked on the spans the other filters select.

What a span costs, and what was done about it (``benchmarks/tracing_collector.py`` measures it): decoding is
about half of the work, the insert the other half. The decoder reads a lite twin of OTLP's message classes whose
attributes stay encoded bytes (one JSON text per distinct attribute of a request, not two Python objects per
attribute), and it decodes a scope's spans column by column with ``map`` and ``zip``, so that per-span work runs in
C. The insert binds ids as ``bytearray`` (``sqlite3`` binds bytes and None through its adapter lookup, which cost
a third of the insert), writes 256 spans per statement, and new files get 16 KiB pages.

Threads: every database call runs on a thread the store owns, never on the event loop (a dedicated thread rather
than ``asyncio.to_thread``, because SQLite wants one writer and a connection is best kept on one thread). One
writer thread holds the only write connection; writes that queue up while it is busy are committed together in one
transaction (group commit). :meth:`TraceStore.ingest` decodes OTLP bodies on that same thread, between its
database calls: ``sqlite3`` lets go of the GIL for every statement it runs, and a decoder running on another thread
kept it each time, for up to the interpreter's 5 ms switch interval (with one statement per row this halved the
ingest rate; with 256 rows per statement a separate decoder thread measured no better than this). A file store
has a second thread with a read-only connection, so queries are not stuck behind a burst of inserts (WAL lets
readers run beside the writer); it also runs the WAL checkpoints, beside the writer. ``":memory:"`` has one
connection, so reads share the writer's thread. Both threads are joined by :meth:`TraceStore.aclose`. One process
thus ingests on about one core (about 30,000 spans/s on the shared benchmark machine of 2026-11-24, where the code
before these changes did 24,000 in the same runs; see docs/collector.md); to use more, run several processes on
one file (see :class:`TraceStore`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import math
import operator
import os
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from json.encoder import encode_basestring
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, NamedTuple, TypeVar, cast

from meshkit._core.clock import Clock, MonotonicClock
from meshkit._core.optional import require
from meshkit._core.sqlite import open_database, write_transaction
from meshkit.errors import ConfigurationError, Unavailable

__all__ = [
    "KINDS",
    "STATUS_CODES",
    "Dependency",
    "OtlpDecodeError",
    "SpanBatch",
    "SpanEvent",
    "SpanLink",
    "SpanRecord",
    "TraceStore",
    "TraceSummary",
    "decode_otlp_json",
    "decode_otlp_protobuf",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: OpenTelemetry span kinds by their OTLP enum value (0, unspecified, is read as internal, as the spec allows).
KINDS: Final = ("internal", "internal", "server", "client", "producer", "consumer")
#: Span status codes by their OTLP enum value.
STATUS_CODES: Final = ("unset", "ok", "error")

_KIND_BY_VALUE: Final = MappingProxyType(dict(enumerate(KINDS)))
_STATUS_BY_VALUE: Final = MappingProxyType(dict(enumerate(STATUS_CODES)))
_KIND_NAMES: Final = frozenset(KINDS)
_JSON_KINDS: Final = MappingProxyType(
    {f"SPAN_KIND_{name.upper()}": value for value, name in enumerate(KINDS)} | {"SPAN_KIND_UNSPECIFIED": 0}
)
_JSON_STATUS: Final = MappingProxyType(
    {f"STATUS_CODE_{name.upper()}": value for value, name in enumerate(STATUS_CODES)}
)
_NON_FINITE: Final = MappingProxyType({math.inf: "Infinity", -math.inf: "-Infinity"})
_MAX_DEPTH = 32  # nesting of array / kvlist attribute values
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1
_UNKNOWN_SERVICE = "unknown_service"
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)


class OtlpDecodeError(ValueError):
    """An OTLP body (or a span handed to the store) is malformed; the message says what and where."""


# -- the values ----------------------------------------------------------------------------------------------------


class SpanEvent(NamedTuple):
    """A timed event on a span (``span.add_event``); exceptions are events named ``exception``."""

    name: str
    time_ns: int
    attributes: dict[str, Any]


class SpanLink(NamedTuple):
    """A link from a span to another span (of this trace or another one)."""

    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanRecord:
    """One span as the store keeps it.

    Ids are lower-case hex (32 digits for a trace, 16 for a span); times are Unix nanoseconds. ``kind`` is one of
    :data:`KINDS`, ``status_code`` one of :data:`STATUS_CODES`. ``service`` is the resource's ``service.name``.
    Attribute values are JSON values: strings, numbers, booleans, None, lists and dicts (OTLP arrays and kvlists);
    bytes are base64 strings and non-finite doubles the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, as in
    the OTLP/JSON mapping.
    """

    trace_id: str
    span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    parent_span_id: str | None = None
    kind: str = "internal"
    status_code: str = "unset"
    status_message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[SpanEvent] = field(default_factory=list)
    links: list[SpanLink] = field(default_factory=list)
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""

    @property
    def duration_ns(self) -> int:
        """``end_ns - start_ns`` (0 when the clock that timed the span went backwards)."""
        return max(self.end_ns - self.start_ns, 0)

    def to_json(self) -> dict[str, Any]:
        """The span as a JSON object (the query API's shape)."""
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "kind": self.kind,
            "service": self.service,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ns": self.duration_ns,
            "status_code": self.status_code,
            "status_message": self.status_message,
            "attributes": self.attributes,
            "events": [{"name": e.name, "time_ns": e.time_ns, "attributes": e.attributes} for e in self.events],
            "links": [{"trace_id": k.trace_id, "span_id": k.span_id, "attributes": k.attributes} for k in self.links],
            "resource": self.resource,
            "scope": self.scope,
        }


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """One line of a trace search: the root span, the extent of the trace and what it touched.

    The root is the span without a parent (or, while the root has not arrived, the earliest span whose parent is
    not in the trace). ``services`` is sorted.
    """

    trace_id: str
    root_service: str
    root_name: str
    start_ns: int
    duration_ns: int
    span_count: int
    error_count: int
    services: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "root_service": self.root_service,
            "root_name": self.root_name,
            "start_ns": self.start_ns,
            "duration_ns": self.duration_ns,
            "span_count": self.span_count,
            "error_count": self.error_count,
            "services": list(self.services),
        }


class Dependency(NamedTuple):
    """Calls from ``caller`` to ``callee``: child spans in ``callee`` whose parent span is in ``caller``.

    ``errors`` counts the calls whose child span has an error status.
    """

    caller: str
    callee: str
    calls: int
    errors: int


# -- encoding for storage ------------------------------------------------------------------------------------------

# A row is the spans table's bound columns, in this order (trace_seq and resource_id are filled in by the insert).
_COLUMNS = (
    "trace_id, span_id, parent_span_id, name, kind, service, start_ns, end_ns, duration_ns, status, status_message,"
    " attributes, events, links, scope"
)
# Ids are ``bytearray`` (an empty parent is no parent; the insert turns it into NULL): ``sqlite3`` binds ints,
# floats, str and bytearray directly, but looks every other type (``bytes``, ``None``) up in its adapter registry
# first, which failed two attribute lookups per value and cost more than a third of the insert.
Row = tuple[bytearray, bytearray, bytearray, str, str, str, int, int, int, str, str, str, str, str, str]
_START = operator.itemgetter(6)
_OPERATION = operator.itemgetter(5, 3)


@dataclass(frozen=True, slots=True)
class _Group:
    """The spans of one resource: its attributes as JSON (sorted keys, so equal resources store once), rows, and
    the distinct trace ids of the rows (for the ``traces`` table)."""

    resource: str
    rows: list[Row]
    traces: list[bytearray]


@dataclass(frozen=True, slots=True)
class SpanBatch:
    """Spans decoded and already encoded for storage (ids as bytes, attributes as JSON text), grouped by resource.

    :meth:`TraceStore.ingest` decodes request bodies straight into this form (:meth:`from_protobuf`), which skips
    building Python objects per span and per attribute; :meth:`records` turns it into :class:`SpanRecord` values.
    """

    groups: tuple[_Group, ...]

    def __len__(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    @classmethod
    def from_protobuf(cls, body: bytes) -> SpanBatch:
        """Decode a binary ``ExportTraceServiceRequest``; raises :class:`OtlpDecodeError`."""
        return _ProtobufDecoder(_otlp()).decode(body)

    @classmethod
    def from_json(cls, body: bytes | str) -> SpanBatch:
        """Decode an OTLP/JSON ``ExportTraceServiceRequest``; raises :class:`OtlpDecodeError`."""
        return cls.from_records(decode_otlp_json(body))

    @classmethod
    def from_records(cls, spans: Iterable[SpanRecord]) -> SpanBatch:
        """Encode spans for storage; raises :class:`OtlpDecodeError` if one is invalid (a bad id, kind, value)."""
        groups: dict[str, tuple[list[Row], dict[bytes, bytearray]]] = {}
        for n, span in enumerate(spans):
            try:
                resource = _dumps(_json_safe(dict(span.resource)), sort_keys=True)
                row = _row_from_record(span)
            except (ValueError, TypeError) as exc:
                raise OtlpDecodeError(f"span {n} ({span.name!r}): {exc}") from exc
            rows, traces = groups.setdefault(resource, ([], {}))
            rows.append(row)
            traces.setdefault(bytes(row[0]), row[0])
        return cls(tuple(_Group(resource, rows, list(traces.values())) for resource, (rows, traces) in groups.items()))

    def records(self) -> list[SpanRecord]:
        """The spans as :class:`SpanRecord` values, in the order they came."""
        out: list[SpanRecord] = []
        for group in self.groups:
            resource = json.loads(group.resource)
            out.extend(_record(row, dict(resource)) for row in group.rows)
        return out


def _dumps(value: Any, *, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=sort_keys)


def _value_text(value: Any) -> str:
    """An attribute value (already a JSON value) as JSON text; the same text whichever decoder produced it."""
    if value.__class__ is str:
        return encode_basestring(value)
    return _dumps(value)


def _attributes_text(attributes: Mapping[str, Any]) -> str:
    if not attributes:
        return "{}"
    return "{" + ",".join(encode_basestring(k) + ":" + _value_text(v) for k, v in attributes.items()) + "}"


def _event_text(name: str, time_ns: int, attributes: str) -> str:
    return '{"name":' + encode_basestring(name) + ',"time_ns":' + str(time_ns) + ',"attributes":' + attributes + "}"


def _link_text(trace_id: str, span_id: str, attributes: str) -> str:
    return '{"trace_id":"' + trace_id + '","span_id":"' + span_id + '","attributes":' + attributes + "}"


def _id_bytes(value: str, size: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != size or len(value) != 2 * size:
        raise OtlpDecodeError(f"{what} must be {2 * size} hex digits, got {value!r}")
    if raw == bytes(size):
        raise OtlpDecodeError(f"{what} must not be all zeros")
    return raw


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Check that ``value`` is a JSON value the store keeps as it is (non-finite floats become strings)."""
    if depth > _MAX_DEPTH:
        raise OtlpDecodeError(f"attribute values are nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _NON_FINITE.get(value, "NaN")
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise OtlpDecodeError("attribute keys must be strings")
        return {k: _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise OtlpDecodeError(f"attribute values must be JSON values, got {type(value).__name__}")


def _row_from_record(span: SpanRecord) -> Row:
    if span.kind not in _KIND_NAMES:
        raise OtlpDecodeError(f"kind must be one of {', '.join(KINDS[1:])}, got {span.kind!r}")
    if span.status_code not in STATUS_CODES:
        raise OtlpDecodeError(f"status_code must be one of {', '.join(STATUS_CODES)}, got {span.status_code!r}")
    events = (
        "["
        + ",".join(
            _event_text(e.name, int(e.time_ns), _attributes_text(_json_safe(dict(e.attributes)))) for e in span.events
        )
        + "]"
    )
    links = (
        "["
        + ",".join(
            _link_text(
                _id_bytes(k.trace_id, 16, "link trace_id").hex(),
                _id_bytes(k.span_id, 8, "link span_id").hex(),
                _attributes_text(_json_safe(dict(k.attributes))),
            )
            for k in span.links
        )
        + "]"
    )
    start, end = int(span.start_ns), int(span.end_ns)
    return (
        bytearray(_id_bytes(span.trace_id, 16, "trace_id")),
        bytearray(_id_bytes(span.span_id, 8, "span_id")),
        bytearray(_id_bytes(span.parent_span_id, 8, "parent_span_id") if span.parent_span_id else b""),
        str(span.name),
        span.kind,
        str(span.service),
        start,
        end,
        max(end - start, 0),
        span.status_code,
        str(span.status_message),
        _attributes_text(_json_safe(dict(span.attributes))),
        events,
        links,
        str(span.scope),
    )


def _record(row: Sequence[Any], resource: dict[str, Any]) -> SpanRecord:
    """A :class:`SpanRecord` from a row (in :data:`_COLUMNS` order) and its resource attributes."""
    parent = row[2]
    return SpanRecord(
        trace_id=row[0].hex(),
        span_id=row[1].hex(),
        parent_span_id=parent.hex() if parent else None,
        name=row[3],
        kind=row[4],
        service=row[5],
        start_ns=row[6],
        end_ns=row[7],
        status_code=row[9],
        status_message=row[10],
        attributes=json.loads(row[11]),
        events=[SpanEvent(e["name"], e["time_ns"], e["attributes"]) for e in json.loads(row[12])],
        links=[SpanLink(k["trace_id"], k["span_id"], k["attributes"]) for k in json.loads(row[13])],
        resource=resource,
        scope=row[14],
    )


# -- OTLP protobuf -------------------------------------------------------------------------------------------------


class _Otlp(NamedTuple):
    """The protobuf classes the decoder uses: OTLP's own, and a "lite" twin of the request (see _lite_classes)."""

    request: Any  # the lite ExportTraceServiceRequest
    key_value: Any
    resource: Any
    scope: Any
    status: Any
    decode_error: type[Exception]


@functools.cache
def _otlp() -> _Otlp:
    """Import the protobuf classes on first use (meshkit's import does no work), once."""
    require("opentelemetry.proto.collector.trace.v1.trace_service_pb2", "otel")
    common = require("opentelemetry.proto.common.v1.common_pb2", "otel")
    resource = require("opentelemetry.proto.resource.v1.resource_pb2", "otel")
    trace = require("opentelemetry.proto.trace.v1.trace_pb2", "otel")
    message = require("google.protobuf.message", "otel")
    return _Otlp(
        _lite_request(),
        common.KeyValue,
        resource.Resource,
        common.InstrumentationScope,
        trace.Status,
        message.DecodeError,
    )


def _lite_request() -> Any:
    """A message type wire-compatible with ``ExportTraceServiceRequest`` whose leaves stay raw bytes.

    Reading a span's attributes through OTLP's own classes builds two Python objects per attribute (the
    ``KeyValue`` and its ``AnyValue``), and that was four fifths of the decoding time. This twin declares the
    attributes (and the resource, the scope and the status) as ``bytes``: the upb parser hands each attribute over
    as its encoded bytes, and the decoder turns those into JSON text once per distinct attribute in a request
    (``http.method=GET`` repeats in every span; only the values that differ are parsed, by OTLP's ``KeyValue``).
    Field numbers and wire types are OTLP's (``opentelemetry/proto/trace/v1/trace.proto``); an enum is an int32 on
    the wire, a message and a bytes field are both length-delimited.
    """
    descriptor_pb2 = require("google.protobuf.descriptor_pb2", "otel")
    descriptor_pool = require("google.protobuf.descriptor_pool", "otel")
    message_factory = require("google.protobuf.message_factory", "otel")
    fdp = descriptor_pb2.FieldDescriptorProto
    package = "meshkit.tracing.otlp_lite"
    file = descriptor_pb2.FileDescriptorProto(name="meshkit/tracing/otlp_lite.proto", package=package, syntax="proto3")
    types = {"bytes": fdp.TYPE_BYTES, "string": fdp.TYPE_STRING, "int32": fdp.TYPE_INT32, "fixed64": fdp.TYPE_FIXED64}
    messages = {
        "Request": [(1, "resource_spans", "ResourceSpans*")],
        "ResourceSpans": [(1, "resource", "bytes"), (2, "scope_spans", "ScopeSpans*")],
        "ScopeSpans": [(1, "scope", "bytes"), (2, "spans", "Span*")],
        "Span": [
            (1, "trace_id", "bytes"),
            (2, "span_id", "bytes"),
            (4, "parent_span_id", "bytes"),
            (5, "name", "string"),
            (6, "kind", "int32"),
            (7, "start_time_unix_nano", "fixed64"),
            (8, "end_time_unix_nano", "fixed64"),
            (9, "attributes", "bytes*"),
            (11, "events", "Event*"),
            (13, "links", "Link*"),
            (15, "status", "bytes"),
        ],
        "Event": [(1, "time_unix_nano", "fixed64"), (2, "name", "string"), (3, "attributes", "bytes*")],
        "Link": [(1, "trace_id", "bytes"), (2, "span_id", "bytes"), (4, "attributes", "bytes*")],
    }
    for name, fields in messages.items():
        message = file.message_type.add(name=name)
        for number, field_name, spec in fields:
            repeated = spec.endswith("*")
            kind = spec.rstrip("*")
            label = fdp.LABEL_REPEATED if repeated else fdp.LABEL_OPTIONAL
            f = message.field.add(name=field_name, number=number, label=label)
            if kind in types:
                f.type = types[kind]
            else:
                f.type = fdp.TYPE_MESSAGE
                f.type_name = f".{package}.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Request"))


def _any_value(value: Any, depth: int = 0) -> Any:
    """An OTLP ``AnyValue`` message as a JSON value (see :class:`SpanRecord` for the mapping)."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return value.int_value
    if which == "bool_value":
        return value.bool_value
    if which == "double_value":
        d = value.double_value
        return d if math.isfinite(d) else _NON_FINITE.get(d, "NaN")
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if depth >= _MAX_DEPTH and which in ("array_value", "kvlist_value"):
        raise OtlpDecodeError(f"attribute values are nested deeper than {_MAX_DEPTH} levels")
    if which == "array_value":
        return [_any_value(v, depth + 1) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value, depth + 1) for kv in value.kvlist_value.values}
    return None  # an empty AnyValue (or a variant newer than this decoder)


class _AttributeTexts(dict[bytes, str]):
    """Attribute JSON texts (``"key":value``) by encoded ``KeyValue``, for one request: a text not seen before in
    it is made (and kept) by ``__missing__``, so that ``map(texts.__getitem__, ...)`` stays in C for the others.

    The common case goes without the ``KeyValue`` class: a string value, key and value under 128 bytes, so every
    length is one byte: ``0x0A len key 0x12 len+2 0x0A len value``. The bytes before the value (the head) repeat
    whenever a key does with a value of the same length; a head seen before, and checked then, gives the key's text
    at once. Anything else takes the general path.
    """

    __slots__ = ("_heads", "_key_value")

    def __init__(self, key_value: Any) -> None:
        super().__init__()
        self._key_value = key_value
        self._heads: dict[bytes, str] = {}

    def __missing__(self, raw: bytes) -> str:
        size = len(raw)
        if 1 < size < 130:
            end = raw[1] + 6
            key = self._heads.get(raw[:end])
            if key is None and raw[0] == 0x0A:
                k = end - 4
                if (
                    end <= size
                    and raw[k] == 0x12
                    and raw[k + 1] == size - k - 2
                    and raw[k + 2] == 0x0A
                    and raw[k + 3] == size - end
                ):
                    try:  # noqa: SIM105 - contextlib.suppress costs a microsecond, as much as the rest
                        key = self._heads[raw[:end]] = encode_basestring(raw[2:k].decode()) + ":"
                    except UnicodeDecodeError:
                        pass  # the general path reports it
            if key is not None and size == end + raw[end - 1]:
                try:
                    text = self[raw] = key + encode_basestring(raw[end:].decode())
                except UnicodeDecodeError:
                    pass
                else:
                    return text
        kv = self._key_value.FromString(raw)
        text = self[raw] = encode_basestring(kv.key) + ":" + _value_text(_any_value(kv.value))
        return text


class _Made(dict[Any, T]):
    """A dict that makes (and keeps) a missing value with ``make``: lookups of known keys stay in C (``map`` over
    ``__getitem__``), only the new ones run Python."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[Any], T]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: Any) -> T:
        value = self[key] = self._make(key)
        return value


# One C call for every field of a (lite) span the decoder reads.
_SPAN_FIELDS: Final = operator.attrgetter(
    "trace_id",
    "span_id",
    "parent_span_id",
    "name",
    "kind",
    "start_time_unix_nano",
    "end_time_unix_nano",
    "attributes",
    "events",
    "links",
    "status",
)


class _ProtobufDecoder:
    """Decodes one request body; holds the per-request caches of encoded attributes and statuses.

    A scope's spans are decoded column by column (every trace id, then every span id, ...) with ``map`` and
    ``zip``, so the per-span work runs in C; only what is new in the request (an attribute or a status not seen in
    it before) runs Python code.
    """

    __slots__ = ("_attributes", "_kinds", "_otlp", "_statuses")

    def __init__(self, otlp: _Otlp) -> None:
        self._otlp = otlp
        self._attributes = _AttributeTexts(otlp.key_value)
        self._statuses: _Made[tuple[str, str]] = _Made(self._status)
        self._kinds: _Made[str] = _Made(lambda _: "internal")  # 0 (unspecified) and values newer than this code
        self._kinds.update(_KIND_BY_VALUE)

    def decode(self, body: bytes) -> SpanBatch:
        otlp = self._otlp
        try:
            request = otlp.request.FromString(body)
        except otlp.decode_error as exc:
            raise OtlpDecodeError("the body is not a valid protobuf ExportTraceServiceRequest") from exc
        try:
            return SpanBatch(tuple(self._group(n, rs) for n, rs in enumerate(request.resource_spans)))
        except otlp.decode_error as exc:  # a nested message (an attribute, a status, a resource) is broken
            raise OtlpDecodeError(
                "the body is not a valid protobuf ExportTraceServiceRequest: an attribute, status, resource or scope"
                " in it does not parse (or holds a string that is not UTF-8)"
            ) from exc

    def _group(self, n: int, resource_spans: Any) -> _Group:
        resource = {
            kv.key: _any_value(kv.value) for kv in self._otlp.resource.FromString(resource_spans.resource).attributes
        }
        service = resource.get("service.name")
        service = service if isinstance(service, str) and service else _UNKNOWN_SERVICE
        rows: list[Row] = []
        traces: dict[bytes, bytearray] = {}
        for m, scope_spans in enumerate(resource_spans.scope_spans):
            spans = scope_spans.spans
            if spans:
                scope = self._otlp.scope.FromString(scope_spans.scope).name
                rows.extend(self._spans(spans, service, scope, traces, (n, m)))
        return _Group(_dumps(resource, sort_keys=True), rows, list(traces.values()))

    def _spans(
        self, spans: Any, service: str, scope: str, traces: dict[bytes, bytearray], where: tuple[int, int]
    ) -> Iterable[Row]:
        """The rows of one scope's spans; adds their new trace ids to ``traces``."""
        trace_ids, span_ids, parents, names, kinds, starts, ends, attributes, events, links, statuses = zip(
            *map(_SPAN_FIELDS, spans), strict=True
        )
        new = [t for t in dict.fromkeys(trace_ids) if t not in traces]
        if (
            not {16}.issuperset(map(len, new))
            or not {8}.issuperset(map(len, span_ids))
            or not {0, 8}.issuperset(map(len, parents))
            or _ZERO_TRACE in new
            or _ZERO_SPAN in span_ids
        ):
            raise self._bad_ids(where, trace_ids, span_ids, parents)
        traces.update(zip(new, map(bytearray, new), strict=True))
        join = ",".join
        text = self._attributes.__getitem__
        codes, messages = zip(*map(self._statuses.__getitem__, statuses), strict=True)
        durations = list(map(operator.sub, ends, starts))
        if min(durations) < 0:  # a clock went backwards
            durations = [max(d, 0) for d in durations]
        return cast(
            "Iterable[Row]",
            zip(
                map(traces.__getitem__, trace_ids),
                map(bytearray, span_ids),
                map(bytearray, parents),  # empty: no parent (see Row)
                names,
                map(self._kinds.__getitem__, kinds),
                repeat(service),
                starts,
                ends,
                durations,
                codes,
                messages,
                [f"{{{join(map(text, raw))}}}" if raw else "{}" for raw in attributes],
                [self._events(e) if e else "[]" for e in events] if any(events) else repeat("[]"),
                [self._links(k, (*where, i)) if k else "[]" for i, k in enumerate(links)]
                if any(links)
                else repeat("[]"),
                repeat(scope),
            ),
        )

    def _attributes_of(self, raws: Iterable[bytes]) -> str:
        return "{" + ",".join(map(self._attributes.__getitem__, raws)) + "}"

    def _status(self, raw: bytes) -> tuple[str, str]:
        """A span's status (code, message), from its encoded ``Status``; cached for the request."""
        status = self._otlp.status.FromString(raw)
        return (_STATUS_BY_VALUE.get(status.code, "unset"), status.message)

    def _events(self, events: Any) -> str:
        parts = [_event_text(e.name, e.time_unix_nano, self._attributes_of(e.attributes)) for e in events]
        return "[" + ",".join(parts) + "]"

    def _links(self, links: Any, where: tuple[int, int, int]) -> str:
        parts = []
        for link in links:
            if len(link.trace_id) != 16 or len(link.span_id) != 8:
                n, m, k = where
                raise OtlpDecodeError(
                    f"resource_spans[{n}].scope_spans[{m}].spans[{k}]: a link's trace_id must be 16 bytes and its"
                    f" span_id 8 bytes, got {len(link.trace_id)} and {len(link.span_id)}"
                )
            parts.append(_link_text(link.trace_id.hex(), link.span_id.hex(), self._attributes_of(link.attributes)))
        return "[" + ",".join(parts) + "]"

    @staticmethod
    def _bad_ids(
        where: tuple[int, int], trace_ids: Sequence[bytes], span_ids: Sequence[bytes], parents: Sequence[bytes]
    ) -> OtlpDecodeError:
        """The error for the first span of a scope whose ids are wrong (one is, or this is not called)."""
        n, m = where
        for k, (trace_id, span_id, parent) in enumerate(zip(trace_ids, span_ids, parents, strict=True)):
            at = f"resource_spans[{n}].scope_spans[{m}].spans[{k}]"
            if len(trace_id) != 16 or len(span_id) != 8 or len(parent) not in (0, 8):
                return OtlpDecodeError(
                    f"{at}: trace_id must be 16 bytes, span_id and parent_span_id 8 bytes (or no parent), got"
                    f" {len(trace_id)}, {len(span_id)} and {len(parent)}"
                )
            if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
                return OtlpDecodeError(f"{at}: an id is all zeros")
        raise AssertionError("no span has a wrong id")  # pragma: no cover


def decode_otlp_protobuf(body: bytes) -> list[SpanRecord]:
    """The spans of a binary (``application/x-protobuf``) ``ExportTraceServiceRequest``.

    Raises :class:`OtlpDecodeError` when the body is not one, or a span has ids of the wrong size.
    """
    return SpanBatch.from_protobuf(body).records()


# -- OTLP/JSON -----------------------------------------------------------------------------------------------------


def decode_otlp_json(body: bytes | str) -> list[SpanRecord]:
    """The spans of an OTLP/JSON (``application/json``) ``ExportTraceServiceRequest``.

    Follows the OTLP/JSON mapping: lowerCamelCase field names (the proto names, ``resource_spans``, are accepted
    too), trace and span ids as hex strings, enums as integers (their names are accepted too), 64-bit integers
    (``intValue``, times) as strings or numbers, ``bytesValue`` in base64. Unknown fields are ignored, as the
    spec asks. Raises :class:`OtlpDecodeError` naming the path of the first bad value.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise OtlpDecodeError(f"the body is not valid JSON: {exc}") from exc
    try:
        return list(_JsonDecoder().request(document))
    except RecursionError as exc:
        raise OtlpDecodeError("the document is nested too deeply") from exc


class _JsonDecoder:
    def request(self, document: Any) -> Iterable[SpanRecord]:
        if not isinstance(document, dict):
            raise OtlpDecodeError(f"the document must be a JSON object, got {_json_type(document)}")
        for n, rs in enumerate(self._list(document, "resourceSpans", "resource_spans", "")):
            where = f"resourceSpans[{n}]"
            self._object(rs, where)
            resource_doc = self._field(rs, "resource", "resource")
            resource: dict[str, Any] = {}
            if resource_doc is not None:
                self._object(resource_doc, f"{where}.resource")
                resource = self._attributes(resource_doc, f"{where}.resource")
            service = resource.get("service.name")
            service = service if isinstance(service, str) and service else _UNKNOWN_SERVICE
            for m, ss in enumerate(self._list(rs, "scopeSpans", "scope_spans", where)):
                where_scope = f"{where}.scopeSpans[{m}]"
                self._object(ss, where_scope)
                scope_doc = self._field(ss, "scope", "scope")
                scope = ""
                if scope_doc is not None:
                    self._object(scope_doc, f"{where_scope}.scope")
                    scope = self._string(scope_doc, "name", "name", f"{where_scope}.scope")
                for k, span in enumerate(self._list(ss, "spans", "spans", where_scope)):
                    yield self._span(span, f"{where_scope}.spans[{k}]", service, resource, scope)

    def _span(self, span: Any, where: str, service: str, resource: dict[str, Any], scope: str) -> SpanRecord:
        self._object(span, where)
        status_doc = self._field(span, "status", "status")
        code, message = 0, ""
        if status_doc is not None:
            self._object(status_doc, f"{where}.status")
            code = self._enum(status_doc, "code", _JSON_STATUS, f"{where}.status")
            message = self._string(status_doc, "message", "message", f"{where}.status")
        parent = self._string(span, "parentSpanId", "parent_span_id", where)
        start = self._uint64(span, "startTimeUnixNano", "start_time_unix_nano", where)
        end = self._uint64(span, "endTimeUnixNano", "end_time_unix_nano", where)
        return SpanRecord(
            trace_id=self._id(span, "traceId", "trace_id", 16, where),
            span_id=self._id(span, "spanId", "span_id", 8, where),
            parent_span_id=self._id(span, "parentSpanId", "parent_span_id", 8, where) if parent else None,
            name=self._string(span, "name", "name", where),
            kind=_KIND_BY_VALUE.get(self._enum(span, "kind", _JSON_KINDS, where), "internal"),
            service=service,
            start_ns=start,
            end_ns=end,
            status_code=_STATUS_BY_VALUE.get(code, "unset"),
            status_message=message,
            attributes=self._attributes(span, where),
            events=[
                self._event(e, f"{where}.events[{i}]")
                for i, e in enumerate(self._list(span, "events", "events", where))
            ],
            links=[
                self._link(k, f"{where}.links[{i}]") for i, k in enumerate(self._list(span, "links", "links", where))
            ],
            resource=dict(resource),
            scope=scope,
        )

    def _event(self, event: Any, where: str) -> SpanEvent:
        self._object(event, where)
        return SpanEvent(
            self._string(event, "name", "name", where),
            self._uint64(event, "timeUnixNano", "time_unix_nano", where),
            self._attributes(event, where),
        )

    def _link(self, link: Any, where: str) -> SpanLink:
        self._object(link, where)
        return SpanLink(
            self._id(link, "traceId", "trace_id", 16, where),
            self._id(link, "spanId", "span_id", 8, where),
            self._attributes(link, where),
        )

    def _attributes(self, holder: dict[str, Any], where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, kv in enumerate(self._list(holder, "attributes", "attributes", where)):
            key, value = self._key_value(kv, f"{where}.attributes[{i}]", 0)
            out[key] = value
        return out

    def _key_value(self, kv: Any, where: str, depth: int) -> tuple[str, Any]:
        self._object(kv, where)
        key = self._string(kv, "key", "key", where)
        value = self._field(kv, "value", "value")
        return key, (None if value is None else self._any_value(value, f"{where}.value", depth))

    def _any_value(self, value: Any, where: str, depth: int) -> Any:
        self._object(value, where)
        present = [k for k in value if k in _ANY_VALUE_FIELDS]
        if not present:
            return None
        if len(present) > 1:
            raise OtlpDecodeError(f"{where}: an AnyValue holds one value, got {', '.join(present)}")
        key = present[0]
        kind = _ANY_VALUE_FIELDS[key]
        v = value[key]
        at = f"{where}.{key}"
        if kind == "string":
            if not isinstance(v, str):
                raise OtlpDecodeError(f"{at}: expected a string, got {_json_type(v)}")
            return v
        if kind == "bool":
            if not isinstance(v, bool):
                raise OtlpDecodeError(f"{at}: expected true or false, got {_json_type(v)}")
            return v
        if kind == "int":
            return _integer(v, _INT64, at)
        if kind == "double":
            return _double(v, at)
        if kind == "bytes":
            return _base64(v, at)
        if depth >= _MAX_DEPTH:
            raise OtlpDecodeError(f"{at}: attribute values are nested deeper than {_MAX_DEPTH} levels")
        self._object(v, at)
        items = self._list(v, "values", "values", at)
        if kind == "array":
            return [self._any_value(x, f"{at}.values[{i}]", depth + 1) for i, x in enumerate(items)]
        return dict(self._key_value(x, f"{at}.values[{i}]", depth + 1) for i, x in enumerate(items))

    # field access ------------------------------------------------------------------------------------------------

    @staticmethod
    def _field(obj: dict[str, Any], camel: str, snake: str) -> Any:
        value = obj.get(camel)
        return obj.get(snake) if value is None else value

    @staticmethod
    def _object(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise OtlpDecodeError(f"{where or 'the document'}: expected an object, got {_json_type(value)}")

    def _list(self, obj: dict[str, Any], camel: str, snake: str, where: str) -> list[Any]:
        value = self._field(obj, camel, snake)
        if value is None:
            return []
        if not isinstance(value, list):
            raise OtlpDecodeError(f"{_join(where, camel)}: expected an array, got {_json_type(value)}")
        return value

    def _string(self, obj: dict[str, Any], camel: str, snake: str, where: str) -> str:
        value = self._field(obj, camel, snake)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise OtlpDecodeError(f"{_join(where, camel)}: expected a string, got {_json_type(value)}")
        return value

    def _uint64(self, obj: dict[str, Any], camel: str, snake: str, where: str) -> int:
        value = self._field(obj, camel, snake)
        return 0 if value is None else _integer(value, (0, _UINT64_MAX), _join(where, camel))

    def _enum(self, obj: dict[str, Any], name: str, names: Mapping[str, int], where: str) -> int:
        value = obj.get(name)
        if value is None:
            return 0
        if isinstance(value, str) and value in names:
            return names[value]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OtlpDecodeError(f"{_join(where, name)}: expected an enum value (an integer), got {value!r}")

    def _id(self, obj: dict[str, Any], camel: str, snake: str, size: int, where: str) -> str:
        value = self._string(obj, camel, snake, where)
        return _id_bytes(value.lower(), size, _join(where, camel)).hex()


_ANY_VALUE_FIELDS: Final = MappingProxyType(
    {
        "stringValue": "string",
        "string_value": "string",
        "boolValue": "bool",
        "bool_value": "bool",
        "intValue": "int",
        "int_value": "int",
        "doubleValue": "double",
        "double_value": "double",
        "arrayValue": "array",
        "array_value": "array",
        "kvlistValue": "kvlist",
        "kvlist_value": "kvlist",
        "bytesValue": "bytes",
        "bytes_value": "bytes",
    }
)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _integer(value: Any, bounds: tuple[int, int], where: str) -> int:
    """A 64-bit integer of the JSON mapping: a string of digits, or a number with no fraction."""
    if isinstance(value, str):
        try:
            number = int(value.strip(), 10)
        except ValueError:
            raise OtlpDecodeError(f"{where}: expected an integer, got {value!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        raise OtlpDecodeError(f"{where}: expected an integer, got {value!r}")
    if not bounds[0] <= number <= bounds[1]:
        raise OtlpDecodeError(f"{where}: {number} is out of range")
    return number


def _double(value: Any, where: str) -> Any:
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise OtlpDecodeError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OtlpDecodeError(f"{where}: expected a number, got {_json_type(value)}")
    value = float(value)
    return value if math.isfinite(value) else _NON_FINITE.get(value, "NaN")


def _base64(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise OtlpDecodeError(f"{where}: expected a base64 string, got {_json_type(value)}")
    text = value.strip().replace("-", "+").replace("_", "/")  # the JSON mapping accepts URL-safe base64 too
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise OtlpDecodeError(f"{where}: {value!r} is not base64") from None
    return base64.b64encode(raw).decode("ascii")


# -- the store -----------------------------------------------------------------------------------------------------

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    seq INTEGER PRIMARY KEY,
    trace_id BLOB NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY,
    attributes TEXT NOT NULL UNIQUE,
    last_seen_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    last_seen_ns INTEGER NOT NULL,
    PRIMARY KEY (service, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spans (
    seq INTEGER PRIMARY KEY,
    trace_seq INTEGER NOT NULL,
    trace_id BLOB NOT NULL,
    span_id BLOB NOT NULL,
    parent_span_id BLOB,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    service TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    duration_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_message TEXT NOT NULL,
    attributes TEXT NOT NULL,
    events TEXT NOT NULL,
    links TEXT NOT NULL,
    scope TEXT NOT NULL,
    resource_id INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS spans_by_trace ON spans (trace_seq, span_id);
CREATE INDEX IF NOT EXISTS spans_by_start ON spans (start_ns);
CREATE INDEX IF NOT EXISTS spans_by_service ON spans (service, start_ns);
CREATE INDEX IF NOT EXISTS spans_with_errors ON spans (start_ns) WHERE status = 'error';
"""
# Spans are inserted a few hundred rows per statement (a VALUES list), which costs a fifth less than one statement
# per row (``executemany``): one statement to run, one call into SQLite, instead of hundreds. The first parameter is
# the resource id (an id the store got from the resources table), then a row's 15 columns, row after row. The span's
# trace number is looked up by SQLite from the row's own trace id (column1); an empty parent is no parent (see Row).
# A span sent twice (an exporter retrying after a timeout) is stored once.
_SPAN_VALUES = "(?, ?, NULLIF(?, x''), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_SPANS = (
    f"INSERT OR IGNORE INTO spans (trace_seq, {_COLUMNS}, resource_id)"  # noqa: S608 - constant column names
    " SELECT (SELECT seq FROM traces WHERE trace_id = column1), *, ? FROM (VALUES {values})"
)
_INSERT_TRACES = "INSERT OR IGNORE INTO traces (trace_id) VALUES {values}"
_ROWS_PER_INSERT = 256  # spans per statement (256 * 15 parameters; SQLite allows 32766)
_TRACES_PER_INSERT = 1024
_UPSERT_RESOURCE = (
    "INSERT INTO resources (attributes, last_seen_ns) VALUES (?, ?)"
    " ON CONFLICT (attributes) DO UPDATE SET last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)"
)
_UPSERT_OPERATION = (
    "INSERT INTO operations (service, name, last_seen_ns) VALUES (?, ?, ?)"
    " ON CONFLICT (service, name) DO UPDATE SET last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)"
)
_SERVICES = "SELECT DISTINCT service FROM operations ORDER BY service"
_SPAN_COLUMNS = ", ".join(f"s.{c.strip()}" for c in _COLUMNS.split(","))

_GROUP_BYTES = 8 << 20  # writes queued behind a busy writer are committed together, up to about this much OTLP
_PRUNE_CHUNK = 5_000  # spans deleted per transaction, so a big prune does not hold the write lock for long
# A new store file gets 16 KiB pages rather than SQLite's 4 KiB: a span row is about 500 bytes, and with four times
# as many rows and index entries per page an insert costs a tenth less (fewer page splits, fewer pages to log). A
# file made by an older meshkit keeps its pages; it works the same, a little slower.
_PAGE_SIZE = 16384
# Checkpoints (copying the WAL into the database file, and syncing it) run on the reader thread, after every
# _CHECKPOINT_SPANS spans written, beside the writer rather than in its commits: they were a tenth of its time, most
# of it waiting for the disk. The writer's own automatic checkpoint, every _CHECKPOINT_BYTES of WAL, remains for
# when these never catch up with it (the WAL starts over only once a checkpoint has copied all of it).
_CHECKPOINT_SPANS = 8192
_CHECKPOINT_BYTES = 64 << 20
_WRITER_PRAGMAS = (
    "PRAGMA cache_size=-65536",  # 64 MiB of page cache: the indexes' hot pages stay in memory
    "PRAGMA journal_size_limit=67108864",  # truncate the WAL file back to 64 MiB after a checkpoint
)


class _Stop:
    """Tells a database thread to finish."""


_STOP = _Stop()


@dataclass(frozen=True, slots=True)
class _Body:
    """An OTLP request body, decoded on the writer thread."""

    data: bytes
    json: bool


@dataclass(slots=True)
class _Job:
    run: Callable[[], Any] | None  # None: write ``spans`` (writes are grouped)
    spans: SpanBatch | _Body | None
    future: asyncio.Future[Any] | None  # None: posted (nobody waits for it)
    loop: asyncio.AbstractEventLoop | None


#: Writes the spans of a group of jobs; returns each job's result (or the error that job gets).
_Writer = Callable[[list[SpanBatch | _Body]], list[tuple[Any, BaseException | None]]]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _DbThread:
    """A thread that owns one connection and runs jobs on it in the order they came."""

    def __init__(self, name: str, write: _Writer | None = None) -> None:
        self._jobs: queue.SimpleQueue[_Job | _Stop] = queue.SimpleQueue()
        self._write = write
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, run: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(run, None, future, loop))
        return future

    def write(self, spans: SpanBatch | _Body) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._jobs.put(_Job(None, spans, future, loop))
        return future

    def post(self, run: Callable[[], object]) -> None:
        """Run ``run`` after the jobs already queued, with nobody waiting for it; callable from any thread."""
        self._jobs.put(_Job(run, None, None, None))

    def stop(self) -> None:
        """Finish the jobs already queued, then end the thread and join it."""
        self._jobs.put(_STOP)
        # The thread ends as soon as it reaches the stop mark: callers await their last job first, so this join
        # waits for nothing but the thread's return.
        self._thread.join()

    def _serve(self) -> None:
        held: _Job | _Stop | None = None
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if isinstance(job, _Stop):
                return
            if job.run is not None:
                try:
                    result, error = job.run(), None
                except BaseException as exc:  # handed to the awaiting task
                    result, error = None, exc
                self._reply(job, result, error)
                continue
            group = [job]
            size = _size(job.spans)
            while size < _GROUP_BYTES:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if isinstance(more, _Stop) or more.run is not None:
                    held = more
                    break
                group.append(more)
                size += _size(more.spans)
            assert self._write is not None
            try:
                outcomes = self._write([j.spans for j in group if j.spans is not None])
            except BaseException as exc:
                outcomes = [(None, exc)] * len(group)
            for j, (result, error) in zip(group, outcomes, strict=True):
                self._reply(j, result, error)

    @staticmethod
    def _reply(job: _Job, result: Any, error: BaseException | None) -> None:
        if job.future is None or job.loop is None:
            if error is not None:
                log.error("a trace store job failed", exc_info=error)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)


def _is_new(path: Path) -> bool:
    """``path`` is an empty file, or none in a folder that exists (a missing folder is open_database's error)."""
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return path.parent.is_dir()


def _create_file(path: Path) -> None:
    """Create an empty store file with :data:`_PAGE_SIZE` pages (the page size is fixed once a WAL file has any
    content, and ``open_database`` switches to WAL first thing). Another process creating it at the same time is
    harmless: whichever comes second finds the file made and changes nothing."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()


def _pieces(count: int, most: int) -> Iterator[tuple[int, int]]:
    """``(start, size)`` slices covering ``count`` items: as many of ``most`` as fit, then the rest in powers of two,
    so that the statements of every size are few and stay in the connection's statement cache."""
    start = 0
    size = most
    while start < count:
        while size > count - start:
            size //= 2
        yield start, size
        start += size


def _size(spans: SpanBatch | _Body | None) -> int:
    """Roughly how many bytes of OTLP some spans are (a stored span is about 400 bytes of protobuf)."""
    if isinstance(spans, _Body):
        return len(spans.data)
    return 400 * len(spans) if spans is not None else 0


@dataclass(frozen=True, slots=True)
class _Filters:
    service: str | None
    operation: str | None
    status: str | None
    min_duration_ns: int | None
    max_duration_ns: int | None
    since_ns: int | None
    until_ns: int | None
    attributes: tuple[tuple[str, str], ...]

    def sql(self) -> tuple[str, str, list[Any]]:
        """``(join, where, params)`` selecting the spans that match every filter."""
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("s.service = ?", self.service),
            ("s.name = ?", self.operation),
            ("s.duration_ns >= ?", self.min_duration_ns),
            ("s.duration_ns <= ?", self.max_duration_ns),
            ("s.start_ns >= ?", self.since_ns),
            ("s.start_ns <= ?", self.until_ns),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        if self.status is not None:
            # A literal (checked against STATUS_CODES) so that the partial index of errors can serve it.
            where.append(f"s.status = '{self.status}'")
        join = ""
        for key, value in self.attributes:
            join = " LEFT JOIN resources r ON r.id = s.resource_id"
            path = f'$."{key}"'
            span_match, span_params = _attribute_match("s.attributes", path, value)
            resource_match, resource_params = _attribute_match("r.attributes", path, value)
            where.append(f"({span_match} OR {resource_match})")
            params += span_params + resource_params
        return join, " AND ".join(where) or "1", params


def _attribute_match(column: str, path: str, value: str) -> tuple[str, list[Any]]:
    """SQL matching the attribute at ``path`` against ``value`` as text: equal strings, or equal numbers when
    ``value`` is one, or ``true`` / ``false`` for booleans. ``json_type`` / ``json_extract`` work on every SQLite
    with JSON (not only those with the ``->`` operator)."""
    alternatives = [f"(json_type({column}, ?) = 'text' AND json_extract({column}, ?) = ?)"]
    params: list[Any] = [path, path, value]
    if value in ("true", "false"):
        alternatives.append(f"json_type({column}, ?) = ?")
        params += [path, value]
    try:
        number: float | None = float(value)
    except ValueError:
        number = None
    if number is not None and math.isfinite(number):
        alternatives.append(f"(json_type({column}, ?) IN ('integer', 'real') AND json_extract({column}, ?) = ?)")
        params += [path, path, int(number) if number.is_integer() else number]
    return "(" + " OR ".join(alternatives) + ")", params


class TraceStore:
    """Spans in a SQLite file (or ``":memory:"``), with the queries the dashboard and the query API need.

    Open it with ``store = await TraceStore.open("traces.db")`` (or ``async with await TraceStore.open(...)``),
    close it with ``await store.aclose()``. All methods are coroutines; the database work runs on the store's own
    threads (see the module docstring).

    Retention: spans whose start is older than ``retention_seconds`` are deleted, and when the store holds more than
    ``max_spans`` spans the oldest are deleted, down to 95% of ``max_spans`` (either limit can be ``None``). The
    writer checks after every insert: the count at once, the age every ``prune_interval`` seconds; :meth:`prune`
    applies both now. ``max_pending_bytes`` bounds the spans waiting for the writer (about 400 bytes a span): past it,
    :meth:`add` and :meth:`ingest` raise :class:`~meshkit.errors.Unavailable` (the receiver answers 503, and OTLP
    exporters retry later).

    Several processes may write one store file, each through a store of its own (``serve_collector`` with
    ``reuse_port=True`` in each): SQLite takes their transactions in turn, and one Python process cannot decode
    and insert on more than one core. Each re-reads the span count every ``prune_interval`` seconds, so with N
    writers the file may pass ``max_spans`` by what the others insert in that time.
    """

    def __init__(
        self,
        path: str,
        *,
        retention_seconds: float | None,
        max_spans: int | None,
        prune_interval: float,
        max_pending_bytes: int,
        clock: Clock,
    ) -> None:
        """Use :meth:`open`."""
        self._path = path
        self._retention_ns = None if retention_seconds is None else int(retention_seconds * 1e9)
        self._max_spans = max_spans
        self._prune_interval = prune_interval
        self._max_pending = max_pending_bytes
        self.clock = clock
        self._pending = 0
        self._closed = False
        self._db: sqlite3.Connection | None = None  # the writer's; used on the writer thread only
        self._reader_db: sqlite3.Connection | None = None
        self._count = 0  # spans stored, as far as this store knows (writer thread)
        self._last_age_prune = 0  # wall ns (writer thread)
        self._unchecked = 0  # spans written since the last background checkpoint (writer thread)
        self._checkpointing = False  # one is queued or running on the reader thread
        self._writer = _DbThread("meshkit-trace-writer", self._write)
        self._reader: _DbThread | None = None

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str] = ":memory:",
        *,
        retention_seconds: float | None = 86_400.0,
        max_spans: int | None = 1_000_000,
        prune_interval: float = 60.0,
        max_pending_bytes: int = 256 << 20,
        clock: Clock | None = None,
    ) -> TraceStore:
        """Open (creating it if needed) the store at ``path``; ``":memory:"`` keeps spans in memory only."""
        if retention_seconds is not None and not retention_seconds > 0:
            raise ConfigurationError(f"retention_seconds must be positive (or None), got {retention_seconds!r}")
        if max_spans is not None and max_spans < 1:
            raise ConfigurationError(f"max_spans must be at least 1 (or None), got {max_spans!r}")
        if not prune_interval > 0 or max_pending_bytes < 1:
            raise ConfigurationError("prune_interval and max_pending_bytes must be positive")
        store = cls(
            os.fspath(path),
            retention_seconds=retention_seconds,
            max_spans=max_spans,
            prune_interval=prune_interval,
            max_pending_bytes=max_pending_bytes,
            clock=clock or MonotonicClock(),
        )
        try:
            await store._writer.call(store._open_writer)
            if store._path != ":memory:":
                store._reader = _DbThread("meshkit-trace-reader")
                await store._reader.call(store._open_reader)
        except BaseException:
            await store.aclose()
            raise
        return store

    async def __aenter__(self) -> TraceStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def path(self) -> str:
        return self._path

    async def aclose(self) -> None:
        """Finish the queued inserts, close the connections and join the threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for thread, close in ((self._reader, self._close_reader), (self._writer, self._close_writer)):
            if thread is None:
                continue
            try:
                await thread.call(close)
            finally:
                thread.stop()

    # -- writing -------------------------------------------------------------------------------------------------

    async def add(self, spans: SpanBatch | Iterable[SpanRecord]) -> int:
        """Store spans (one transaction, grouped with the other writes waiting for the writer); returns how many
        were new once they are committed. A span already stored (same trace and span id) is kept as it was."""
        batch = spans if isinstance(spans, SpanBatch) else SpanBatch.from_records(spans)
        if not len(batch):
            self._check_open()
            return 0
        return await self._write_later(batch)

    async def ingest(self, body: bytes, *, json: bool = False) -> int:
        """Decode an OTLP ``ExportTraceServiceRequest`` body (binary protobuf, or OTLP/JSON with ``json=True``)
        and store its spans, like :meth:`add`; raises :class:`OtlpDecodeError` if the body is malformed.

        The body is decoded on the writer thread, between its database calls (the module docstring says why).
        """
        return await self._write_later(_Body(body, json))

    async def _write_later(self, spans: SpanBatch | _Body) -> int:
        self._check_open()
        size = _size(spans)
        if self._pending and self._pending + size > self._max_pending:
            raise Unavailable(f"the trace store is behind: {self._pending} bytes of spans are waiting", retry_after=1.0)
        self._pending += size
        try:
            return await self._writer.write(spans)
        finally:
            self._pending -= size

    async def prune(self) -> int:
        """Apply retention now (age, then count); returns how many spans were deleted."""
        self._check_open()
        return await self._writer.call(self._prune_now)

    # -- queries -------------------------------------------------------------------------------------------------

    async def traces(
        self,
        *,
        service: str | None = None,
        operation: str | None = None,
        status: str | None = None,
        min_duration_ns: int | None = None,
        max_duration_ns: int | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        attributes: Mapping[str, str] | None = None,
        limit: int = 50,
    ) -> list[TraceSummary]:
        """Summaries of the most recent traces with a span that matches every filter given, newest first.

        ``service``, ``operation`` (span name), ``status`` (``"error"``, ``"ok"`` or ``"unset"``), the duration
        bounds, the time window (on the span's start) and ``attributes`` all apply to one span; ``attributes``
        matches span or resource attributes, comparing the value as text (``{"http.response.status_code": "500"}``
        matches the number 500, ``"true"`` a boolean).
        """
        if status is not None and status not in STATUS_CODES:
            raise ValueError(f"status must be one of {', '.join(STATUS_CODES)}, got {status!r}")
        if not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be between 1 and 10000, got {limit}")
        for key in attributes or {}:
            if not key or '"' in key:
                raise ValueError(f"attribute names must be non-empty and must not contain '\"', got {key!r}")
        filters = _Filters(
            service,
            operation,
            status,
            min_duration_ns,
            max_duration_ns,
            since_ns,
            until_ns,
            tuple((str(k), str(v)) for k, v in (attributes or {}).items()),
        )
        return await self._read(lambda db: _find_traces(db, filters, limit))

    async def trace(self, trace_id: str) -> list[SpanRecord]:
        """Every span of the trace, ordered by start (empty if the store has none)."""
        raw = _id_bytes(trace_id.lower(), 16, "trace_id")
        return await self._read(lambda db: _fetch_trace(db, raw))

    async def services(self) -> list[str]:
        """The services that sent spans (within retention), sorted."""
        return await self._read(lambda db: [r[0] for r in db.execute(_SERVICES)])

    async def operations(self, service: str) -> list[str]:
        """The span names ``service`` sent (within retention), sorted."""
        sql = "SELECT name FROM operations WHERE service = ? ORDER BY name"
        return await self._read(lambda db: [r[0] for r in db.execute(sql, (service,))])

    async def dependencies(self, since_ns: int | None = None, until_ns: int | None = None) -> list[Dependency]:
        """Calls between services: pairs of a span and its parent in different services, counted per
        (caller, callee), for child spans starting in the window. Sorted by caller, then callee."""
        sql = (
            "SELECT p.service, c.service, count(*), sum(c.status = 'error')"
            " FROM spans c JOIN spans p ON p.trace_seq = c.trace_seq AND p.span_id = c.parent_span_id"
            " WHERE c.parent_span_id IS NOT NULL AND c.start_ns >= ? AND c.start_ns <= ? AND p.service <> c.service"
            " GROUP BY p.service, c.service ORDER BY p.service, c.service"
        )
        params = (since_ns if since_ns is not None else -(2**63), until_ns if until_ns is not None else 2**63 - 1)
        return await self._read(lambda db: [Dependency(*r) for r in db.execute(sql, params)])

    async def count(self) -> int:
        """How many spans the store holds."""
        return await self._read(lambda db: int(db.execute("SELECT count(*) FROM spans").fetchone()[0]))

    # -- threads -------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the trace store is closed")

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        thread = self._reader or self._writer

        def run() -> T:
            db = self._reader_db or self._db
            assert db is not None
            try:
                return query(db)
            except sqlite3.Error as exc:
                raise Unavailable(f"the trace store at {self._path} cannot be read: {exc}") from exc

        return await thread.call(run)

    def _open_writer(self) -> None:
        if self._path == ":memory:":
            db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            db.executescript(_SCHEMA)
        else:
            db = self._open_file()
            for pragma in _WRITER_PRAGMAS:
                db.execute(pragma)
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_BYTES // page_size}")
        self._db = db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA_VERSION):
            raise ConfigurationError(
                f"the trace store at {self._path} has layout version {version}; this meshkit reads version"
                f" {_SCHEMA_VERSION}",
                hint="point the collector at a new file (or delete this one)",
            )
        if version == 0:
            with write_transaction(db):
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        self._count = db.execute("SELECT count(*) FROM spans").fetchone()[0]
        self._last_age_prune = 0
        self._maybe_prune()

    def _open_file(self) -> sqlite3.Connection:
        """``open_database``, tried again while another process is creating the same file: SQLite answers
        "locked" at once, without waiting, when two connections would otherwise deadlock doing so."""
        deadline = time.monotonic() + 30
        path = Path(self._path)
        while True:
            try:
                if _is_new(path):
                    _create_file(path)
                return open_database(path, _SCHEMA, what="trace store")
            except (ConfigurationError, sqlite3.OperationalError) as exc:
                cause = exc.__cause__ if isinstance(exc, ConfigurationError) else exc
                locked = isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause)
                if not locked or time.monotonic() > deadline:
                    if isinstance(exc, sqlite3.OperationalError):
                        raise ConfigurationError(f"cannot open the trace store at {path}: {exc}") from exc
                    raise
            time.sleep(random.uniform(0.005, 0.05))

    def _open_reader(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=30.0)
        db.execute("PRAGMA query_only = 1")
        db.execute("PRAGMA cache_size=-16384")
        self._reader_db = db

    def _close_writer(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _close_reader(self) -> None:
        if self._reader_db is not None:
            self._reader_db.close()
            self._reader_db = None

    def _write(self, work: list[SpanBatch | _Body]) -> list[tuple[Any, BaseException | None]]:
        """On the writer thread: decode what needs it, then one transaction for every batch that decoded. Each
        job's result is how many of its spans were new."""
        batches: list[SpanBatch] = []
        errors: list[BaseException | None] = []
        for item in work:
            try:
                if isinstance(item, SpanBatch):
                    batches.append(item)
                else:
                    batches.append(SpanBatch.from_json(item.data) if item.json else SpanBatch.from_protobuf(item.data))
                errors.append(None)
            except OtlpDecodeError as exc:
                batches.append(SpanBatch(()))
                errors.append(exc)
        try:
            inserted = self._insert(batches)
        except Unavailable as exc:
            return [(None, exc if error is None else error) for error in errors]
        return [(None, error) if error else (n, None) for n, error in zip(inserted, errors, strict=True)]

    def _insert(self, batches: list[SpanBatch]) -> list[int]:
        """One transaction for all of ``batches``; how many spans of each were new."""
        db = self._db
        assert db is not None
        inserted = [0] * len(batches)
        if not any(g.rows for b in batches for g in b.groups):
            return inserted
        # Distinct over the group commit (a trace's spans often come in several requests at once).
        trace_ids = list({bytes(t): t for b in batches for g in b.groups for t in g.traces}.values())
        operations: dict[tuple[str, str], int] = {}
        try:
            with write_transaction(db):
                for start, size in _pieces(len(trace_ids), _TRACES_PER_INSERT):
                    db.execute(_INSERT_TRACES.format(values=",".join(["(?)"] * size)), trace_ids[start : start + size])
                for n, batch in enumerate(batches):
                    for g in batch.groups:
                        if not g.rows:
                            continue
                        # The group's latest start stands for each of its spans' (it only delays their expiry).
                        latest = max(map(_START, g.rows))
                        resource_id = self._resource_id(db, g, latest)
                        rows = g.rows
                        for start, size in _pieces(len(rows), _ROWS_PER_INSERT):
                            sql = _INSERT_SPANS.format(values=",".join([_SPAN_VALUES] * size))
                            params = (resource_id, *chain.from_iterable(rows[start : start + size]))
                            inserted[n] += db.execute(sql, params).rowcount
                        for key in set(map(_OPERATION, g.rows)):
                            operations[key] = max(operations.get(key, latest), latest)
                db.executemany(_UPSERT_OPERATION, [(s, n, t) for (s, n), t in operations.items()])
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot write to the trace store at {self._path}: {exc}") from exc
        self._count += sum(inserted)
        self._unchecked += sum(inserted)
        if self._reader is not None and self._unchecked >= _CHECKPOINT_SPANS and not self._checkpointing:
            self._checkpointing = True
            self._unchecked = 0
            self._reader.post(self._checkpoint)
        try:
            self._maybe_prune()
        except sqlite3.Error:  # the spans are stored; retention will try again after the next insert
            log.exception("pruning the trace store failed", extra={"path": self._path})
        return inserted

    def _checkpoint(self) -> None:
        """On the reader thread: copy what the WAL holds into the database file, beside the writer (see
        :data:`_CHECKPOINT_SPANS`)."""
        try:
            if self._reader_db is not None:
                self._reader_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:  # the writer's own checkpoint (wal_autocheckpoint) still bounds the WAL
            log.warning("a background checkpoint of the trace store failed", extra={"path": self._path}, exc_info=True)
        finally:
            self._checkpointing = False

    def _resource_id(self, db: sqlite3.Connection, group: _Group, latest: int) -> int:
        # Read back every time rather than cached: another process writing the same file may prune the row.
        db.execute(_UPSERT_RESOURCE, (group.resource, latest))
        return int(db.execute("SELECT id FROM resources WHERE attributes = ?", (group.resource,)).fetchone()[0])

    def _maybe_prune(self) -> int:
        """Retention, after an insert: the age every ``prune_interval``; the count when the spans this store
        knows of pass ``max_spans`` (re-read from the file then, and every ``prune_interval``, since other
        processes may write it too), deleting the oldest down to 95% of ``max_spans`` so that this does not run
        again after every insert."""
        deleted = 0
        now = int(self.clock.wall() * 1e9)
        due = now - self._last_age_prune >= self._prune_interval * 1e9
        if due:
            if self._retention_ns is not None:
                deleted += self._prune_age(now)
            self._last_age_prune = now
        if self._max_spans is not None and (due or self._count > self._max_spans):
            db = self._db
            assert db is not None
            self._count = db.execute("SELECT count(*) FROM spans").fetchone()[0]
            if self._count > self._max_spans:
                deleted += self._delete_oldest(self._count - self._max_spans + self._max_spans // 20)
        return deleted

    def _prune_now(self) -> int:
        try:
            self._last_age_prune = 0
            return self._maybe_prune()
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot prune the trace store at {self._path}: {exc}") from exc

    def _prune_age(self, now_ns: int) -> int:
        db = self._db
        assert db is not None
        assert self._retention_ns is not None
        cutoff = now_ns - self._retention_ns
        deleted = 0
        while True:
            chunk = self._delete_chunk("SELECT seq, trace_seq FROM spans WHERE start_ns < ? LIMIT ?", cutoff)
            deleted += chunk
            if chunk < _PRUNE_CHUNK:
                break
        with write_transaction(db):
            db.execute("DELETE FROM operations WHERE last_seen_ns < ?", (cutoff,))
            db.execute("DELETE FROM resources WHERE last_seen_ns < ?", (cutoff,))
        if deleted:
            log.debug("pruned old spans", extra={"path": self._path, "deleted": deleted, "cutoff_ns": cutoff})
        return deleted

    def _delete_oldest(self, excess: int) -> int:
        deleted = 0
        while deleted < excess:
            want = min(excess - deleted, _PRUNE_CHUNK)
            chunk = self._delete_chunk("SELECT seq, trace_seq FROM spans ORDER BY start_ns LIMIT ?", None, want)
            deleted += chunk
            if chunk < want:
                break
        return deleted

    def _delete_chunk(self, select: str, bound: int | None, limit: int = _PRUNE_CHUNK) -> int:
        db = self._db
        assert db is not None
        with write_transaction(db):
            params = (limit,) if bound is None else (bound, limit)
            victims = db.execute(select, params).fetchall()
            if not victims:
                return 0
            db.executemany("DELETE FROM spans WHERE seq = ?", [(v[0],) for v in victims])
            db.executemany(
                "DELETE FROM traces WHERE seq = ?1 AND NOT EXISTS (SELECT 1 FROM spans WHERE trace_seq = ?1)",
                [(t,) for t in {v[1] for v in victims}],
            )
        self._count -= len(victims)
        return len(victims)


# -- the queries (on a database thread) ----------------------------------------------------------------------------


def _find_traces(db: sqlite3.Connection, filters: _Filters, limit: int) -> list[TraceSummary]:
    join, where, params = filters.sql()
    # The SQL text is built from constant fragments only; every value is a bound parameter.
    sql = f"SELECT s.trace_seq FROM spans s{join} WHERE {where} ORDER BY s.start_ns DESC"  # noqa: S608
    wanted: dict[int, None] = {}
    cursor = db.execute(sql, params)
    try:
        while len(wanted) < limit:
            chunk = cursor.fetchmany(256)
            if not chunk:
                break
            for (seq,) in chunk:
                wanted[seq] = None
                if len(wanted) >= limit:
                    break
    finally:
        cursor.close()
    if not wanted:
        return []
    spans: dict[int, list[tuple[Any, ...]]] = {}
    seqs = list(wanted)
    for i in range(0, len(seqs), 500):
        part = seqs[i : i + 500]
        marks = ",".join("?" * len(part))
        for row in db.execute(
            "SELECT trace_seq, seq, trace_id, span_id, parent_span_id, service, name, start_ns, end_ns, status"  # noqa: S608 - placeholders only
            f" FROM spans WHERE trace_seq IN ({marks})",
            part,
        ):
            spans.setdefault(row[0], []).append(row)
    summaries = [_summary(rows) for rows in spans.values()]
    summaries.sort(key=lambda s: (s.start_ns, s.trace_id), reverse=True)
    return summaries


def _summary(rows: list[tuple[Any, ...]]) -> TraceSummary:
    ids = {r[3] for r in rows}
    roots = [r for r in rows if r[4] is None] or [r for r in rows if r[4] not in ids] or rows
    root = min(roots, key=lambda r: (r[7], r[1]))
    start = min(r[7] for r in rows)
    end = max(r[8] for r in rows)
    return TraceSummary(
        trace_id=root[2].hex(),
        root_service=root[5],
        root_name=root[6],
        start_ns=start,
        duration_ns=max(end - start, 0),
        span_count=len(rows),
        error_count=sum(1 for r in rows if r[9] == "error"),
        services=tuple(sorted({r[5] for r in rows})),
    )


def _fetch_trace(db: sqlite3.Connection, trace_id: bytes) -> list[SpanRecord]:
    rows = db.execute(
        f"SELECT {_SPAN_COLUMNS}, r.attributes FROM traces t"  # noqa: S608 - constant column names
        " JOIN spans s ON s.trace_seq = t.seq LEFT JOIN resources r ON r.id = s.resource_id"
        " WHERE t.trace_id = ? ORDER BY s.start_ns, s.seq",
        (trace_id,),
    ).fetchall()
    resources: dict[str | None, dict[str, Any]] = {}
    out = []
    for row in rows:
        text = row[15]
        resource = resources.get(text)
        if resource is None:
            resource = resources[text] = json.loads(text) if text else {}
        out.append(_record(row, dict(resource)))
    return out
