"""``amqp://user:pass@host:port/vhost`` and ``amqps://``: RabbitMQ, through aio-pika (the ``rabbitmq`` extra).

Layout on the server (every name starts with the ``prefix`` option, empty by default)::

    <prefix>meshkit                  topic exchange; a message on topic T is published with routing key T
    <prefix>meshkit.unrouted         its alternate exchange (topic), and a durable classic queue of the same
                                     name bound to it with ``#``: every message no group's queue took
    <prefix>T/G                      one durable queue per (topic T, group G), bound to the exchange with key T;
                                     quorum by default (``queue_type``)
    <prefix>T.dlq/meshkit.dlq-admin  declared with the first group of T: the dead letter view's queue

Groups, members: a group is a queue; its members are consumers of that queue, so they compete and every group
gets every message (the exchange copies it to each group's queue). A message published while its topic had no
group (by meshkit or a plain client) is kept in ``meshkit.unrouted``; every member joining a group moves what that
queue held through the exchange again (confirmed publish, then ack), so those messages reach the groups that
exist by then (a message whose topic still has no group goes back to the queue). Later groups start with the
messages published after they were created: RabbitMQ queues keep no log, so ``replay`` is False. Messages on
topics that never get a group pile up in ``meshkit.unrouted``: watch its depth.

Acks and redelivery: a member holds up to ``prefetch`` unacked messages (``basic.qos``). ``ack`` is ``basic.ack``.
``nack(delivery, delay)`` keeps the message (still unacked on the server) in the member and hands it out again
after ``delay`` with ``attempt + 1``: no republish, so no copy, and the message keeps its place before the later
messages of its key. If the member leaves or dies, the server gives every message it held to another member.
``release`` hands a message out again at once with the same attempt. Delivery counts come from the quorum queue's
``x-delivery-count`` header (how often the server got the message back from a member that left) plus the nacks in
this member; a member that leaves takes its local nack count with it, and the server counts a graceful return
like a failed delivery (RabbitMQ 3.x has no way to return a message uncounted).

Dead letters: the shared runtime moves a message to ``<topic>.dlq`` after ``Retry.attempts`` deliveries. As a
safety net against a message that kills its consumer process again and again, each group queue has
``x-delivery-limit`` (``delivery_limit``, 20) and dead-letters to the exchange with routing key ``<topic>.dlq``
(at-least-once dead-lettering on quorum queues), where the dead letter view's queue (``meshkit.dlq-admin`` on
``<topic>.dlq``, declared when the first group of the topic joins) keeps it: nothing is dropped.

Per-key order: within a member, a message whose key is held by an earlier message (handed out, or waiting for its
nack delay) stays in the member until that one is acked. Members of one group are competing consumers, so two
members can each hold a message of one key at the same time: run one member per group (or one process) when
strict per-key order across members matters.

Dedup: RabbitMQ has no message-id dedup (``dedup`` is False); publishing is at least once: a publish whose
confirm was lost to a broken connection raises :class:`~meshkit.errors.Unavailable` and may have been stored.

Binary mode (the CloudEvents AMQP binding): attributes are AMQP headers ``cloudEvents:id``,
``cloudEvents:source``, ``cloudEvents:specversion``, ``cloudEvents:type``, ``cloudEvents:time``,
``cloudEvents:subject`` and one ``cloudEvents:<name>`` per extension; ``datacontenttype`` is the AMQP
``content-type``; the data is the body. Messages are persistent (``delivery-mode`` 2) with ``message-id`` = id. A
message with content type ``application/cloudevents+json`` (structured mode) is read as well.

Connection: one robust aio-pika connection per backend: it reconnects by itself (``reconnect_interval``) and
restores the queues, bindings and qos; each member consumes again (it consumes through aiormq directly: no
per-message wrapper object). Deliveries received before the break are dropped from the member (the server delivers
them again). Acks go out as one ``multiple`` ack for the tags below the lowest still unacked, one each for the rest.
A publish waits up to ``publish_timeout`` for the connection to come back.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from meshkit._core.optional import require
from meshkit._core.urls import Parser, redact, url_options
from meshkit.errors import ConfigurationError, MeshkitError, Unavailable
from meshkit.messaging.base import Backend, Capabilities, Delivery, GroupChannel, GroupNotFound, Lag, StartFrom
from meshkit.messaging.broker import _ADMIN_GROUP  # the group broker.DeadLetters reads
from meshkit.messaging.message import Envelope, decode_structured

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
    from aiormq.abc import DeliveredMessage

__all__ = ["RabbitMQBackend", "from_url"]

log = logging.getLogger("meshkit.messaging.rabbitmq")

_CE = "cloudEvents:"
#: what a consumer accepts: the AMQP binding's two prefixes and the RabbitMQ (knative) binding's ``ce-``
_READ_PREFIXES = ("cloudEvents:", "cloudEvents_", "ce-", "ce_")
_NAME = re.compile(r"^[a-zA-Z0-9_.:@,/+-]+$")  # what AMQP allows in queue names (pamqp checks it)
_STRUCTURED = "application/cloudevents+json"
#: URL query parameters handed to aio-pika as they are (its own connection options)
_DRIVER_OPTIONS = frozenset(
    {"heartbeat", "name", "cafile", "capath", "cadata", "keyfile", "certfile", "no_verify_ssl", "channel_max"}
)
_QUEUE_TYPES = ("quorum", "classic")


@dataclass(frozen=True, slots=True)
class _Options:
    prefix: str = ""
    exchange: str = "meshkit"
    queue_type: str = "quorum"
    prefetch: int = 256
    delivery_limit: int = 20
    publish_window: int = 1000
    connect_timeout: float = 10.0
    reconnect_interval: float = 1.0
    publish_timeout: float = 30.0
    fill_timeout: float = 1.0


_FIELDS: dict[str, Parser] = {
    "prefix": str,
    "exchange": str,
    "queue_type": str,
    "prefetch": int,
    "delivery_limit": int,
    "publish_window": int,
    "connect_timeout": float,
    "reconnect_interval": float,
    "publish_timeout": float,
    "fill_timeout": float,
}


def _headers(envelope: Envelope) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "cloudEvents:specversion": "1.0",
        "cloudEvents:id": envelope.id,
        "cloudEvents:source": envelope.source,
        "cloudEvents:type": envelope.type,
        "cloudEvents:time": envelope.time,
    }
    if envelope.subject is not None:
        headers["cloudEvents:subject"] = envelope.subject
    for name, value in envelope.extensions.items():
        headers[_CE + name] = value
    return headers


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _envelope(
    headers: Mapping[str, Any] | None, body: bytes, content_type: str | None, message_id: str | None
) -> Envelope:
    """The envelope of an AMQP message: binary mode (``cloudEvents:*`` headers) or structured mode.

    A message from a plain client that carries neither is still handed to the group (so it can be handled or
    dead-lettered): its id is the AMQP message-id (or a new one), its data the body.
    """
    if content_type is not None and content_type.startswith(_STRUCTURED):
        return decode_structured(body)
    attrs: dict[str, str] = {}
    for name, value in (headers or {}).items():
        for prefix in _READ_PREFIXES:
            if name.startswith(prefix):
                attr = name[len(prefix) :].lower()
                if attr == "time" and isinstance(value, int | float | datetime):  # an AMQP timestamp
                    stamp = value if isinstance(value, datetime) else datetime.fromtimestamp(value / 1000, UTC)
                    attrs[attr] = stamp.astimezone(UTC).isoformat()
                else:
                    attrs[attr] = _text(value)
                break
    envelope_id = attrs.pop("id", "") or message_id or uuid.uuid4().hex
    attrs.pop("specversion", None)
    return Envelope(
        id=envelope_id,
        source=attrs.pop("source", "amqp://unknown"),
        type=attrs.pop("type", "unknown"),
        time=attrs.pop("time", "") or datetime.now(UTC).isoformat(),
        datacontenttype=content_type or attrs.pop("datacontenttype", "") or "application/octet-stream",
        data=body,
        subject=attrs.pop("subject", None),
        extensions=attrs,
    )


class RabbitMQBackend(Backend):
    capabilities = Capabilities(replay=False, dedup=False, durable=True, multi_process=True)

    def __init__(self, url: str, **options: Any) -> None:
        unknown = sorted(set(options) - set(_FIELDS))
        if unknown:
            raise ConfigurationError(
                f"unknown RabbitMQ broker option(s) {', '.join(unknown)} for {redact(url)}",
                hint=f"known options: {', '.join(_FIELDS)}",
            )
        try:
            self.options = _Options(**options)
        except TypeError as exc:  # pragma: no cover - names were checked above
            raise ConfigurationError(str(exc)) from exc
        o = self.options
        if o.queue_type not in _QUEUE_TYPES:
            raise ConfigurationError(
                f"bad RabbitMQ option queue_type={o.queue_type!r}", hint="use queue_type=quorum or queue_type=classic"
            )
        if o.prefetch < 1 or o.publish_window < 1 or o.delivery_limit < 1:
            raise ConfigurationError(
                "bad RabbitMQ options: prefetch, publish_window and delivery_limit must be at least 1",
                hint=f"got prefetch={o.prefetch}, publish_window={o.publish_window}, delivery_limit={o.delivery_limit}",
            )
        self.url = url
        self._safe_url = redact(url)
        self.exchange = f"{o.prefix}{o.exchange}"
        self.unrouted = f"{self.exchange}.unrouted"
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    # -- connection ------------------------------------------------------------------------------------------------

    async def _connect(self) -> AbstractRobustConnection:
        if self._closed:
            raise ConfigurationError(f"the RabbitMQ broker at {self._safe_url} is closed")
        if self._connection is not None:
            return self._connection
        async with self._lock:
            current = self._current()  # another task may have connected while this one waited for the lock
            if current is not None:
                return current
            aio_pika = require("aio_pika", "rabbitmq")
            o = self.options
            try:
                connection: AbstractRobustConnection = await asyncio.wait_for(
                    aio_pika.connect_robust(self.url, reconnect_interval=o.reconnect_interval),
                    o.connect_timeout,
                )
            except TimeoutError as exc:
                raise Unavailable(
                    f"cannot reach RabbitMQ at {self._safe_url}: no answer within {o.connect_timeout:g} s",
                    hint="check the host and port, or raise connect_timeout",
                ) from exc
            except Exception as exc:
                raise self._connect_error(exc) from exc
            try:
                publisher = await connection.channel(publisher_confirms=True)
                exchange_type = aio_pika.ExchangeType.TOPIC
                await publisher.declare_exchange(self.unrouted, exchange_type, durable=True)
                await publisher.declare_exchange(
                    self.exchange, exchange_type, durable=True, arguments={"alternate-exchange": self.unrouted}
                )
                await self._declare_unrouted(publisher)
            except Exception as exc:
                await connection.close()
                raise self._error("cannot set up the exchanges", exc) from exc
            connection.reconnect_callbacks.add(self._on_reconnect)
            self._publisher = publisher
            self._connection = connection
            log.debug("connected to RabbitMQ", extra={"url": self._safe_url, "exchange": self.exchange})
            return connection

    def _current(self) -> AbstractRobustConnection | None:
        return self._connection

    def _on_reconnect(self, connection: Any) -> None:
        log.warning("reconnected to RabbitMQ", extra={"url": self._safe_url})

    def _connect_error(self, exc: BaseException) -> MeshkitError:
        text = f"{type(exc).__name__}: {exc}"
        if "ACCESS_REFUSED" in text or "Authentication" in text or "authenticat" in text.lower():
            return ConfigurationError(
                f"RabbitMQ at {self._safe_url} refused the login or the vhost: {text}",
                hint="check the user, password and vhost in the URL (amqp://user:pass@host:port/vhost)",
            )
        if "NOT_ALLOWED" in text or "vhost" in text.lower() or "Connection.Close" in text:
            return ConfigurationError(
                f"RabbitMQ at {self._safe_url} refused the vhost: {text}",
                hint="create the vhost and give the user permissions on it (rabbitmqctl add_vhost, set_permissions)",
            )
        return Unavailable(
            f"cannot reach RabbitMQ at {self._safe_url}: {text}",
            hint="is the server running and the host/port right?",
        )

    def _error(self, what: str, exc: BaseException) -> MeshkitError:
        if isinstance(exc, MeshkitError):
            return exc
        return Unavailable(f"RabbitMQ at {self._safe_url}: {what}: {type(exc).__name__}: {exc}")

    # -- names -----------------------------------------------------------------------------------------------------

    def _check_name(self, what: str, name: str) -> None:
        if not _NAME.match(name) or len(name) > 120:
            raise ConfigurationError(
                f"invalid {what} name {name!r} for RabbitMQ",
                hint="use up to 120 letters, digits and - _ . : @ , / + (a topic is a routing key, a group a queue)",
            )

    def queue_name(self, topic: str, group: str) -> str:
        return f"{self.options.prefix}{topic}/{group}"

    def _group_arguments(self, topic: str) -> dict[str, Any]:
        o = self.options
        args: dict[str, Any] = {
            "x-queue-type": o.queue_type,
            "x-dead-letter-exchange": self.exchange,
            "x-dead-letter-routing-key": f"{topic}.dlq",
        }
        if o.queue_type == "quorum" and not topic.endswith(".dlq"):
            # a dead letter queue is read by listing (fetch + release): no limit there, it would drop its messages
            args["x-delivery-limit"] = o.delivery_limit
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        if topic.endswith(".dlq"):
            del args["x-dead-letter-exchange"], args["x-dead-letter-routing-key"]
        return args

    async def _declare_unrouted(self, channel: AbstractRobustChannel) -> Any:
        """The queue that keeps every message no group's queue took (bound to the alternate exchange with ``#``)."""
        queue = await channel.declare_queue(self.unrouted, durable=True, arguments={"x-queue-type": "classic"})
        await queue.bind(self.unrouted, routing_key="#")
        return queue

    # -- publishing ------------------------------------------------------------------------------------------------

    async def append(self, topic: str, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        self._check_name("topic", topic)
        spec = require("aiormq", "rabbitmq").spec
        items = [
            (
                topic,
                e.data,
                spec.Basic.Properties(
                    content_type=e.datacontenttype, delivery_mode=2, message_id=e.id, headers=_headers(e)
                ),
            )
            for e in envelopes
        ]
        await self._publish(items)

    async def _publish(self, items: Sequence[tuple[str, bytes, Any]]) -> None:
        """Publish ``(routing key, body, properties)`` in order; returns when the server confirmed every one.

        Up to ``publish_window`` publishes are outstanding at once (their confirms arrive together).
        """
        await self._connect()
        publisher = self._publisher
        assert publisher is not None
        spec = require("aiormq", "rabbitmq").spec
        o = self.options
        topics = ", ".join(sorted({repr(i[0]) for i in items}))
        try:
            async with asyncio.timeout(o.publish_timeout):
                channel = await publisher.get_underlay_channel()  # waits while the connection is being restored
        except TimeoutError as exc:
            raise Unavailable(
                f"RabbitMQ at {self._safe_url} has been unreachable for {o.publish_timeout:g} s; "
                f"nothing was published to {topics}"
            ) from exc

        async def one(routing_key: str, body: bytes, properties: Any) -> None:
            # wait=False: do not hold the channel's lock until the frame is written (that serializes a window);
            # the confirm is still awaited, and the window bounds what is outstanding
            result = await channel.basic_publish(  # type: ignore[call-arg]  # aiormq.Channel takes wait
                body, exchange=self.exchange, routing_key=routing_key, properties=properties, wait=False
            )
            if not isinstance(result, spec.Basic.Ack):
                raise Unavailable(f"RabbitMQ at {self._safe_url} refused a message on {routing_key!r}: {result!r}")

        async def windows() -> None:
            for start in range(0, len(items), o.publish_window):
                window = items[start : start + o.publish_window]
                outcomes = await asyncio.gather(*(one(*i) for i in window), return_exceptions=True)
                errors = [x for x in outcomes if isinstance(x, BaseException)]
                if errors:
                    raise errors[0]

        try:
            # confirms are bounded too: a channel lost while they were outstanding may never resolve them (seen
            # once in a restart test: a publish waited forever), and a caller must hear "unavailable", not hang
            async with asyncio.timeout(o.publish_timeout):
                await (one(*items[0]) if len(items) == 1 else windows())
        except MeshkitError:
            raise
        except TimeoutError as exc:
            raise Unavailable(
                f"RabbitMQ at {self._safe_url} did not confirm a publish to {topics} within {o.publish_timeout:g} s",
                hint="the message may or may not be stored: retrying may publish it twice",
            ) from exc
        except Exception as exc:
            raise Unavailable(
                f"RabbitMQ at {self._safe_url} did not confirm a publish to {topics}: {type(exc).__name__}: {exc}",
                hint="the message may or may not be stored: retrying may publish it twice",
            ) from exc

    # -- consuming -------------------------------------------------------------------------------------------------

    async def group(self, topic: str, group: str, start: StartFrom) -> GroupChannel:
        self._check_name("topic", topic)
        self._check_name("group", group)
        if start not in ("earliest", "latest"):
            raise ConfigurationError(
                f"RabbitMQ cannot start group {group!r} on {topic!r} at {start!r}: its queues keep no log",
                hint='use start="earliest" (or "latest"); for replay use the sqlite or kafka backend',
            )
        connection = await self._connect()
        o = self.options
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=o.prefetch)
            queue = await channel.declare_queue(
                self.queue_name(topic, group), durable=True, arguments=self._group_arguments(topic)
            )
            await queue.bind(self.exchange, routing_key=topic)
            if not topic.endswith(".dlq"):  # the dead letter view's queue exists before the first dead letter
                dlq = f"{topic}.dlq"
                admin = await channel.declare_queue(
                    self.queue_name(dlq, _ADMIN_GROUP), durable=True, arguments=self._group_arguments(dlq)
                )
                await admin.bind(self.exchange, routing_key=dlq)
            await self._drain_unrouted(connection)
            ready = queue.declaration_result.message_count or 0
            member = _RabbitChannel(self, topic, group, channel, queue.name, ready)
            await member.consume()
            channel.reopen_callbacks.add(member.reopened)
        except MeshkitError:
            raise
        except Exception as exc:
            raise self._error(f"cannot join group {group!r} on {topic!r}", exc) from exc
        return member

    async def lag(self, topic: str, group: str) -> Lag:
        """A passive ``queue.declare`` of the group's queue: its ``message_count`` is the messages ready (not
        delivered to a member). AMQP does not tell how many a member holds unacked (the management plugin's HTTP
        API does), so ``in_flight`` and ``total`` are None."""
        self._check_name("topic", topic)
        self._check_name("group", group)
        name = self.queue_name(topic, group)
        connection = await self._connect()
        not_found = require("aiormq", "rabbitmq").exceptions.ChannelNotFoundEntity
        timeout = self.options.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                channel = await connection.channel(publisher_confirms=False)
                try:
                    queue = await channel.declare_queue(name, passive=True)
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
        except not_found as exc:  # the server closed the channel: 404 NOT_FOUND
            raise GroupNotFound(topic, group, detail=f"no queue {name!r}") from exc
        except TimeoutError as exc:
            raise Unavailable(f"RabbitMQ at {self._safe_url} did not answer within {timeout:g} s") from exc
        except Exception as exc:
            raise self._error(f"cannot read the queue of group {group!r} on {topic!r}", exc) from exc
        return Lag(waiting=queue.declaration_result.message_count or 0, in_flight=None)

    async def _drain_unrouted(self, connection: AbstractRobustConnection) -> None:
        """Route again what was published while no group took it: the groups joined since get it now.

        Takes as many messages as the queue held when this started, in windows of ``publish_window``: republished
        through the exchange with their routing keys (confirmed), then acked at once, so a crash in between leaves
        them in place (routed again later: at least once). A message whose topic still has no group comes back.
        """
        channel = await connection.channel(publisher_confirms=False)
        try:
            unrouted = await self._declare_unrouted(channel)
            waiting = unrouted.declaration_result.message_count or 0
            if not waiting:
                return
            window = self.options.publish_window
            await channel.set_qos(prefetch_count=min(window, waiting))
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            tag = await unrouted.consume(inbox.put)
            moved = 0
            while moved < waiting:
                try:
                    async with asyncio.timeout(max(self.options.fill_timeout, 1.0)):
                        batch = [await inbox.get()]
                except TimeoutError:
                    break  # another member took the rest
                while len(batch) < window and len(batch) + moved < waiting and not inbox.empty():
                    batch.append(inbox.get_nowait())
                await self._publish([(m.routing_key or "", m.body, m.properties) for m in batch])
                await batch[-1].ack(multiple=True)
                moved += len(batch)
            await unrouted.cancel(tag)
            log.info("routed parked messages again", extra={"count": moved})
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
            self._publisher = None


@dataclass(slots=True)
class _Entry:
    offset: int
    message: DeliveredMessage
    envelope: Envelope
    attempt: int
    due: float = 0.0

    def __lt__(self, other: _Entry) -> bool:
        return self.offset < other.offset


class _RabbitChannel(GroupChannel):
    """One member: a channel with one consumer on the group's queue, and the deliveries it holds.

    It consumes with aiormq directly (aio-pika's robust channel restores the queue, its binding and the qos after a
    reconnect; :meth:`reopened` consumes again): no per-message wrapper object, no second task per delivery.
    """

    def __init__(
        self,
        backend: RabbitMQBackend,
        topic: str,
        group: str,
        channel: AbstractRobustChannel,
        queue: str,
        ready: int,
    ) -> None:
        self._b = backend
        self._topic = topic
        self._group = group
        self._channel = channel
        self._queue = queue
        self._tag = f"meshkit.{uuid.uuid4().hex}"
        self._buffer: list[_Entry] = []  # received, not handed out; sorted by offset
        self._out: dict[int, _Entry] = {}  # handed out, not settled
        self._held: dict[str, int] = {}  # key -> the offset holding it
        self._unacked: dict[Any, set[int]] = {}  # aiormq channel -> delivery tags received and not acked
        self._next = 0
        self._wake = asyncio.Event()
        self._fill = ready  # messages waiting in the queue when this member joined
        self._closed = False

    async def consume(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        self._unacked = {underlay: set()}  # the tags of a broken channel are void
        await underlay.basic_consume(self._queue, self._on_message, consumer_tag=self._tag)

    async def reopened(self, channel: Any) -> None:
        if self._closed:
            return
        try:
            await self.consume()
        except Exception:
            log.exception("could not consume again after a reconnect", extra={"topic": self._topic})
        else:
            log.info("consuming again after a reconnect", extra={"topic": self._topic, "group": self._group})

    async def _on_message(self, message: DeliveredMessage) -> None:
        if self._closed:
            return  # the channel's close gives it back
        properties = message.header.properties
        headers = properties.headers
        try:
            envelope = _envelope(headers, message.body, properties.content_type, properties.message_id)
        except MeshkitError:  # a malformed structured message: keep its bytes, the runtime dead-letters it
            envelope = _envelope(None, message.body, "application/json", properties.message_id)
        count = headers.get("x-delivery-count") if headers else None
        redelivered = bool(getattr(message.delivery, "redelivered", False))
        attempt = 1 + (count if isinstance(count, int) else (1 if redelivered else 0))
        tags = self._unacked.get(message.channel)
        if tags is not None and message.delivery_tag is not None:
            tags.add(message.delivery_tag)
        self._next += 1
        self._buffer.append(_Entry(self._next, message, envelope, attempt))
        self._wake.set()

    def _drop_stale(self) -> None:
        """Forget deliveries from a channel that broke: the server delivers them again."""
        if not self._buffer or not self._buffer[0].message.channel.is_closed:
            return
        stale = [e for e in self._buffer if e.message.channel.is_closed]
        self._buffer = [e for e in self._buffer if not e.message.channel.is_closed]
        for e in stale:
            self._unhold(e)
        log.info("dropped deliveries of a broken channel", extra={"topic": self._topic, "count": len(stale)})

    def _unhold(self, e: _Entry) -> None:
        key = e.envelope.key
        if key is not None and self._held.get(key) == e.offset:
            del self._held[key]

    def _collect(self, limit: int, now: float) -> tuple[list[Delivery], float | None]:
        out: list[Delivery] = []
        keep: list[_Entry] = []
        blocked: set[str] = set()
        next_due: float | None = None
        buffer = self._buffer
        for i, e in enumerate(buffer):
            if len(out) >= limit:
                keep.extend(buffer[i:])
                break
            key = e.envelope.key
            if e.due > now:
                next_due = e.due if next_due is None else min(next_due, e.due)
                keep.append(e)
                if key is not None:
                    blocked.add(key)
                continue
            if key is not None:
                if key in blocked or self._held.get(key, e.offset) != e.offset:
                    keep.append(e)
                    blocked.add(key)
                    continue
                self._held[key] = e.offset
            self._out[e.offset] = e
            out.append(Delivery(self._topic, self._group, e.envelope, e.offset, e.attempt))
        self._buffer = keep
        return out, next_due

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + wait
        if self._fill:
            # messages were waiting when this member joined: give the server a moment to deliver them, so that
            # a fetch that does not wait (the dead letter view) sees them
            target = min(self._fill, limit, self._b.options.prefetch)
            self._fill = 0
            end = now + self._b.options.fill_timeout
            while len(self._buffer) < target and not self._closed:
                self._wake.clear()
                if loop.time() >= end:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(end - loop.time()):
                        await self._wake.wait()
        while not self._closed:
            self._wake.clear()
            self._drop_stale()
            now = loop.time()
            out, next_due = self._collect(limit, now)
            if out:
                return out
            remaining = deadline - now
            if remaining <= 0:
                return []
            if next_due is not None:
                remaining = min(remaining, max(next_due - now, 0.0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
        return []

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """``basic.ack``: one ``multiple`` ack for the tags below the lowest still unacked, one each for the rest."""
        by_channel: dict[Any, list[int]] = {}
        for d in deliveries:
            e = self._out.pop(d.offset, None)
            if e is None:
                continue
            self._unhold(e)
            tag = e.message.delivery_tag
            if e.message.channel.is_closed or tag is None:
                continue  # the server delivers it again (at least once)
            by_channel.setdefault(e.message.channel, []).append(tag)
        self._wake.set()
        for channel, tags in by_channel.items():
            unacked = self._unacked.get(channel)
            if unacked is None:
                continue  # a channel that broke
            unacked.difference_update(tags)
            low = min(unacked, default=None)
            below = [t for t in tags if low is None or t < low]
            try:
                if below:
                    await channel.basic_ack(max(below), multiple=True)
                for tag in tags:
                    if low is not None and tag > low:
                        await channel.basic_ack(tag)
            except Exception as exc:
                if channel.is_closed:
                    continue  # broke meanwhile: those messages come again
                raise self._b._error(f"cannot ack on {self._topic!r}", exc) from exc

    def _back(self, d: Delivery, attempt: int, due: float) -> _Entry | None:
        e = self._out.pop(d.offset, None)
        if e is None:
            return None
        if self._closed or e.message.channel.is_closed:
            self._unhold(e)
            return None
        e.attempt = attempt
        e.due = due
        bisect.insort(self._buffer, e)
        self._wake.set()
        return e

    async def nack(self, delivery: Delivery, delay: float) -> None:
        # the message stays unacked in this member and keeps its key until it is acked (see the module docstring)
        self._back(delivery, delivery.attempt + 1, asyncio.get_running_loop().time() + delay)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            e = self._back(d, d.attempt, 0.0)
            if e is not None:
                self._unhold(e)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._buffer.clear()
        self._out.clear()
        self._held.clear()
        self._channel.reopen_callbacks.discard(self.reopened)
        with contextlib.suppress(Exception):
            await self._channel.close()  # the server gives whatever this member held to the others


def from_url(url: str, **options: Any) -> RabbitMQBackend:
    """``amqp://user:pass@host:port/vhost?prefix=...``; options may come as query parameters or keyword arguments.

    Query parameters that aio-pika knows (``heartbeat``, ``name``, TLS files for ``amqps://``) go to it.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ConfigurationError(
            f"bad RabbitMQ broker URL {redact(url)!r}", hint="use amqp://user:pass@host:5672/vhost (or amqps://)"
        )
    ours, driver = url_options(url, _FIELDS, options, what="RabbitMQ broker", passthrough=_DRIVER_OPTIONS)
    clean = urlunsplit(parts._replace(query=urlencode(driver)))
    return RabbitMQBackend(clean, **ours)
