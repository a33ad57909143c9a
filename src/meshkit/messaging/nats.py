"""``nats://host:4222`` (or ``tls://``): NATS JetStream, with nats-py.

Layout on the server (docs/messaging.md has it for plain clients)::

    stream   <STREAM>            subjects "<prefix>.>", file storage, limits retention (``retention``), a
                                 duplicate window (``dedup_window``)
    subject  <prefix>.<topic>    one subject per topic; dead letters go to "<prefix>.<topic>.dlq"
    consumer <group>__<topic>-<hash>
                                 one durable pull consumer per (topic, group), filtered on the topic's subject,
                                 explicit acks, ack wait = ``ack_wait``, max_deliver unlimited

Every broker opened with the same ``prefix`` shares one stream (its name is the prefix in capitals with ``.``
turned into ``_``, unless ``stream`` says otherwise), so a test or a tenant gets its own namespace with
``?prefix=...`` and drops it by deleting the stream.

How the contract maps to JetStream:

- groups: members of a group pull from the same durable consumer, so they compete; each group has its own durable,
  so every group gets every message. A new group starts where ``start`` says (``DeliverPolicy`` ALL, NEW,
  BY_START_SEQUENCE for an offset (the stream sequence, which is ``Message.offset``), BY_START_TIME).
- messages are CloudEvents in binary mode: the data is the payload; ``datacontenttype`` is the ``content-type``
  header and every other attribute a ``ce-<name>`` header (the CloudEvents NATS binding, as the Go SDK writes it).
  A message in structured mode (``content-type: application/cloudevents+json``) is read too.
- acks: ``+ACK`` on the message's reply subject. The consumer's ack wait is the visibility timeout: a message
  neither acked nor nacked within it (its member died) is delivered again, to any member.
- fetch: one pull request (``$JS.API.CONSUMER.MSG.NEXT``) is open at a time per member; messages land in the
  member's inbox subscription and are handed out from there, so one that arrives after a fetch has given up is
  never lost, only handed out by the next fetch. A fetch that may not wait sends a ``no_wait`` request.
- nack: ``-NAK`` with the delay: the server delivers the message again after it, with its delivery count + 1.
  ``max_deliver`` is unlimited: the shared runtime counts deliveries and moves a message to the dead letter topic
  after ``Retry.attempts``, so the server never drops one silently before that.
- per-key order: JetStream hands out messages of one key to whichever pull comes first, so each member keeps the
  order itself. A message whose key is held by an earlier message still in this member's hands is kept back
  (not handed to the runtime) until the earlier one is acked; a nacked keyed message is retried by this member
  after the delay (it keeps its key, and its attempt count goes up here) rather than given back to the server,
  where another member could take it while this one holds its successors. Messages kept back are kept alive
  with ``+WPI`` (in progress) so the ack wait does not run out on them. Order is per member: two members of one
  group can each hold a message of one key at once (use one member, or keys that map to one member, where a
  key's order across members matters).
- a handler that runs past the ack wait: the server delivers its message again; if that delivery reaches the
  same member while the handler still runs it is absorbed, and if it arrives just after the member acked, the
  member acks it again instead of handing it out (other members may still get it: at least once).
- release and leave: a released message stays with the member and is handed out again at once; when a member
  leaves it sends ``-NAK`` for everything it still holds, so the others get it at once (the delivery count the
  server adds for that is taken off again within this process).
- dedup: the envelope id is the ``Nats-Msg-Id`` header; the stream drops repeats within its duplicate window.
- publish: a batch goes out in windows of ``publish_window`` messages, in order, without waiting between them;
  then the window's PubAcks are awaited together (up to ``publish_timeout``). All messages of a window carry one
  reply subject under the backend's own PubAck inbox, so a PubAck costs a counter rather than a future. A
  window not fully acked in time raises ``Unavailable``; publishing the same ids again is safe (dedup).

Capabilities: replay, dedup, durable, multi_process.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from meshkit._core.optional import require
from meshkit._core.urls import Parser, redact, url_options
from meshkit.errors import ConfigurationError, MessageDecodeError, MessageTooLarge, MessagingError, Unavailable
from meshkit.messaging.base import Backend, Capabilities, Delivery, GroupChannel, GroupNotFound, Lag, StartFrom
from meshkit.messaging.message import Envelope, decode_structured

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSubscription
    from nats.js.client import JetStreamContext

__all__ = ["NatsBackend", "from_url"]

log = logging.getLogger("meshkit.messaging.nats")

_STANDARD = ("id", "source", "type", "time", "subject", "specversion", "datacontenttype")
_MAX_PULL = 0.5  # seconds a pull request stays open: a leaving member waits at most this long for it
_LOST = 1.0  # a request unanswered this long after it expired was lost (a reconnect): send another
_NO_WAIT_ANSWER = 5.0  # how long a no_wait pull waits for the server's answer
_TOPIC = re.compile(r"^[^\s*>.]+(\.[^\s*>.]+)*$")


def _header_value(value: str) -> str:
    if value.isascii() and value.isprintable() and "%" not in value:
        return value
    return quote(value, safe=" !#$&'()*+,/:;<=>?@[]^`{|}~")


def _encode_headers(envelope: Envelope) -> dict[str, str]:
    headers = {
        "Nats-Msg-Id": envelope.id,
        "ce-specversion": "1.0",
        "ce-id": _header_value(envelope.id),
        "ce-source": _header_value(envelope.source),
        "ce-type": _header_value(envelope.type),
        "ce-time": envelope.time,
        "content-type": envelope.datacontenttype,
    }
    if envelope.subject is not None:
        headers["ce-subject"] = _header_value(envelope.subject)
    for name, value in envelope.extensions.items():
        headers["ce-" + name] = _header_value(value)
    return headers


def _decode(msg: Msg, seq: int) -> Envelope:
    """The envelope of a stored message: binary mode, structured mode, or (not a CloudEvent) one that the runtime
    cannot decode, so it goes to the dead letters."""
    h = msg.headers or {}
    if "ce-id" not in h and h:
        h = {k.lower(): v for k, v in h.items()}
    if "ce-id" in h:
        extensions = {}
        for name, value in h.items():
            if name.startswith("ce-"):
                attr = name[3:]
                if attr not in _STANDARD:
                    extensions[attr] = unquote(value) if "%" in value else value
        subject = h.get("ce-subject")
        return Envelope(
            id=unquote(h["ce-id"]),
            source=unquote(h.get("ce-source", "")),
            type=unquote(h.get("ce-type", "")),
            time=unquote(h.get("ce-time") or "") or datetime.now(UTC).isoformat(),
            datacontenttype=h.get("content-type") or h.get("ce-datacontenttype") or "application/json",
            data=msg.data,
            subject=unquote(subject) if subject is not None else None,
            extensions=extensions,
        )
    try:
        return decode_structured(msg.data)
    except MessageDecodeError:
        # not a CloudEvent: an empty time makes the runtime refuse it and move it to the dead letters
        return Envelope(
            id=h.get("nats-msg-id") or f"nats-{seq}",
            source=f"nats:{msg.subject}",
            type="",
            time="",
            datacontenttype="application/octet-stream",
            data=msg.data,
        )


def _reply_fields(reply: str) -> tuple[int, int]:
    """(stream sequence, delivery count) from a JetStream ack subject (v1 or v2 form)."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[5]), int(tokens[4])
    # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
    return int(tokens[7]), int(tokens[6])


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


class _Window:
    """The PubAcks a window of published messages still waits for."""

    __slots__ = ("done", "error", "left", "no_stream")

    def __init__(self, count: int) -> None:
        self.left = count
        self.done = asyncio.Event()
        self.error: str | None = None
        self.no_stream = False


class NatsBackend(Backend):
    capabilities = Capabilities(replay=True, dedup=True, durable=True, multi_process=True)

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        prefix: str = "meshkit",
        stream: str | None = None,
        ack_wait: float = 30.0,
        dedup_window: float = 120.0,
        retention: float = 7 * 24 * 3600.0,
        replicas: int = 1,
        storage: str = "file",
        max_ack_pending: int = 10_000,
        max_held: int = 1_000,
        publish_window: int = 4_000,
        publish_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        reconnect_wait: float = 0.5,
        creds: str | None = None,
        name: str = "meshkit",
    ) -> None:
        self._nats = require("nats", "nats")
        require("nats.js", "nats")  # the JetStream half of nats-py, reached as self._nats.js
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not _TOPIC.match(prefix):
            raise ConfigurationError(
                f"bad NATS prefix {prefix!r}", hint="use subject tokens without spaces, '*' or '>' (e.g. 'shop')"
            )
        if storage not in ("file", "memory"):
            raise ConfigurationError(f"bad NATS storage {storage!r}", hint="use storage=file or storage=memory")
        if ack_wait <= 0 or dedup_window <= 0 or retention <= 0 or publish_timeout <= 0 or connect_timeout <= 0:
            raise ConfigurationError("NATS ack_wait, dedup_window, retention and timeouts must be positive")
        if dedup_window > retention:
            raise ConfigurationError("the NATS dedup_window cannot be longer than the retention")
        self.prefix = prefix
        self.stream = stream or _name(prefix.upper())
        self.ack_wait = ack_wait
        self.dedup_window = dedup_window
        self.retention = retention
        self.replicas = replicas
        self.storage = storage
        self.max_ack_pending = max_ack_pending
        self.max_held = max_held
        self.publish_window = publish_window
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.creds = creds
        self.client_name = name
        self.url = ", ".join(redact(s) for s in self.servers)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._stream_ready = False
        self._closed = False
        self._channels: set[_NatsChannel] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self._acks_prefix: str | None = None
        self._windows: dict[str, _Window] = {}
        self._window_ids = 0
        #: (consumer, stream seq) -> deliveries this process gave back unhandled: not counted as attempts
        self.returned: dict[tuple[str, int], int] = {}

    # -- connection ------------------------------------------------------------------------------------------------

    async def _connect(self) -> JetStreamContext:
        if self._js is not None and self._stream_ready:
            return self._js
        if self._closed:
            raise ConfigurationError("this NATS broker is closed")
        async with self._lock:
            if self._js is None:
                await self._open()
            assert self._js is not None
            if not self._stream_ready:
                await self._ensure_stream(self._js)
                self._stream_ready = True
            if self._keepalive is None:
                self._keepalive = asyncio.create_task(self._keep_alive(), name=f"meshkit-nats-keepalive-{self.stream}")
        return self._js

    async def _open(self) -> None:
        nats = self._nats

        async def on_error(exc: Exception) -> None:
            log.warning("NATS connection error", extra={"url": self.url, "error": repr(exc)})

        async def on_disconnect() -> None:
            if self._closed:
                return
            log.warning("disconnected from NATS; reconnecting", extra={"url": self.url})

        async def on_reconnect() -> None:
            log.warning("reconnected to NATS", extra={"url": self.url})

        nc = nats.NATS()
        options: dict[str, Any] = {
            "servers": self.servers,
            "name": self.client_name,
            "connect_timeout": self.connect_timeout,
            "reconnect_time_wait": self.reconnect_wait,
            "max_reconnect_attempts": -1,  # a running service keeps trying; the first connect is bounded below
            "skip_subject_validation": True,  # topics are checked once, in subject()
            "error_cb": on_error,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
        }
        if self.creds:
            options["user_credentials"] = self.creds
        try:
            # nats-py retries the first connect forever when reconnecting is allowed: bound it ourselves
            await asyncio.wait_for(nc.connect(**options), self.connect_timeout * 2 + 1)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise Unavailable(
                f"cannot reach the NATS server at {self.url}: {exc!r}",
                hint="is nats-server running (with JetStream: -js) and is the URL right?",
            ) from exc
        self._nc = nc
        self._js = nc.jetstream(timeout=self.publish_timeout)  # stream and consumer management

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        nats = self._nats
        api = nats.js.api
        try:
            await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            pass
        except nats.errors.NoRespondersError as exc:
            raise Unavailable(
                f"JetStream is not enabled on the NATS server at {self.url}", hint="start nats-server with -js"
            ) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"cannot reach JetStream at {self.url}: {exc!r}") from exc
        else:
            return
        config = api.StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.>"],
            storage=api.StorageType.FILE if self.storage == "file" else api.StorageType.MEMORY,
            retention=api.RetentionPolicy.LIMITS,
            max_age=self.retention,
            duplicate_window=self.dedup_window,
            num_replicas=self.replicas,
        )
        try:
            for attempt in range(4):
                try:
                    await js.add_stream(config)
                    break
                except nats.js.errors.ServerError:
                    # nats-server 2.9 can fail a create ("error creating store for stream") while another
                    # client deletes the last stream of the account: a moment later it works
                    if attempt == 3:
                        raise
                    await asyncio.sleep(0.1 * (attempt + 1))
        except nats.js.errors.BadRequestError as exc:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.stream_info(self.stream)  # another process created it first
                return
            raise ConfigurationError(
                f"cannot create the JetStream stream {self.stream!r} at {self.url}: {exc.description}",
                hint="another stream may already hold the subjects; pick another prefix",
            ) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"cannot create the JetStream stream {self.stream!r} at {self.url}: {exc!r}") from exc

    async def _keep_alive(self) -> None:
        """Tell the server that messages a member keeps back (per-key order, local retries) are in progress."""
        period = max(self.ack_wait / 3, 0.2)
        while True:
            await asyncio.sleep(period)
            for channel in list(self._channels):
                try:
                    await channel._touch()
                except Exception as exc:  # reconnecting: the next round tries again
                    log.debug("could not keep messages alive", extra={"error": repr(exc)})

    # -- publishing ------------------------------------------------------------------------------------------------

    def subject(self, topic: str) -> str:
        if not _TOPIC.match(topic):
            raise ConfigurationError(
                f"invalid topic name {topic!r} for NATS",
                hint="use dot-separated tokens without spaces, '*' or '>' (e.g. 'order.created')",
            )
        return f"{self.prefix}.{topic}"

    async def _acks_inbox(self) -> str:
        """The wildcard inbox every PubAck of this backend comes back to (one subscription, made once)."""
        if self._acks_prefix is None:
            assert self._nc is not None
            prefix = self._nc.new_inbox()
            await self._nc.subscribe(f"{prefix}.*", cb=self._on_puback)
            self._acks_prefix = prefix
        return self._acks_prefix

    async def _on_puback(self, msg: Msg) -> None:
        window = self._windows.get(msg.subject.rpartition(".")[2])
        if window is None:
            return  # late: its publish already gave up
        headers = msg.headers
        if headers and headers.get("Status") == "503":
            window.no_stream = True
        elif b'"error"' in msg.data and window.error is None:
            try:
                window.error = str(json.loads(msg.data)["error"].get("description", msg.data))
            except (ValueError, KeyError, AttributeError):
                window.error = msg.data.decode(errors="replace")
        window.left -= 1
        if window.left <= 0:
            window.done.set()

    async def append(self, topic: str, envelopes: Sequence[Envelope]) -> None:
        """Publish in windows of ``publish_window``: all of a window's messages go out (in order) before its
        PubAcks are awaited together. Every message of a window shares one reply subject, so a PubAck costs a
        counter, not a future."""
        if not envelopes:
            return
        subject = self.subject(topic)
        await self._connect()
        nc = self._nc
        assert nc is not None
        nats = self._nats
        try:
            inbox = await self._acks_inbox()
            size = self.publish_window
            for first in range(0, len(envelopes), size):
                chunk = envelopes[first : first + size]
                self._window_ids += 1
                token = str(self._window_ids)
                window = self._windows[token] = _Window(len(chunk))
                try:
                    reply = f"{inbox}.{token}"
                    for e in chunk:
                        await nc.publish(subject, e.data, reply=reply, headers=_encode_headers(e))
                    async with asyncio.timeout(self.publish_timeout):
                        await window.done.wait()
                finally:
                    del self._windows[token]
                if window.no_stream:
                    self._stream_ready = False  # deleted under us? create it on the next publish
                    raise Unavailable(f"no JetStream stream takes {subject!r} at {self.url}")
                if window.error is not None:
                    raise MessagingError(f"JetStream refused a publish to {subject!r} at {self.url}: {window.error}")
        except nats.errors.MaxPayloadError as exc:
            size = max(e.size() for e in envelopes)
            raise MessageTooLarge(topic, size, nc.max_payload) from exc
        except TimeoutError as exc:
            raise Unavailable(
                f"no PubAck from JetStream at {self.url} within {self.publish_timeout:g}s for {topic!r}",
                hint="the server may be restarting; publishing the same ids again is safe (dedup)",
            ) from exc
        except nats.errors.Error as exc:
            raise Unavailable(f"cannot publish to NATS at {self.url}: {exc!r}") from exc

    # -- consuming -------------------------------------------------------------------------------------------------

    def consumer_name(self, topic: str, group: str) -> str:
        digest = hashlib.blake2b(f"{topic}\0{group}".encode(), digest_size=5).hexdigest()
        return f"{_name(group)}__{_name(topic)}"[:100] + "-" + digest

    async def group(self, topic: str, group: str, start: StartFrom) -> GroupChannel:
        subject = self.subject(topic)
        js = await self._connect()
        nats = self._nats
        api = nats.js.api
        durable = self.consumer_name(topic, group)
        try:
            try:
                await js.consumer_info(self.stream, durable)
            except nats.js.errors.NotFoundError:
                config = api.ConsumerConfig(
                    durable_name=durable,
                    description=f"meshkit group {group!r} on {topic!r}",
                    filter_subject=subject,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=self.ack_wait,
                    max_deliver=-1,  # the runtime dead-letters after Retry.attempts
                    max_ack_pending=self.max_ack_pending,
                    **self._start(start),
                )
                try:
                    await js.add_consumer(self.stream, config)
                except nats.js.errors.BadRequestError:
                    await js.consumer_info(self.stream, durable)  # another member created it first
            assert self._nc is not None
            channel = _NatsChannel(self, self._nc, topic, group, durable)
            await channel._start()
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"cannot join group {group!r} on {topic!r} at {self.url}: {exc!r}") from exc
        self._channels.add(channel)
        return channel

    async def lag(self, topic: str, group: str) -> Lag:
        """The group's durable consumer info: ``num_pending`` (matching messages not yet delivered) is ``waiting``,
        ``num_ack_pending`` (delivered, not acked) is ``in_flight``. JetStream counts a message given back with a
        NAK as ack-pending until it is delivered again, so those are in flight here, not waiting."""
        self.subject(topic)  # checks the name
        js = await self._connect()
        nats = self._nats
        try:
            info = await js.consumer_info(self.stream, self.consumer_name(topic, group))
        except nats.js.errors.NotFoundError as exc:
            raise GroupNotFound(topic, group) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"cannot read group {group!r} on {topic!r} at {self.url}: {exc!r}") from exc
        return Lag(waiting=info.num_pending or 0, in_flight=info.num_ack_pending or 0)

    def _start(self, start: StartFrom) -> dict[str, Any]:
        policy = self._nats.js.api.DeliverPolicy
        if start == "earliest":
            return {"deliver_policy": policy.ALL}
        if start == "latest":
            return {"deliver_policy": policy.NEW}
        if isinstance(start, datetime):
            return {"deliver_policy": policy.BY_START_TIME, "opt_start_time": start}
        if isinstance(start, int):
            return {"deliver_policy": policy.BY_START_SEQUENCE, "opt_start_seq": max(start, 1)}
        raise ConfigurationError(f"unknown start {start!r}")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for channel in list(self._channels):
            await channel.aclose()
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)  # the last acks and naks reach the server
            with contextlib.suppress(Exception):
                await self._nc.close()


class _NatsChannel(GroupChannel):
    def __init__(self, backend: NatsBackend, nc: NatsClient, topic: str, group: str, durable: str) -> None:
        self._b = backend
        self._nc = nc
        self._topic = topic
        self._group = group
        self._durable = durable
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{backend.stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: NatsSubscription | None = None
        self._buffer: deque[Msg] = deque()  # arrived from the server, not looked at yet
        self._arrived = asyncio.Event()
        self._open = 0  # messages the open pull request may still bring
        self._open_until = 0.0  # when it expires (monotonic)
        self._status = "408"  # how the last pull request ended (408: it expired, the normal end)
        self._msgs: dict[int, Msg] = {}  # stream seq -> the latest delivery of every message this member holds
        self._delivered: dict[int, int] = {}  # stream seq -> the server's delivery count
        self._envelopes: dict[int, Envelope] = {}
        self._ready: deque[int] = deque()  # held messages free to go (their key came free, or released)
        self._holding: dict[str, int] = {}  # key -> the seq holding it in this member
        self._held: dict[str, list[int]] = {}  # key -> later seqs of that key, kept back, sorted
        self._retry: dict[int, float] = {}  # keyed seq -> when its local retry is due
        self._extra: dict[int, int] = {}  # keyed seq -> local retries (attempts the server did not count)
        self._acked: set[int] = set()  # seqs this member acked lately, oldest first in _acked_order
        self._acked_order: deque[int] = deque()
        self._reacks: list[Msg] = []  # repeat deliveries of messages already acked here
        self._closed = False

    async def _start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is not None and not msg.data:
            if status != "100":  # anything but a heartbeat ends the pull request (404, 408, 409, 503)
                self._open = 0
                self._status = status
                self._arrived.set()
            return
        self._buffer.append(msg)
        self._open -= 1
        self._arrived.set()

    # -- taking messages in --------------------------------------------------------------------------------------

    def _held_count(self) -> int:
        return sum(map(len, self._held.values()))

    def _admit(self, msg: Msg) -> int | None:
        """Take a message from the server in; the seq to hand out now, or None (kept back, or already ours)."""
        seq, delivered = _reply_fields(msg.reply)
        if seq in self._acked:  # redelivered (its handler outran the ack wait) as our ack went out: ack it again
            self._reacks.append(msg)
            return None
        known = seq in self._msgs
        self._msgs[seq] = msg  # a repeat delivery of a message we hold: ack with the newest
        self._delivered[seq] = delivered
        if known:
            return None
        envelope = _decode(msg, seq)
        self._envelopes[seq] = envelope
        key = envelope.key
        if key is not None:
            holder = self._holding.get(key)
            if holder is None:
                self._holding[key] = seq
            elif holder != seq:
                bisect.insort(self._held.setdefault(key, []), seq)
                return None
        return seq

    def _delivery(self, seq: int) -> Delivery:
        attempt = self._delivered[seq] + self._extra.get(seq, 0) - self._b.returned.get((self._durable, seq), 0)
        return Delivery(self._topic, self._group, self._envelopes[seq], seq, max(attempt, 1))

    def _collect(self, limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        if self._retry:
            now = time.monotonic()
            for seq in [s for s, due in self._retry.items() if due <= now]:
                del self._retry[seq]
                self._ready.append(seq)
        while self._ready and len(out) < limit:
            seq = self._ready.popleft()
            if seq in self._msgs:
                out.append(self._delivery(seq))
        while self._buffer and len(out) < limit:
            admitted = self._admit(self._buffer.popleft())
            if admitted is not None:
                out.append(self._delivery(admitted))
        return out

    async def _ack_repeats(self) -> None:
        reacks, self._reacks = self._reacks, []
        for msg in reacks:
            await self._nc.publish(msg.reply, b"+ACK")

    async def _pull(self, batch: int, expires: float | None) -> None:
        request: dict[str, Any] = {"batch": batch}
        if expires is None:
            request["no_wait"] = True
            self._open_until = time.monotonic() + _NO_WAIT_ANSWER
        else:
            request["expires"] = int(expires * 1e9)
            self._open_until = time.monotonic() + expires
        self._open = batch
        await self._nc.publish(self._next_subject, json.dumps(request).encode(), reply=self._inbox)

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        end = time.monotonic() + wait
        asked_now = False  # a no_wait request is answered once; don't ask twice in one fetch
        nats = self._b._nats
        while not self._closed:
            self._arrived.clear()
            out = self._collect(limit)
            if self._reacks:
                try:
                    await self._ack_repeats()
                except nats.errors.Error as exc:  # the server delivers them again; acked then
                    log.debug("could not ack a repeat delivery", extra={"error": repr(exc)})
            if out:
                return out
            now = time.monotonic()
            if self._open > 0 and now > self._open_until + _LOST:
                self._open = 0  # never answered: lost in a reconnect
            if self._open <= 0 and self._status not in ("404", "408"):  # not a normal end: don't spin
                status, self._status = self._status, "408"
                log.warning(
                    "the server refused a pull request; trying again",
                    extra={"topic": self._topic, "group": self._group, "status": status},
                )
                await asyncio.sleep(min(max(end - now, 0.0), 1.0))
                return []
            if self._open <= 0 and not asked_now and self._held_count() < self._b.max_held:
                remaining = end - now
                try:
                    await self._pull(limit, None if remaining < 0.01 else min(remaining, _MAX_PULL))
                except nats.errors.Error as exc:  # closed or reconnecting: the runtime asks again later
                    log.debug("pull request failed", extra={"error": repr(exc)})
                    await asyncio.sleep(min(max(remaining, 0.0), 0.2))
                    return []
                asked_now = remaining < 0.01
            timeout = end - now
            if asked_now and self._open > 0:
                timeout = self._open_until - now  # wait for the answer to the no_wait request
            elif timeout <= 0:
                return []
            if self._retry:
                timeout = min(timeout, max(min(self._retry.values()) - now, 0.0))
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    await self._arrived.wait()
            except TimeoutError:
                if asked_now or time.monotonic() >= end:
                    self._arrived.set()  # one last look at what arrived
                    out = self._collect(limit)
                    if out or time.monotonic() >= end:
                        return out
        return []

    # -- settling --------------------------------------------------------------------------------------------------

    def _forget(self, seq: int) -> Msg | None:
        msg = self._msgs.pop(seq, None)
        self._delivered.pop(seq, None)
        self._extra.pop(seq, None)
        self._retry.pop(seq, None)
        envelope = self._envelopes.pop(seq, None)
        key = envelope.key if envelope is not None else None
        if key is not None and self._holding.get(key) == seq:
            waiting = self._held.get(key)
            if waiting:
                nxt = waiting.pop(0)
                if not waiting:
                    del self._held[key]
                self._holding[key] = nxt
                self._ready.append(nxt)
                self._arrived.set()
            else:
                del self._holding[key]
        return msg

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        returned = self._b.returned
        for d in deliveries:
            msg = self._forget(d.offset)
            if msg is not None:
                self._acked.add(d.offset)
                self._acked_order.append(d.offset)
                if len(self._acked_order) > 10_000:
                    self._acked.discard(self._acked_order.popleft())
                if returned:
                    returned.pop((self._durable, d.offset), None)
                await self._nc.publish(msg.reply, b"+ACK")

    async def nack(self, delivery: Delivery, delay: float) -> None:
        seq = delivery.offset
        if seq not in self._msgs:
            return
        if delivery.envelope.key is not None:  # retried here: it keeps its key (see the module docstring)
            self._extra[seq] = self._extra.get(seq, 0) + 1
            self._retry[seq] = time.monotonic() + delay
            self._arrived.set()
            return
        msg = self._forget(seq)
        assert msg is not None
        payload = b"-NAK" if delay <= 0 else b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode()
        await self._nc.publish(msg.reply, payload)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        # kept by this member and handed out again at once; leaving gives everything back to the server
        for d in reversed(deliveries):
            if d.offset in self._msgs:
                self._ready.appendleft(d.offset)
        self._arrived.set()

    async def _touch(self) -> None:
        if self._closed:
            return
        waiting = [seq for seqs in self._held.values() for seq in seqs]
        waiting.extend(self._retry)
        waiting.extend(self._ready)
        for seq in waiting:
            msg = self._msgs.get(seq)
            if msg is not None:
                await self._nc.publish(msg.reply, b"+WPI")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._arrived.set()
        self._b._channels.discard(self)
        try:
            # an open pull request may still bring messages: wait for it, so they are given back, not stranded
            end = min(self._open_until, time.monotonic() + _MAX_PULL) + 0.05
            while self._open > 0 and time.monotonic() < end and not self._nc.is_closed:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(end - time.monotonic()):
                        await self._arrived.wait()
            while self._buffer:
                msg = self._buffer.popleft()
                seq, _ = _reply_fields(msg.reply)
                self._msgs[seq] = msg
            returned = self._b.returned
            if len(returned) > 100_000:
                returned.clear()
            for seq, msg in self._msgs.items():
                returned[(self._durable, seq)] = returned.get((self._durable, seq), 0) + 1
                await self._nc.publish(msg.reply, b"-NAK")
            self._msgs.clear()
            if self._sub is not None:
                await self._sub.unsubscribe()
        except self._b._nats.errors.Error as exc:  # the connection is gone: the ack wait gives them back
            log.debug("could not give messages back on leaving", extra={"error": repr(exc)})


_OPTIONS: dict[str, Parser] = {
    "prefix": str,
    "stream": str,
    "ack_wait": float,
    "dedup_window": float,
    "retention": float,
    "replicas": int,
    "storage": str,
    "max_ack_pending": int,
    "max_held": int,
    "publish_window": int,
    "publish_timeout": float,
    "connect_timeout": float,
    "reconnect_wait": float,
    "creds": str,
    "name": str,
}


def from_url(url: str, **options: Any) -> NatsBackend:
    """``nats://[user:password@]host:port[,host2:port...][?option=value&...]`` (``tls://`` for TLS).

    Options (URL query parameters or keyword arguments; keyword arguments win) are :class:`NatsBackend`'s.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls") or not parts.netloc:
        shown = redact(url) if parts.netloc else url
        raise ConfigurationError(f"bad NATS URL {shown!r}", hint="use nats://host:4222 or tls://host:4222")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    servers = [f"{parts.scheme}://{userinfo + '@' if userinfo else ''}{host}" for host in hosts.split(",") if host]
    parsed, _ = url_options(url, _OPTIONS, options, what="NATS broker")
    return NatsBackend(servers, **parsed)
