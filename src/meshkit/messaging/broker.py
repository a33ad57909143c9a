"""The public face of messaging: publish, subscribe, dead letters. One ``Broker`` over any backend."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any

from meshkit._core.ids import new_ids
from meshkit.errors import ConfigurationError, MessageDecodeError, MessageTooLarge
from meshkit.messaging._consumer import Handler, Subscription, SubscriptionOptions
from meshkit.messaging.base import Backend, Capabilities, Delivery, Lag
from meshkit.messaging.message import (
    NO_EXTENSIONS,
    Envelope,
    JsonCodec,
    Message,
    check_extension,
    make_envelope,
    make_message,
)
from meshkit.tracing import current_headers

__all__ = ["Broker", "DeadLetters", "Outgoing"]

log = logging.getLogger("meshkit.messaging")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message of a :meth:`Broker.publish_batch`."""

    data: Any
    key: str | None = None
    headers: Mapping[str, str] | None = None
    id: str | None = None
    type: str | None = None
    subject: str | None = None


class Broker:
    """Publish to topics and subscribe consumer groups, over the backend a URL chose (see ``connect``).

    Use it as an async context manager; ``aclose()`` drains every subscription (running handlers finish) and then
    closes the backend.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        source: str = "meshkit://app",
        codec: JsonCodec | None = None,
        max_message_bytes: int = 1_048_576,
    ) -> None:
        self._backend = backend
        self._source = source
        self._codec = codec or JsonCodec()
        self._max_bytes = max_message_bytes
        self._subscriptions: list[Subscription] = []
        self._closed = False
        self._publishing = 0  # appends in flight; aclose waits for them
        self._published = asyncio.Event()
        self._stamp: tuple[str | None, datetime] = (None, datetime.fromtimestamp(0, UTC))  # the last time parsed

    @property
    def capabilities(self) -> Capabilities:
        return self._backend.capabilities

    # -- publishing ------------------------------------------------------------------------------------------------

    def _envelopes(self, topic: str, items: Sequence[Outgoing | Any]) -> list[Envelope]:
        """Encode ``items`` (``Outgoing`` values, or plain data) as envelopes.

        This is the publisher's hot path: what every message of one publish shares (trace context, time, ids,
        the size of the shared headers) is computed once, and plain data skips the per-message header work.
        """
        trace = current_headers()  # W3C trace context: the handlers will run inside it
        trace_size = sum(len(k) + len(v) for k, v in trace.items())
        now = datetime.now(UTC).isoformat()
        encode = self._codec.encode
        source, limit = self._source, self._max_bytes
        shared = MappingProxyType(dict(trace)) if trace else NO_EXTENSIONS  # immutable: one for the whole batch
        ids = new_ids(sum(1 for i in items if not isinstance(i, Outgoing) or i.id is None))
        envelopes = []
        for item in items:
            if not isinstance(item, Outgoing):
                data, content_type = encode(item)
                envelope = make_envelope(ids.pop(), source, topic, now, content_type, data, None, shared)
                size = len(data) + trace_size
            else:
                data, content_type = encode(item.data)
                extensions: dict[str, str] = {}
                if item.headers:
                    for name, value in item.headers.items():
                        extensions[check_extension(name)] = str(value)
                for name, value in trace.items():
                    extensions.setdefault(name, value)
                if item.key is not None:
                    extensions["partitionkey"] = str(item.key)
                envelope = Envelope(
                    item.id or ids.pop(),
                    source,
                    item.type or topic,
                    now,
                    content_type,
                    data,
                    item.subject,
                    extensions,
                )
                size = envelope.size()
            if size > limit:
                raise MessageTooLarge(topic, size, limit)
            envelopes.append(envelope)
        return envelopes

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # the CloudEvents attribute's name
        type: str | None = None,
        subject: str | None = None,
    ) -> str:
        """Publish one message; returns its id. Messages with the same ``key`` are handled in order."""
        (envelope,) = self._envelopes(topic, [Outgoing(data, key, headers, id, type, subject)])
        await self._append(topic, [envelope])
        return envelope.id

    async def publish_batch(self, topic: str, items: Iterable[Outgoing | Any]) -> list[str]:
        """Publish many messages in one backend call, in order; plain values are wrapped as ``Outgoing(value)``."""
        envelopes = self._envelopes(topic, list(items))
        await self._append(topic, envelopes)
        return [e.id for e in envelopes]

    async def _append(self, topic: str, envelopes: Sequence[Envelope], *, dedup: bool = True) -> None:
        if self._closed:
            raise ConfigurationError("this broker is closed", hint="publish before aclose(), or open a new broker")
        if not topic or any(c.isspace() for c in topic):
            raise ConfigurationError(f"invalid topic name {topic!r}", hint="use a non-empty name without spaces")
        if not dedup:  # re-published copies (dead letters, replays) get fresh ids
            envelopes = [replace(e, id=i) for e, i in zip(envelopes, new_ids(len(envelopes)), strict=True)]
        self._publishing += 1
        try:
            await self._backend.append(topic, envelopes)
        finally:
            self._publishing -= 1
            if not self._publishing:
                self._published.set()

    # -- consuming -------------------------------------------------------------------------------------------------

    async def subscribe(
        self, topic: str, handler: Handler, *, group: str, options: SubscriptionOptions | None = None
    ) -> Subscription:
        """Start consuming ``topic`` as a member of ``group`` with ``async def handler(message)``.

        Members of one group share the messages (a work queue); every group gets every message (fan-out).
        """
        method = type(handler).__dict__.get("__call__")  # a callable object with `async def __call__`
        if not (inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(method)):
            name = getattr(handler, "__qualname__", repr(handler))
            raise ConfigurationError(
                f"handler {name} for {topic!r} is not async",
                hint=f"define it as `async def {getattr(handler, '__name__', 'handler')}(message): ...`",
            )
        if self._closed:
            raise ConfigurationError("this broker is closed", hint="subscribe before aclose(), or open a new broker")
        opts = options or SubscriptionOptions()
        channel = await self._backend.group(topic, group, opts.start)
        subscription = Subscription(self, topic, group, handler, opts, channel)
        self._subscriptions.append(subscription)
        subscription.start()
        return subscription

    def _decode(self, delivery: Delivery, *, lenient: bool = False) -> Message:
        """The handler's view of a delivery. ``lenient`` (the dead letter view) keeps undecodable data as bytes."""
        e = delivery.envelope
        if e.time == self._stamp[0]:  # the messages of one batch share their time: parse it once
            stamp = self._stamp[1]
        else:
            try:
                stamp = datetime.fromisoformat(e.time)
            except ValueError as exc:
                if not lenient:
                    raise MessageDecodeError(f"bad time attribute {e.time!r}") from exc
                stamp = datetime.fromtimestamp(0, UTC)
            else:
                self._stamp = (e.time, stamp)
        try:
            data = self._codec.decode(e.data, e.datacontenttype)
        except MessageDecodeError:
            if not lenient:
                raise
            data = e.data
        headers = e.extensions
        key = headers.get("partitionkey")
        if key is not None:
            headers = {k: v for k, v in headers.items() if k != "partitionkey"}
        return make_message(delivery.topic, data, e, stamp, key, headers, delivery.attempt, delivery.offset)

    async def lag(self, topic: str, group: str) -> Lag:
        """How far consumer ``group`` is behind on ``topic``: messages ``waiting`` for a member, ``in_flight`` (held by
        a member, not acked yet) and their ``total``; a part the broker cannot tell is ``None`` (docs/messaging.md,
        "Lag", says which backend knows what).

        Raises :class:`~meshkit.messaging.GroupNotFound` (a ``LookupError``) if the group (or the topic) does not
        exist, and :class:`~meshkit.errors.Unavailable` if the broker cannot be reached. Reading it changes nothing.
        """
        if self._closed:
            raise ConfigurationError("this broker is closed", hint="ask before aclose(), or open a new broker")
        return await self._backend.lag(topic, group)

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has begun."""
        return self._closed

    def dead_letters(self, topic: str) -> DeadLetters:
        """The dead letter topic of ``topic`` (``<topic>.dlq``): list its messages, replay or discard them."""
        return DeadLetters(self, topic)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Refuse new publishes, let those in flight finish, drain every subscription, close the backend."""
        if self._closed:
            return
        self._closed = True
        while self._publishing:
            self._published.clear()
            await self._published.wait()
        for subscription in self._subscriptions:
            await subscription.aclose()
        await self._backend.aclose()

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


_ADMIN_GROUP = "meshkit.dlq-admin"


class DeadLetters:
    """Messages a topic's handlers gave up on. ``list`` shows them; ``replay`` sends them back to their topic;
    ``discard`` drops them. Both act on every message listed, or on the ids given."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self._broker = broker
        self.topic = topic
        self.dlq_topic = f"{topic}.dlq"

    async def _take(self, limit: int) -> tuple[list[Delivery], Any]:
        channel = await self._broker._backend.group(self.dlq_topic, _ADMIN_GROUP, "earliest")
        deliveries = await channel.fetch(limit, 0.0)
        return deliveries, channel

    async def list(self, limit: int = 1000) -> list[Message]:
        deliveries, channel = await self._take(limit)
        try:
            return [self._broker._decode(d, lenient=True) for d in deliveries]
        finally:
            await channel.release(deliveries)
            await channel.aclose()

    async def _settle(self, ids: Iterable[str] | None, *, replay: bool, limit: int) -> int:
        wanted = set(ids) if ids is not None else None
        deliveries, channel = await self._take(limit)
        chosen = [d for d in deliveries if wanted is None or d.envelope.id in wanted]
        try:
            if replay and chosen:
                originals = [
                    replace(
                        d.envelope,
                        extensions={k: v for k, v in d.envelope.extensions.items() if not k.startswith("dlq")},
                    )
                    for d in chosen
                ]
                await self._broker._append(self.topic, originals, dedup=False)
            await channel.ack(chosen)
        finally:
            await channel.release([d for d in deliveries if d not in chosen])
            await channel.aclose()
        action = "replayed" if replay else "discarded"
        log.info("dead letters settled", extra={"topic": self.topic, action: len(chosen)})
        return len(chosen)

    async def replay(self, ids: Iterable[str] | None = None, *, limit: int = 1000) -> int:
        """Publish dead letters back to their topic (with new ids); returns how many."""
        return await self._settle(ids, replay=True, limit=limit)

    async def discard(self, ids: Iterable[str] | None = None, *, limit: int = 1000) -> int:
        """Drop dead letters; returns how many."""
        return await self._settle(ids, replay=False, limit=limit)
