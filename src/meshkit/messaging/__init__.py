"""Async messaging: point-to-point queues and pub/sub topics, one API over every backend.

::

    async with meshkit.messaging.connect("memory://") as broker:
        await broker.subscribe("order.created", send_email, group="email")
        await broker.publish("order.created", {"id": 42}, key="order-42")

Members of one group compete for messages (a work queue); every group gets every message (fan-out). Delivery is
at least once: a message is acked after its handler returns, delivered again with backoff when the handler
raises, and moved to ``<topic>.dlq`` after ``Retry.attempts`` deliveries. Messages of one key are handled in
publish order. ``await broker.lag(topic, group)`` says how far a group is behind. docs/messaging.md has the details
and the wire format.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from meshkit.errors import ConfigurationError
from meshkit.messaging._consumer import Handler, Subscription, SubscriptionOptions
from meshkit.messaging.base import Backend, Capabilities, Delivery, GroupChannel, GroupNotFound, Lag, StartFrom
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
    "GroupNotFound",
    "Handler",
    "JsonCodec",
    "Lag",
    "Message",
    "Outgoing",
    "StartFrom",
    "Subscription",
    "SubscriptionOptions",
    "connect",
]

#: URL scheme -> the backend module that opens it (``from_url(url, **options) -> Backend``). Modules load on demand,
#: so a missing optional driver only matters to the URL that needs it.
_BACKENDS = {
    "memory": "memory",
    "sqlite": "sqlite",
    "redis": "redis",
    "rediss": "redis",
    "nats": "nats",
    "tls": "nats",
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
    convention) is the embedded durable default. ``redis://``, ``nats://``, ``amqp://`` and ``kafka://`` reach
    servers (each needs its extra: ``pip install 'meshkit[redis]'``). ``codec`` encodes data (JSON by default: JSON
    values, pydantic models, dataclasses; subclass :class:`JsonCodec` for another format). ``options`` go to the
    backend (docs/messaging.md lists each backend's).
    """
    scheme = urlsplit(url).scheme
    name = _BACKENDS.get(scheme)
    if name is None:
        raise ConfigurationError(
            f"unknown broker URL scheme {scheme!r} in {url!r}",
            hint="use one of memory://, sqlite:///path, redis://, nats://, amqp://, kafka://",
        )
    try:
        module = importlib.import_module(f"meshkit.messaging.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"meshkit.messaging.{name}":
            raise
        raise ConfigurationError(
            f"the {scheme}:// broker backend is not available in this version of meshkit",
            hint="use memory:// or sqlite:///path",
        ) from exc
    backend: Backend = module.from_url(url, **options)
    return Broker(backend, source=source, codec=codec, max_message_bytes=max_message_bytes)
