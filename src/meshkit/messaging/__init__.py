"""Async messaging: point-to-point queues and pub/sub topics, one API over every backend.

::

    async with meshkit.messaging.connect("memory://") as broker:
        await broker.subscribe("order.created", send_email, group="email")
        await broker.publish("order.created", {"id": 42}, key="order-42")

Members of one group compete for messages (a work queue); every group gets every message (fan-out). Delivery is
at least once: a message is acked after its handler returns, delivered again with backoff when the handler
raises, and moved to ``<topic>.dlq`` after ``Retry.attempts`` deliveries. Messages of one key are handled in
publish order. docs/messaging.md has the details and the wire format.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from meshkit.errors import ConfigurationError
from meshkit.messaging._consumer import Handler, Subscription, SubscriptionOptions
from meshkit.messaging.base import Backend, Capabilities, Delivery, GroupChannel, StartFrom
from meshkit.messaging.broker import Broker, DeadLetters, Outgoing
from meshkit.messaging.message import Envelope, JsonCodec, Message

__all__ = [
    "Backend",
    "Broker",
    "Capabilities",
    "DeadLetters",
    "Delivery",
    "Envelope",
    "GroupChannel",
    "Handler",
    "JsonCodec",
    "Message",
    "Outgoing",
    "StartFrom",
    "Subscription",
    "SubscriptionOptions",
    "connect",
]

_PLANNED = {
    "redis": "redis",
    "rediss": "redis",
    "nats": "nats",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "kafka": "kafka",
}


def connect(
    url: str,
    *,
    source: str = "meshkit://app",
    codec: JsonCodec | None = None,
    max_message_bytes: int = 1_048_576,
    **options: Any,
) -> Broker:
    """A broker for ``url``. Use it as ``async with connect(url) as broker:``.

    ``memory://`` is in-process. ``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (SQLAlchemy's
    convention) is the embedded durable default. ``codec`` encodes data (JSON by default: JSON values, pydantic
    models, dataclasses; subclass :class:`JsonCodec` for another format). ``options`` go to the backend
    (memory: ``dedup_window``, ``retention``; SQLite: also ``visibility_timeout``, ``batch``).
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "memory":
        from meshkit.messaging.memory import MemoryBackend  # noqa: PLC0415 - backends load on demand

        memory = MemoryBackend(**options)
        return Broker(memory, source=source, codec=codec, max_message_bytes=max_message_bytes)
    if scheme == "sqlite":
        from meshkit.messaging.sqlite import SqliteBackend  # noqa: PLC0415

        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path:
            raise ConfigurationError(
                f"bad SQLite broker URL {url!r}",
                hint="use sqlite:///relative/path.db or sqlite:////absolute/path.db",
            )
        backend = SqliteBackend(path, **options)
        return Broker(backend, source=source, codec=codec, max_message_bytes=max_message_bytes)
    if scheme in _PLANNED:
        raise ConfigurationError(
            f"the {scheme}:// broker backend is not available in this version of meshkit",
            hint="use memory:// for now; the embedded SQLite and the server backends are on the roadmap",
        )
    raise ConfigurationError(
        f"unknown broker URL scheme {scheme!r} in {url!r}",
        hint="use one of memory://, sqlite:///path, redis://, nats://, amqp://, kafka://",
    )
