from __future__ import annotations

import dataclasses
import json

import pydantic
import pytest

from meshkit.errors import ConfigurationError, MessageDecodeError
from meshkit.messaging import Envelope, JsonCodec, connect
from meshkit.messaging.message import decode_structured, encode_structured


def test_structured_json_round_trip_and_layout() -> None:
    envelope = Envelope(
        id="0190-1",
        source="meshkit://orders",
        type="order.created",
        time="2026-11-22T16:45:00+00:00",
        datacontenttype="application/json",
        data=b'{"id":42}',
        subject="orders/42",
        extensions={"partitionkey": "order-42", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
    )
    raw = encode_structured(envelope)
    doc = json.loads(raw)
    assert doc == {
        "specversion": "1.0",
        "id": "0190-1",
        "source": "meshkit://orders",
        "type": "order.created",
        "time": "2026-11-22T16:45:00+00:00",
        "datacontenttype": "application/json",
        "subject": "orders/42",
        "partitionkey": "order-42",
        "traceparent": envelope.extensions["traceparent"],
        "data": {"id": 42},
    }
    assert decode_structured(raw) == envelope


def test_binary_data_travels_as_base64() -> None:
    envelope = Envelope(
        id="1",
        source="s",
        type="t",
        time="2026-01-01T00:00:00+00:00",
        datacontenttype="application/octet-stream",
        data=b"\x00\xff",
    )
    raw = encode_structured(envelope)
    assert json.loads(raw)["data_base64"] == "AP8="
    assert decode_structured(raw).data == b"\x00\xff"


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"specversion": "0.3"}', b'{"specversion": "1.0"}'])
def test_malformed_events_are_decode_errors(raw: bytes) -> None:
    with pytest.raises(MessageDecodeError):
        decode_structured(raw)


def test_the_codec_takes_models_and_dataclasses() -> None:
    class Order(pydantic.BaseModel):
        id: int
        total: float

    @dataclasses.dataclass
    class Shipped:
        order: int

    codec = JsonCodec()
    assert codec.encode(Order(id=1, total=9.5)) == (b'{"id":1,"total":9.5}', "application/json")
    assert codec.encode(Shipped(order=1)) == (b'{"order":1}', "application/json")
    assert codec.encode(b"raw") == (b"raw", "application/octet-stream")
    assert codec.decode(b'{"a":1}', "application/json") == {"a": 1}
    with pytest.raises(MessageDecodeError):
        codec.decode(b"{", "application/json")


def test_connect_names_what_to_fix() -> None:
    with pytest.raises(ConfigurationError, match="unknown broker URL scheme 'mqtt'") as info:
        connect("mqtt://localhost")
    assert info.value.hint is not None and "memory://" in info.value.hint
    with pytest.raises(ConfigurationError, match="bad SQLite broker URL"):
        connect("sqlite://host/x.db")
