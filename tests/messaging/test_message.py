from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import pydantic
import pytest

from meshkit.errors import ConfigurationError, MessageDecodeError
from meshkit.messaging import Broker, Delivery, Envelope, JsonCodec, Message, connect
from meshkit.messaging.base import make_delivery
from meshkit.messaging.memory import MemoryBackend
from meshkit.messaging.message import decode_structured, encode_structured, make_envelope, make_message


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


def test_the_fast_builders_make_ordinary_frozen_values() -> None:
    """make_envelope/make_delivery/make_message (the hot paths) build values equal to the constructors' ones."""
    extensions = {"partitionkey": "k"}
    built = make_envelope("1", "s", "t", "2026-01-01T00:00:00+00:00", "application/json", b"1", "sub", extensions)
    envelope = Envelope("1", "s", "t", "2026-01-01T00:00:00+00:00", "application/json", b"1", "sub", extensions)
    assert type(built) is Envelope and built == envelope
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.id = "2"  # type: ignore[misc]
    delivery = make_delivery("t", "g", built, 7, 2)
    assert type(delivery) is Delivery and delivery == Delivery("t", "g", envelope, 7, 2)
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    message = make_message("t", 1, built, stamp, "k", {}, 2, 7)
    assert type(message) is Message
    assert message == Message("t", 1, "1", "s", "t", stamp, "application/json", "sub", "k", {}, 2, 7)
    assert dataclasses.replace(built, id="2").id == "2"


@pytest.mark.parametrize("bad", ["", "not a time"])
def test_a_bad_time_attribute_is_refused_every_time(bad: str) -> None:
    """The broker remembers the last time it parsed; that must never let a bad one through."""
    broker = Broker(MemoryBackend())
    good = Envelope("1", "s", "t", "2026-01-01T00:00:00+00:00", "application/json", b"1")
    for envelope in (dataclasses.replace(good, time=bad), good, dataclasses.replace(good, time=bad)):
        delivery = Delivery("t", "g", envelope, 1, 1)
        if envelope.time == bad:
            with pytest.raises(MessageDecodeError, match="bad time attribute"):
                broker._decode(delivery)
        else:
            assert broker._decode(delivery).time == datetime(2026, 1, 1, tzinfo=UTC)
