"""Messages are CloudEvents 1.0.

On the wire (structured mode, used by backends without headers) a message is one JSON object::

    {"specversion": "1.0", "id": "0190...", "source": "meshkit://orders", "type": "order.created",
     "subject": null, "time": "2026-11-22T16:45:00.123456+00:00", "datacontenttype": "application/json",
     "partitionkey": "order-42", "traceparent": "00-...-01", "data": {...}}

Extensions are lowercase alphanumeric attributes beside the standard ones (``partitionkey``, ``traceparent``,
``tracestate`` and any header a publisher adds). Data that is not JSON travels as ``data_base64``. docs/messaging.md
gives the exact layout; any CloudEvents SDK reads it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import json.encoder
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, cast

from meshkit.errors import MessageDecodeError

__all__ = ["Envelope", "JsonCodec", "Message", "decode_structured", "encode_structured"]


#: No extensions: one immutable empty mapping that envelopes without any share.
NO_EXTENSIONS: Mapping[str, str] = MappingProxyType({})

_EXTENSION = re.compile(r"^[a-z0-9]{1,20}$")
_JSON_TYPES = frozenset({dict, list, str, int, float, bool, type(None)})
_STANDARD = ("specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data", "data_base64")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message as a backend stores it: CloudEvents attributes plus the encoded data."""

    id: str
    source: str
    type: str
    time: str
    datacontenttype: str
    data: bytes
    subject: str | None = None
    extensions: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str | None:
        return self.extensions.get("partitionkey")

    def size(self) -> int:
        return len(self.data) + sum(len(k) + len(v) for k, v in self.extensions.items())


# The hot paths build a few value objects per message. A frozen dataclass's __init__ calls object.__setattr__ once
# per field, about three times what filling plain slots costs; make_envelope and make_message fill an object of a
# plain class with the same slots and then give it the frozen class (Python allows __class__ assignment between
# classes of identical layout). The result is an ordinary, frozen Envelope/Message: test_message checks that it
# equals the one the constructor builds.


class _EnvelopeSlots:
    __slots__ = ("data", "datacontenttype", "extensions", "id", "source", "subject", "time", "type")
    id: str
    source: str
    type: str
    time: str
    datacontenttype: str
    data: bytes
    subject: str | None
    extensions: Mapping[str, str]


def make_envelope(
    ident: str,
    source: str,
    kind: str,
    time: str,
    datacontenttype: str,
    data: bytes,
    subject: str | None,
    extensions: Mapping[str, str],
) -> Envelope:
    """``Envelope(ident, source, kind, time, datacontenttype, data, subject, extensions)``, built faster."""
    e = _EnvelopeSlots()
    e.id = ident
    e.source = source
    e.type = kind
    e.time = time
    e.datacontenttype = datacontenttype
    e.data = data
    e.subject = subject
    e.extensions = extensions
    e.__class__ = Envelope  # type: ignore[assignment]  # same slots: allowed
    return e  # type: ignore[return-value]  # it is an Envelope now


@dataclass(frozen=True, slots=True)
class Message:
    """What a handler receives: the event, decoded, and what the broker knows about this delivery."""

    topic: str
    data: Any
    id: str
    source: str
    type: str
    time: datetime
    datacontenttype: str
    subject: str | None = None
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delivery_count: int = 1
    offset: int | None = None

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 1

    @property
    def traceparent(self) -> str | None:
        return self.headers.get("traceparent")


class _MessageSlots:
    __slots__ = (
        "data",
        "datacontenttype",
        "delivery_count",
        "headers",
        "id",
        "key",
        "offset",
        "source",
        "subject",
        "time",
        "topic",
        "type",
    )
    topic: str
    data: Any
    id: str
    source: str
    type: str
    time: datetime
    datacontenttype: str
    subject: str | None
    key: str | None
    headers: Mapping[str, str]
    delivery_count: int
    offset: int | None


def make_message(
    topic: str,
    data: Any,
    envelope: Envelope,
    time: datetime,
    key: str | None,
    headers: Mapping[str, str],
    delivery_count: int,
    offset: int | None,
) -> Message:
    """A :class:`Message` of ``envelope``'s attributes and the rest, built faster (see :func:`make_envelope`)."""
    m = _MessageSlots()
    m.topic = topic
    m.data = data
    m.id = envelope.id
    m.source = envelope.source
    m.type = envelope.type
    m.time = time
    m.datacontenttype = envelope.datacontenttype
    m.subject = envelope.subject
    m.key = key
    m.headers = headers
    m.delivery_count = delivery_count
    m.offset = offset
    m.__class__ = Message  # type: ignore[assignment]  # same slots: allowed
    return m  # type: ignore[return-value]  # it is a Message now


def check_extension(name: str) -> str:
    if not _EXTENSION.match(name) or name in _STANDARD:
        raise ValueError(
            f"header {name!r} cannot be a CloudEvents extension: use 1-20 lowercase letters or digits, "
            f"not one of {', '.join(_STANDARD)}"
        )
    return name


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _c_encoder() -> Callable[[Any, int], Sequence[str]] | None:
    """The C JSON encoder, built once (``JSONEncoder.encode`` builds one per call, a third of its cost), without the
    circular-reference check (a cycle ends in RecursionError: the caller takes the full path then). None where the
    json module has no C speedups."""
    make = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed
    if make is None:  # pragma: no cover - CPython has it
        return None
    return cast(
        Callable[[Any, int], Sequence[str]],
        make(None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, True),
    )


_encode_fast = _c_encoder()
# the scanner under JSONDecoder.decode, without its two whitespace regex matches per call
_scan = cast(Callable[[str, int], tuple[Any, int]], getattr(json.JSONDecoder(), "scan_once"))  # noqa: B009


class JsonCodec:
    """JSON for data: plain JSON values, pydantic models and dataclasses (as their fields); bytes stay bytes."""

    content_type = "application/json"
    # one encoder and decoder for every call: json.dumps with arguments builds a new encoder each time
    _dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    _loads = json.JSONDecoder().decode

    def encode(self, data: Any) -> tuple[bytes, str]:
        if type(data) in _JSON_TYPES:  # the common case first: plain JSON values
            try:
                text = "".join(_encode_fast(data, 0)) if _encode_fast is not None else self._dumps(data)
                return text.encode(), self.content_type
            except (TypeError, ValueError, RecursionError):
                pass  # a dict holding something else, or a cycle: the full path below says what
        if isinstance(data, bytes | bytearray | memoryview):
            return bytes(data), "application/octet-stream"
        dump = getattr(data, "model_dump", None)
        if callable(dump):
            data = dump(mode="json")
        elif dataclasses.is_dataclass(data) and not isinstance(data, type):
            data = dataclasses.asdict(data)
        try:
            return self._dumps(data).encode(), self.content_type
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"cannot encode {type(data).__name__} as JSON: {exc}; pass JSON values, a pydantic model, "
                "a dataclass or bytes"
            ) from exc

    def decode(self, data: bytes, content_type: str) -> Any:
        if content_type != self.content_type:  # JSON is the common case: one comparison
            if content_type == "application/octet-stream":
                return data
            if not content_type.startswith("application/json") and not content_type.endswith("+json"):
                return data
        try:
            text = data.decode()
            try:
                value, end = _scan(text, 0)
            except (StopIteration, ValueError):
                end = -1  # not at position 0 (leading whitespace, or not JSON): the full decoder says which
            return value if end == len(text) else self._loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MessageDecodeError(f"data is not valid JSON ({content_type}): {exc}") from exc


def encode_structured(envelope: Envelope) -> bytes:
    """The structured-mode JSON of a CloudEvent."""
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": envelope.id,
        "source": envelope.source,
        "type": envelope.type,
        "time": envelope.time,
        "datacontenttype": envelope.datacontenttype,
    }
    if envelope.subject is not None:
        doc["subject"] = envelope.subject
    doc.update(envelope.extensions)
    ct = envelope.datacontenttype
    if (ct.startswith("application/json") or ct.endswith("+json")) and _is_json(envelope.data):
        doc["data"] = json.loads(envelope.data) if envelope.data else None
    else:  # bytes, or data that claims to be JSON and is not: kept as it is, so the consumer sees the problem
        doc["data_base64"] = base64.b64encode(envelope.data).decode("ascii")
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _is_json(data: bytes) -> bool:
    if not data:
        return True
    try:
        json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def decode_structured(raw: bytes) -> Envelope:
    """Parse structured-mode JSON; malformed input raises :class:`~meshkit.errors.MessageDecodeError`."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageDecodeError(f"malformed CloudEvent: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("specversion") != "1.0":
        raise MessageDecodeError("not a CloudEvents 1.0 structured message")
    try:
        if "data_base64" in doc:
            data = base64.b64decode(doc["data_base64"])
        elif doc.get("data") is not None:
            data = json.dumps(doc["data"], separators=(",", ":"), ensure_ascii=False).encode()
        else:
            data = b""
        extensions = {k: str(v) for k, v in doc.items() if k not in _STANDARD}
        return Envelope(
            id=str(doc["id"]),
            source=str(doc["source"]),
            type=str(doc["type"]),
            time=str(doc.get("time") or datetime.now(UTC).isoformat()),
            datacontenttype=str(doc.get("datacontenttype") or "application/json"),
            data=data,
            subject=doc.get("subject"),
            extensions=extensions,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise MessageDecodeError(f"malformed CloudEvent: {exc}") from exc
