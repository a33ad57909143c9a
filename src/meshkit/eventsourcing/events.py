"""The value objects of event sourcing: events to append, events as stored, snapshots."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshkit.errors import ConfigurationError

__all__ = ["Event", "NewEvent", "RecordedEvent", "Snapshot", "check_stream", "decode", "encode", "stream_category"]

# Letters, digits and _ . : @ = + / -, starting with a letter or digit; "account-42", "order-7f3c.2".
_STREAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@=+/-]*")
MAX_STREAM_LENGTH = 200


class Event(Protocol):
    """What :meth:`Aggregate.apply <meshkit.eventsourcing.Aggregate.apply>` receives: a :class:`NewEvent` while
    deciding (``record``), a :class:`RecordedEvent` while loading. Both have a ``type`` and JSON ``data``."""

    @property
    def type(self) -> str: ...

    @property
    def data(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: ``NewEvent("MoneyDeposited", {"amount": 10})``.

    ``data`` and ``metadata`` must be JSON objects (dicts of JSON values). ``schema_version`` is the version of the
    shape of ``data``; events stored with an older one are upgraded by the store's upcasters when read.
    """

    type: str
    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = 1

    def __post_init__(self) -> None:
        if not self.type or len(self.type) > MAX_STREAM_LENGTH:
            raise ConfigurationError(f"an event type is a non-empty string of at most {MAX_STREAM_LENGTH} characters")
        if self.schema_version < 1:
            raise ConfigurationError(f"schema_version must be an int >= 1, not {self.schema_version!r}")
        for name in ("data", "metadata"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ConfigurationError(f"{name} of event {self.type!r} must be a dict, not {type(value).__name__}")
            object.__setattr__(self, name, dict(value))


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as the store holds it.

    ``version`` is its place in its stream (1, 2, ...), ``position`` its place in the global log of the database
    (1, 2, ...: what projections read in order), ``recorded`` when it was appended (Unix seconds).
    ``schema_version`` and ``data`` are after upcasting.
    """

    id: str
    stream: str
    version: int
    position: int
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    schema_version: int
    recorded: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for APIs and the dashboard)."""
        return {
            "id": self.id,
            "stream": self.stream,
            "version": self.version,
            "position": self.position,
            "type": self.type,
            "data": self.data,
            "metadata": self.metadata,
            "schema_version": self.schema_version,
            "recorded": self.recorded,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of a stream's aggregate after its event ``version``; ``state`` is a JSON object.
    ``schema_version`` is the shape of ``state`` (an aggregate ignores snapshots of another shape)."""

    stream: str
    version: int
    state: dict[str, Any]
    schema_version: int
    recorded: float


def check_stream(stream: object) -> str:
    """``stream`` if it is a valid stream name; :class:`~meshkit.errors.ConfigurationError` saying why otherwise."""
    if not isinstance(stream, str):
        raise ConfigurationError(f"a stream name is a str, not {type(stream).__name__}")
    if len(stream) > MAX_STREAM_LENGTH or not _STREAM.fullmatch(stream):
        raise ConfigurationError(
            f"bad stream name {stream!r}: use 1 to {MAX_STREAM_LENGTH} letters, digits and _ . : @ = + / -, "
            "starting with a letter or digit, such as 'account-42' (the category is the part before the first '-')"
        )
    return stream


def stream_category(stream: str) -> str:
    """The part of a stream name before its first ``-`` (``account-42`` -> ``account``)."""
    return stream.split("-", 1)[0]


def encode(value: Mapping[str, Any], what: str) -> str:
    """``value`` as compact JSON text; ConfigurationError naming ``what`` when it is not JSON-able."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{what} is not JSON-able: {exc}") from exc


def decode(text: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value
