"""``kafka://host:port[,host:port]``: Apache Kafka (or any Kafka-protocol broker) through aiokafka.

Layout on the server
    A meshkit topic ``t`` is the Kafka topic ``<prefix>t`` with ``partitions`` partitions (created on first use
    through the admin API unless ``create_topics=False``). A meshkit group ``g`` is the Kafka consumer group
    ``<prefix>g``. Dead letters go to ``<prefix>t.dlq`` (written by the shared runtime like any publish).

Wire format (CloudEvents Kafka protocol binding, binary mode)
    The record value is the event data; the record key is the ``partitionkey`` extension (so one key always lands
    on one partition); every other attribute is a header: ``ce_specversion``, ``ce_id``, ``ce_source``,
    ``ce_type``, ``ce_time``, ``ce_subject``, ``ce_<extension>``, and ``content-type`` for ``datacontenttype``.
    Records in structured mode (``content-type: application/cloudevents+json``) are read too. A record that is not
    a CloudEvent reaches the handler's runtime with an empty ``time`` and so goes to the dead letter topic.

Groups, acks and commits
    Kafka assigns each partition to one member of a group. A member hands out the records of its partitions, and
    holds per partition the offsets handed out and not acked. Acks commit (``enable_auto_commit=False``), per
    partition, the lowest unfinished offset, so a commit never passes a message that is still running, waiting to
    be redelivered, or waiting for its key. Acks arrive in batches from the runtime, so commits do too.

Per-key order
    Kafka keeps one key in one partition, in order; inside a member, a record whose key is held by an earlier
    record (running or waiting for a redelivery) waits behind it, so a member never runs two messages of one key at
    once while it still runs many keys in parallel.

Nack with a delay, redelivery
    Kafka has no per-message nack. A nacked record stays in the member: it is handed out again (``attempt + 1``)
    once its delay has passed, its key stays held, and commits stay below it. ``release`` puts a record back at
    once without counting an attempt. Attempts are counted by the member, so they restart at 1 if the partition
    moves to another member.

Visibility timeout
    A member that dies stops heartbeating; after ``session_timeout_ms`` the group rebalances and the next owner
    resumes from the last committed offset: everything after it is delivered again (at least once). On a graceful
    rebalance (a member joins or leaves) a member gives its partitions up only after the records it already handed
    out are settled (up to ``revoke_timeout`` seconds) and commits them, so handled messages do not come back.

Replay (``start`` of a new group)
    ``"earliest"`` reads from the oldest record kept. ``"latest"`` and a ``datetime`` start at a time
    (``offsets_for_times``, and records stamped earlier than the start are skipped, which also covers brokers
    whose offset lookups are approximate). An ``int`` start is a meshkit offset: ``Delivery.offset`` is
    ``kafka_offset * partitions + partition``, one total order over the topic, and a group starting at it reads
    exactly the records at or after it. A group that has committed offsets resumes from them.

Dedup
    Not offered (``Capabilities(dedup=False)``). The idempotent producer (``idempotence=True``) drops the copies a
    producer's own retries would write, but Kafka cannot drop a message republished with the same CloudEvents id.

Capabilities: replay, durable (Kafka's log), multi_process; no dedup.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from meshkit._core.optional import require
from meshkit.errors import ConfigurationError, MessageTooLarge, Unavailable
from meshkit.messaging.base import (
    Backend,
    Capabilities,
    Delivery,
    GroupChannel,
    GroupNotFound,
    Lag,
    StartFrom,
    make_delivery,
)
from meshkit.messaging.message import Envelope, decode_structured, make_envelope

__all__ = ["KafkaBackend", "from_url"]

log = logging.getLogger("meshkit.messaging.kafka")

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_STANDARD_HEADERS = frozenset(
    {"ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject", "content-type"}
)
_STRUCTURED = "application/cloudevents"


def encode_headers(envelope: Envelope) -> list[tuple[str, bytes]]:
    """The Kafka headers of an envelope in binary mode (``partitionkey`` travels as the record key)."""
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", envelope.id.encode()),
        ("ce_source", envelope.source.encode()),
        ("ce_type", envelope.type.encode()),
        ("ce_time", envelope.time.encode()),
        ("content-type", envelope.datacontenttype.encode()),
    ]
    if envelope.subject is not None:
        headers.append(("ce_subject", envelope.subject.encode()))
    for name, value in envelope.extensions.items():
        if name != "partitionkey":
            headers.append((f"ce_{name}", value.encode()))
    return headers


def decode_record(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> Envelope:
    """An envelope from a record in binary or structured mode; anything else becomes an undecodable envelope."""
    h: dict[str, str] = {}  # the standard headers
    extensions: dict[str, str] = {}
    for name, raw in headers:  # one pass: this runs for every record consumed
        if name in _STANDARD_HEADERS:
            h[name] = raw.decode("utf-8", "replace") if raw is not None else ""
        elif name.startswith("ce_"):
            extensions[name[3:]] = raw.decode("utf-8", "replace") if raw is not None else ""
    data = value or b""
    content_type = h.get("content-type", "")
    specversion = h.get("ce_specversion")
    if specversion is None and content_type.startswith(_STRUCTURED):
        try:
            return decode_structured(data)
        except Exception:  # an unreadable record still has to reach the dead letters
            log.debug("a structured-mode record does not parse", exc_info=True)
    if key is not None:
        extensions["partitionkey"] = key.decode("utf-8", "replace")
    ident = h.get("ce_id")
    if specversion != "1.0" or ident is None:
        # not a CloudEvent: an empty time makes the runtime dead-letter it as undecodable
        return make_envelope(
            ident or "",
            h.get("ce_source", "kafka"),
            h.get("ce_type", "unknown"),
            "",
            content_type or "application/octet-stream",
            data,
            None,
            extensions,
        )
    return make_envelope(
        ident,
        h.get("ce_source", ""),
        h.get("ce_type", ""),
        h.get("ce_time", ""),
        content_type or "application/json",
        data,
        h.get("ce_subject"),
        extensions,
    )


@dataclass(frozen=True, slots=True)
class KafkaOptions:
    """Everything ``from_url`` accepts (as keyword arguments or URL query parameters)."""

    prefix: str = ""
    partitions: int = 8
    replication_factor: int = 1
    create_topics: bool = True
    idempotence: bool = True
    acks: str = "all"
    linger_ms: int = 5
    max_batch_size: int = 1_048_576
    client_id: str = "meshkit"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    rebalance_timeout_ms: int = 30_000
    request_timeout_ms: int = 30_000
    fetch_max_wait_ms: int = 500
    connect_timeout: float = 10.0
    revoke_timeout: float = 10.0
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None

    def security(self) -> dict[str, Any]:
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            out["ssl_context"] = ssl.create_default_context()
        if self.security_protocol.startswith("SASL"):
            out.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_plain_username,
                sasl_plain_password=self.sasl_plain_password,
            )
        return out


class KafkaBackend(Backend):
    capabilities = Capabilities(replay=True, dedup=False, durable=True, multi_process=True)

    def __init__(self, bootstrap: str, options: KafkaOptions, *, url: str | None = None) -> None:
        self._aiokafka = require("aiokafka", "kafka")
        self._kafka_admin = require("aiokafka.admin", "kafka")
        self._errors = require("aiokafka.errors", "kafka")
        self._bootstrap = bootstrap
        self._url = url or f"kafka://{bootstrap}"
        self.options = options
        self._producer: Any = None
        self._admin: Any = None
        self._offsets: Any = None  # a consumer outside any group, for offset lookups (lag); started on first use
        self._offsets_lock = asyncio.Lock()  # one lookup at a time: it assigns the partitions it looks at
        self._start_lock = asyncio.Lock()
        self._topics: dict[str, int] = {}  # Kafka topic -> partition count, for topics known to exist
        self._next_partition: dict[str, int] = {}  # Kafka topic -> where the next batch of unkeyed records goes
        self._partitioner = require("aiokafka.partitioner", "kafka").DefaultPartitioner()
        self._max_record = 1_048_576  # the producer's max_request_size (aiokafka's default, not changed here)
        self._topic_locks: dict[str, asyncio.Lock] = {}
        self._channels: set[_KafkaChannel] = set()
        self._closed = False

    # -- names and connections -------------------------------------------------------------------------------------

    def name(self, topic: str) -> str:
        full = self.options.prefix + topic
        if not _TOPIC.match(full):
            raise ConfigurationError(
                f"invalid Kafka topic name {full!r}",
                hint="Kafka topic names use 1-249 letters, digits, '.', '_' or '-'",
            )
        return full

    def _unavailable(self, what: str, exc: BaseException) -> Unavailable:
        return Unavailable(
            f"Kafka at {self._url} {what}: {type(exc).__name__}: {exc}",
            hint="check that the brokers in the URL are running and reachable (host:port[,host:port])",
        )

    def _common(self) -> dict[str, Any]:
        o = self.options
        return {
            "bootstrap_servers": self._bootstrap.split(","),
            "client_id": o.client_id,
            "request_timeout_ms": o.request_timeout_ms,
            **o.security(),
        }

    def _ready(self) -> Any:
        return self._producer

    async def _started(self) -> Any:
        if self._producer is not None:
            return self._producer
        async with self._start_lock:
            if self._closed:
                raise ConfigurationError("this Kafka backend is closed")
            if self._ready() is not None:  # started while we waited for the lock
                return self._producer
            o = self.options
            producer = self._aiokafka.AIOKafkaProducer(
                enable_idempotence=o.idempotence,
                acks="all" if o.idempotence or o.acks in ("all", "-1") else int(o.acks),
                linger_ms=o.linger_ms,
                max_batch_size=o.max_batch_size,
                **self._common(),
            )
            admin = self._kafka_admin.AIOKafkaAdminClient(**self._common())
            try:
                async with asyncio.timeout(o.connect_timeout):
                    await producer.start()
                    await admin.start()
            except (TimeoutError, OSError, self._errors.KafkaError) as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                with contextlib.suppress(Exception):
                    await admin.close()
                if isinstance(exc, TimeoutError):
                    raise Unavailable(
                        f"Kafka at {self._url} did not answer within {o.connect_timeout} s",
                        hint="check that the brokers in the URL are running and reachable (host:port[,host:port])",
                    ) from exc
                raise self._unavailable("cannot be reached", exc) from exc
            self._admin = admin
            self._producer = producer
            return producer

    async def ensure_topic(self, name: str) -> int:
        """Create the Kafka topic if needed; returns its partition count."""
        known = self._topics.get(name)
        if known is not None:
            return known
        producer = await self._started()
        lock = self._topic_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._topics:
                return self._topics[name]
            o = self.options
            if o.create_topics:
                new = self._kafka_admin.NewTopic(name, o.partitions, o.replication_factor)
                try:
                    response = await self._admin.create_topics([new])
                except self._errors.KafkaError as exc:
                    raise self._unavailable(f"refused to create topic {name!r}", exc) from exc
                for _topic, code, *_rest in response.topic_errors:
                    if code not in (0, self._errors.TopicAlreadyExistsError.errno):
                        error = self._errors.for_code(code)
                        raise self._unavailable(f"refused to create topic {name!r}", error())
            try:
                partitions = await producer.partitions_for(name)
            except self._errors.KafkaError as exc:
                raise self._unavailable(f"has no topic {name!r}", exc) from exc
            self._topics[name] = len(partitions)
            return len(partitions)

    # -- Backend -----------------------------------------------------------------------------------------------------

    async def append(self, topic: str, envelopes: Sequence[Envelope]) -> None:
        name = self.name(topic)
        partitions = await self.ensure_topic(name)
        producer = await self._started()
        errors = self._errors
        try:
            if len(envelopes) == 1:  # one record: send() lets concurrent publishes share the producer's batches
                (envelope,) = envelopes
                key = envelope.key
                sent = await producer.send(
                    name,
                    value=envelope.data,
                    key=key.encode() if key is not None else None,
                    headers=encode_headers(envelope),
                )
                await sent
            else:
                batches = self._record_batches(producer, name, partitions, envelopes)
                await asyncio.gather(*[await producer.send_batch(b, name, partition=p) for p, b in batches])
        except errors.MessageSizeTooLargeError as exc:
            size = max((e.size() for e in envelopes), default=0)
            raise MessageTooLarge(topic, size, self.options.max_batch_size) from exc
        except (errors.KafkaError, OSError) as exc:
            self._topics.pop(name, None)  # the topic may be gone (deleted, a broker lost it): check it next time
            raise self._unavailable("did not accept the publish", exc) from exc

    def _record_batches(
        self, producer: Any, name: str, partitions: int, envelopes: Sequence[Envelope]
    ) -> list[tuple[int, Any]]:
        """A publish of several messages as few record batches as fit, one partition each, for ``send_batch``: a
        record per ``send()`` costs the producer more Python per message than the whole batch costs here.

        A keyed record goes where ``send()`` would put it (the default partitioner: murmur2 of the key, as in the
        Java client), so per-key order holds whichever way a message was published; unkeyed records of one call
        share one partition, the next call the next one (what Kafka's sticky partitioner does). Returns (partition,
        batch) pairs in publish order.
        """
        limit = self._max_record
        for envelope in envelopes:
            if envelope.size() > limit:
                raise self._errors.MessageSizeTooLargeError(f"a record of {envelope.size()} bytes")
        every = list(range(partitions))
        sticky = self._next_partition.get(name, 0) % partitions
        self._next_partition[name] = sticky + 1
        by_partition: dict[int, list[tuple[bytes | None, Envelope]]] = {}
        for envelope in envelopes:
            key = envelope.key.encode() if envelope.key is not None else None
            partition = sticky if key is None else self._partitioner(key, every, every)
            by_partition.setdefault(partition, []).append((key, envelope))
        out: list[tuple[int, Any]] = []
        for partition, records in by_partition.items():
            batch = producer.create_batch()
            for key, envelope in records:
                headers = encode_headers(envelope)
                if batch.append(key=key, value=envelope.data, timestamp=None, headers=headers) is None:
                    out.append((partition, batch))  # full: it goes as it is, the rest in a new one
                    batch = producer.create_batch()
                    batch.append(key=key, value=envelope.data, timestamp=None, headers=headers)
            out.append((partition, batch))
        return out

    async def group(self, topic: str, group: str, start: StartFrom) -> GroupChannel:
        name = self.name(topic)
        group_id = self.options.prefix + group
        partitions = await self.ensure_topic(name)
        channel = _KafkaChannel(self, topic, name, group, group_id, partitions, start)
        await channel.start()
        self._channels.add(channel)
        return channel

    # -- lag -----------------------------------------------------------------------------------------------------

    async def lag(self, topic: str, group: str) -> Lag:
        """Per partition, the end offset minus where the group stands: its committed offset, or the oldest record
        kept where it has not committed (a meshkit member starts there: ``auto_offset_reset`` is ``earliest``).

        Kafka knows commits only, not what members hold, so only ``total`` is known. A Kafka group is not per topic:
        it "exists" on a topic once it has committed there or while a member subscribes to the topic.
        """
        name = self.name(topic)
        group_id = self.options.prefix + group
        await self._started()
        errors = self._errors
        tp_type = self._aiokafka.TopicPartition
        try:
            async with asyncio.timeout(self.options.request_timeout_ms / 1000):
                partitions = await self._partition_count(name)
                if partitions is None:
                    raise GroupNotFound(topic, group, detail=f"there is no Kafka topic {name!r}")
                tps = [tp_type(name, p) for p in range(partitions)]
                offsets = await self._admin.list_consumer_group_offsets(group_id, partitions=tps)
                # meshkit never commits 0 (a commit follows a handled record) and Tansu 0.6 answers 0 for "none"
                committed = {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset > 0}
                if not committed and not await self._subscribed(group_id, name):
                    raise GroupNotFound(topic, group, detail="no member and no committed offset")
                starts, ends = await self._log_bounds(tps)
        except TimeoutError as exc:
            raise Unavailable(
                f"Kafka at {self._url} did not tell the offsets of {name!r} within {self.options.request_timeout_ms} ms"
            ) from exc
        except (errors.KafkaError, OSError) as exc:
            raise self._unavailable(f"did not tell the lag of group {group_id!r} on {name!r}", exc) from exc
        total = 0
        for tp in tps:
            start = starts.get(tp, 0)
            at = max(committed.get(tp.partition, start), start)  # a commit older than the log resumes at its start
            total += max(ends.get(tp, at) - at, 0)
        return Lag(waiting=None, in_flight=None, total=total)

    async def _partition_count(self, name: str) -> int | None:
        """The topic's partition count, or None if it does not exist (looked up in every topic's metadata: asking
        for one topic by name creates it on a cluster with ``auto.create.topics.enable``)."""
        known = self._topics.get(name)
        if known is not None:
            return known
        for described in await self._admin.describe_topics():
            if described["topic"] == name and not described["error_code"]:
                return len(described["partitions"])
        return None

    async def _subscribed(self, group_id: str, name: str) -> bool:
        """Whether a member of the group subscribes to the topic now (a member whose subscription does not decode,
        as with Tansu, which keeps none, counts)."""
        protocol = require("aiokafka.coordinator.protocol", "kafka")
        for response in await self._admin.describe_consumer_groups([group_id]):
            for described in response.to_object()["groups"]:
                if described["group"] != group_id or described["error_code"]:
                    continue
                for member in described["members"]:
                    try:
                        topics = protocol.ConsumerProtocolMemberMetadata.decode(member["member_metadata"]).subscription
                    except Exception:  # empty or another protocol's: this member may well be ours
                        return True
                    if name in topics:
                        return True
        return False

    async def _log_bounds(self, tps: list[Any]) -> tuple[dict[Any, int], dict[Any, int]]:
        """The oldest offset kept and the end offset (the high watermark: one past the last record) of each partition.

        The end comes from a fetch, not from ListOffsets alone: Tansu 0.6 answers ListOffsets(latest) with the
        first offset of the last record batch + 1. The lookup consumer reads from that offset (on Apache Kafka it is
        the end: the fetch finds nothing and returns at once) and takes the high watermark the fetch answers with.
        """
        consumer = await self._offset_lookups()
        async with self._offsets_lock:
            starts = await consumer.beginning_offsets(tps)
            near_end = await consumer.end_offsets(tps)
            consumer.assign(tps)  # a fresh assignment: no high watermark known yet
            try:
                for tp in tps:
                    consumer.seek(tp, near_end[tp])
                while True:
                    ends = {tp: consumer.highwater(tp) for tp in tps}
                    if all(end is not None for end in ends.values()):
                        return starts, ends
                    await consumer.getmany(*tps, timeout_ms=20)  # records read on the way are dropped
            finally:
                consumer.unsubscribe()

    async def _offset_lookups(self) -> Any:
        if self._offsets is not None:
            return self._offsets
        async with self._start_lock:
            if self._closed:
                raise ConfigurationError("this Kafka backend is closed")
            if self._offsets is None:
                consumer = self._aiokafka.AIOKafkaConsumer(
                    enable_auto_commit=False, fetch_max_wait_ms=10, max_partition_fetch_bytes=65_536, **self._common()
                )
                try:
                    async with asyncio.timeout(self.options.connect_timeout):
                        await consumer.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await _stop_consumer(consumer)
                    raise
                self._offsets = consumer
        return self._offsets

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for channel in list(self._channels):
            await channel.aclose()
        async with self._start_lock:
            if self._producer is not None:
                await self._producer.stop()
            if self._admin is not None:
                await self._admin.close()
            if self._offsets is not None:
                await _stop_consumer(self._offsets)

    async def delete_topics(self) -> int:
        """Delete every Kafka topic under this backend's ``prefix`` (tests and tooling); returns how many."""
        if not self.options.prefix:
            raise ConfigurationError("delete_topics needs a prefix", hint="open the backend with ?prefix=...")
        await self._started()
        names = [t for t in await self._admin.list_topics() if t.startswith(self.options.prefix)]
        if names:
            await self._admin.delete_topics(names)
        for n in names:
            self._topics.pop(n, None)
        return len(names)


@dataclass
class _Partition:
    tp: Any
    next: int | None = None  # one past the last offset taken from Kafka
    open: list[int] = field(default_factory=list)  # offsets taken and not acked (sorted)
    committed: int = -1
    min_timestamp: int | None = None  # skip records stamped earlier, until one passes

    def commit_point(self) -> int | None:
        if self.open:
            return self.open[0]
        return self.next


class _KafkaChannel(GroupChannel):
    def __init__(
        self,
        backend: KafkaBackend,
        topic: str,
        name: str,
        group: str,
        group_id: str,
        partitions: int,
        start: StartFrom,
    ) -> None:
        self._backend = backend
        self._topic = topic
        self._name = name
        self._group = group
        self._group_id = group_id
        self._width = partitions  # composite offset = kafka offset * width + partition
        self._start = start
        self._start_ms = self._start_time_ms(start)
        self._consumer: Any = None
        self._parts: dict[int, _Partition] = {}
        self._inflight: dict[int, Delivery] = {}  # composite -> the delivery handed out
        self._waiting: list[int] = []  # composites taken and waiting (key held, or nacked), sorted
        self._held: dict[int, Envelope] = {}  # composite -> envelope, for waiting records
        self._due: dict[int, float] = {}  # composite -> monotonic time it may go again
        self._keys: dict[str, int] = {}  # key -> the composite holding it
        self._attempts: dict[int, int] = {}  # composite -> deliveries so far, for records waiting to go again
        self._settled = asyncio.Event()
        self._joined = False
        self._revoking = False
        self._closed = False

    @staticmethod
    def _start_time_ms(start: StartFrom) -> int | None:
        if start == "latest":
            return int(time.time() * 1000)
        if isinstance(start, datetime):
            return int(start.timestamp() * 1000)
        return None

    async def start(self) -> None:
        b = self._backend
        o = b.options
        consumer = b._aiokafka.AIOKafkaConsumer(
            group_id=self._group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=o.session_timeout_ms,
            heartbeat_interval_ms=o.heartbeat_interval_ms,
            rebalance_timeout_ms=o.rebalance_timeout_ms,
            fetch_max_wait_ms=o.fetch_max_wait_ms,
            max_poll_interval_ms=max(300_000, o.rebalance_timeout_ms),
            **b._common(),
        )
        try:
            async with asyncio.timeout(o.connect_timeout):
                await consumer.start()
        except (TimeoutError, OSError, b._errors.KafkaError) as exc:
            with contextlib.suppress(Exception):
                await _stop_consumer(consumer)
            raise b._unavailable(f"did not let group {self._group_id!r} consume {self._name!r}", exc) from exc
        self._consumer = consumer
        # subscribing after start() joins the group in the background: many members join in one rebalance
        consumer.subscribe([self._name], listener=_Listener(self))

    # -- rebalances ----------------------------------------------------------------------------------------------

    async def on_assigned(self, assigned: Any) -> None:
        consumer = self._consumer
        tps = sorted(assigned, key=lambda tp: tp.partition)
        # aiokafka resets a new partition to auto_offset_reset (the earliest offset) and fetches it while this
        # callback awaits the broker: paused, nothing is fetched or handed out before the group's start is set
        # (without it a slow answer let a 'latest' group be handed the oldest records)
        consumer.pause(*tps)
        try:
            fresh: list[_Partition] = []
            for tp in tps:
                part = self._parts[tp.partition] = _Partition(tp)
                try:
                    committed = await consumer.committed(tp)
                except self._backend._errors.KafkaError:
                    committed = None
                # meshkit never commits 0 (a commit follows a handled record), and Tansu 0.6 sometimes answers 0
                # for a group that never committed: both mean "no progress yet", so the group's start applies
                if committed:
                    part.committed = committed
                    consumer.seek(tp, committed)
                else:
                    fresh.append(part)
            await self._seek_start(fresh)
        finally:
            # whatever happened: a partition paused until the next rebalance would stall the group. One whose
            # start could not be set reads from auto_offset_reset, and for a 'latest' or time start the records
            # stamped before it are still skipped (min_timestamp)
            with contextlib.suppress(self._backend._errors.KafkaError):  # (revoked meanwhile: nothing to resume)
                consumer.resume(*tps)
            self._joined = True
            self._settled.set()

    async def _seek_start(self, parts: list[_Partition]) -> None:
        """Set where partitions without a committed offset start: the group's ``start``."""
        consumer, start = self._consumer, self._start
        if not parts or start == "earliest":
            return  # auto_offset_reset
        if isinstance(start, int) and not isinstance(start, bool):
            offset, partition = divmod(max(start, 0), self._width)
            for part in parts:
                consumer.seek(part.tp, offset if part.tp.partition >= partition else offset + 1)
            return
        assert self._start_ms is not None
        for part in parts:  # first: records stamped before the start are skipped whatever the seeks below do
            part.min_timestamp = self._start_ms
        tps = [part.tp for part in parts]
        try:
            # the end first, then the time: a record published between the two is found by the time lookup, one
            # published after them sits at or after ``end``. (seek_to_end resolves lazily, at the next fetch: a
            # record published before that was skipped, and a "latest" group missed its first message.)
            ends = await consumer.end_offsets(tps)
            found = await consumer.offsets_for_times(dict.fromkeys(tps, self._start_ms))
        except self._backend._errors.KafkaError:
            ends, found = {}, {}
        for part in parts:
            tp = part.tp
            at = found.get(tp)
            if at is not None:
                consumer.seek(tp, at.offset)
            elif tp in ends:
                consumer.seek(tp, ends[tp])
            else:
                await consumer.seek_to_end(tp)

    async def on_revoked(self, revoked: Any) -> None:
        mine = {tp.partition for tp in revoked} & set(self._parts)
        if not mine:
            return
        self._revoking = True
        try:
            deadline = time.monotonic() + self._backend.options.revoke_timeout
            while any(c % self._width in mine for c in self._inflight):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning(
                        "giving partitions up with messages still running; they will be delivered again",
                        extra={"topic": self._topic, "group": self._group},
                    )
                    break
                self._settled.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._settled.wait()
            await self._commit([self._parts[p] for p in mine])
            for p in mine:
                del self._parts[p]
            for c in [c for c in self._inflight if c % self._width in mine]:
                self._forget(c, self._inflight.pop(c).envelope)
            for c in [c for c in self._waiting if c % self._width in mine]:
                self._forget(c, self._held.pop(c))
            self._waiting = [c for c in self._waiting if c % self._width not in mine]
        finally:
            self._revoking = False

    def _forget(self, composite: int, envelope: Envelope) -> None:
        if self._due:
            self._due.pop(composite, None)
        if self._attempts:
            self._attempts.pop(composite, None)
        key = envelope.key
        if key is not None and self._keys.get(key) == composite:
            del self._keys[key]

    async def _commit(self, parts: Sequence[_Partition]) -> None:
        offsets = {}
        for part in parts:
            point = part.commit_point()
            if point is not None and point != part.committed:
                offsets[part.tp] = point
        if not offsets:
            return
        try:
            # bounded: aiokafka retries some commit errors without end (a broker that lost the topic)
            async with asyncio.timeout(self._backend.options.request_timeout_ms / 1000):
                await self._consumer.commit(offsets)
        except (TimeoutError, self._backend._errors.KafkaError) as exc:
            log.warning(
                "could not commit offsets; messages after them may be delivered again",
                extra={"topic": self._topic, "group": self._group, "error": repr(exc)},
            )
            return
        for part in parts:
            if part.tp in offsets:
                part.committed = offsets[part.tp]

    # -- handing out ---------------------------------------------------------------------------------------------

    def _take(self, composite: int, envelope: Envelope) -> Delivery:
        # a record handed out before (nacked or released) has its attempts so far in _attempts
        attempt = self._attempts.pop(composite, 0) + 1 if self._attempts else 1
        key = envelope.key
        if key is not None:
            self._keys[key] = composite
        delivery = make_delivery(self._topic, self._group, envelope, composite, attempt)
        self._inflight[composite] = delivery
        return delivery

    def _free(self, composite: int, key: str | None) -> bool:
        return key is None or self._keys.get(key, composite) == composite

    def _collect(self, limit: int, out: list[Delivery]) -> float | None:
        """Hand out waiting records that may go; returns when the next delayed one is due."""
        if self._revoking or not self._waiting:
            return None
        now = time.monotonic()
        keep: list[int] = []
        next_due: float | None = None
        for c in self._waiting:
            envelope = self._held[c]
            due = self._due.get(c, 0.0)
            if len(out) < limit and due <= now and self._free(c, envelope.key):
                del self._held[c]
                self._due.pop(c, None)
                out.append(self._take(c, envelope))
            else:
                keep.append(c)
                if due > now:
                    next_due = due if next_due is None else min(next_due, due)
        self._waiting = keep
        return next_due

    def _accept(self, records: dict[Any, list[Any]], out: list[Delivery], limit: int) -> None:
        width = self._width
        for tp, batch in records.items():
            partition = tp.partition
            part = self._parts.get(partition)
            if part is None:
                continue  # no longer ours
            taken = part.open
            for record in batch:
                offset = record.offset
                # records come in offset order, so a new one usually goes after every offset taken
                at = len(taken)
                if at and offset <= taken[-1]:
                    at = bisect.bisect_left(taken, offset)
                    if taken[at] == offset:
                        continue  # taken already (fetched again after a seek)
                part.next = offset + 1  # may move back: the broker lost its log and the position was reset
                if part.min_timestamp is not None:
                    if record.timestamp < part.min_timestamp:
                        continue
                    part.min_timestamp = None
                composite = offset * width + partition
                envelope = decode_record(record.key, record.value, record.headers)
                taken.insert(at, offset)
                if len(out) < limit and self._free(composite, envelope.key):
                    out.append(self._take(composite, envelope))
                else:
                    self._held[composite] = envelope
                    bisect.insort(self._waiting, composite)

    def _is_closed(self) -> bool:  # a method, so the type checker does not narrow it across awaits
        return self._closed

    def _primed(self) -> bool:
        """Joined, and every partition's first fetch answered: a zero-wait fetch then sees what the topic holds."""
        consumer = self._consumer
        return self._joined and all(consumer.highwater(p.tp) is not None for p in self._parts.values())

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        if self._closed or limit <= 0:
            return []
        deadline = time.monotonic() + wait
        grace = deadline + self._backend.options.connect_timeout  # how long a fresh member may take to join
        errors = self._backend._errors
        out: list[Delivery] = []
        while not self._is_closed():
            next_due = self._collect(limit, out)
            if len(out) >= limit:
                return out
            now = time.monotonic()
            if out:
                timeout = 0.0
            else:
                remaining = deadline - now
                primed = self._primed()
                if remaining <= 0 and (primed or now >= grace):
                    return out
                timeout = remaining if primed else 0.05
                if next_due is not None:
                    timeout = min(timeout, max(next_due - now, 0.0))
                if self._waiting:  # an ack may free a key: look again soon
                    timeout = min(timeout, 0.02)
            try:
                records = await self._consumer.getmany(
                    timeout_ms=int(timeout * 1000), max_records=max(limit - len(out), 1)
                )
            except errors.KafkaError as exc:
                log.warning(
                    "fetch failed; trying again",
                    extra={"topic": self._topic, "group": self._group, "error": repr(exc)},
                )
                records = {}
                await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))
            self._accept(records, out, limit)
            if out:
                return out
        return out

    # -- settling ------------------------------------------------------------------------------------------------

    def _settle(self, delivery: Delivery) -> _Partition | None:
        """Stop tracking a delivery as in flight; returns its partition if it is still ours."""
        c = delivery.offset
        if self._inflight.get(c) is not delivery:
            return None  # settled already, or its partition was given up
        del self._inflight[c]
        self._settled.set()
        return self._parts.get(c % self._width)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        inflight, parts, width = self._inflight, self._parts, self._width
        touched: dict[int, _Partition] = {}
        settled = False
        for d in deliveries:  # _settle and _forget inlined: this runs for every message handled
            c = d.offset
            if inflight.get(c) is not d:
                continue  # settled already, or its partition was given up
            del inflight[c]
            settled = True
            partition = c % width
            part = parts.get(partition)
            if part is None:
                continue
            self._forget(c, d.envelope)
            offset = c // width
            taken = part.open
            i = 0 if taken and taken[0] == offset else bisect.bisect_left(taken, offset)
            if i < len(taken) and taken[i] == offset:
                del taken[i]
            touched[partition] = part
        if settled:
            self._settled.set()
        if touched and not self._revoking:
            await self._commit(list(touched.values()))

    def _requeue(self, delivery: Delivery, delay: float, *, count: bool) -> None:
        if self._settle(delivery) is None:
            return
        c = delivery.offset
        self._attempts[c] = delivery.attempt if count else delivery.attempt - 1
        if delay > 0:
            self._due[c] = time.monotonic() + delay
        self._held[c] = delivery.envelope
        bisect.insort(self._waiting, c)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        self._requeue(delivery, delay, count=True)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self._requeue(d, 0.0, count=False)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backend._channels.discard(self)
        if self._consumer is None:
            return
        with contextlib.suppress(Exception):
            await self._commit(list(self._parts.values()))
        self._parts.clear()  # what we still hold is not ours to commit any more
        try:
            await _stop_consumer(self._consumer)
        except Exception:
            log.warning("could not leave the group cleanly", extra={"topic": self._topic, "group": self._group})


async def _stop_consumer(consumer: Any) -> None:
    """``consumer.stop()``, carried to the end when aiokafka re-raises the cancellation of its own fetch task.

    aiokafka's ``Fetcher.close`` cancels a fetch that is backing off after a failed request and awaits it without
    catching the ``CancelledError`` (seen with 0.14 when a member closes right after its broker restarted; see
    aio-libs/aiokafka#647): ``stop()`` then raises it and skips closing the client's connections. When the task
    running this is not itself being cancelled, that error is aiokafka's own: finish the close it skipped.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        log.debug("aiokafka's consumer.stop() raised its own cancellation; closing the rest")
        pending = [t for t in getattr(getattr(consumer, "_fetcher", None), "_pending_tasks", ()) if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        client = getattr(consumer, "_client", None)
        if client is not None:
            await client.close()


def _listener_base() -> type:
    return require("aiokafka", "kafka").ConsumerRebalanceListener  # type: ignore[no-any-return]


class _Listener:
    """Forwards aiokafka's rebalance callbacks to the channel (made a ConsumerRebalanceListener in ``__new__``)."""

    def __new__(cls, channel: _KafkaChannel) -> Any:
        base = _listener_base()

        class Listener(base):  # type: ignore[valid-type,misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await channel.on_revoked(revoked)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                await channel.on_assigned(assigned)

        return Listener()


_INT = {
    "partitions",
    "replication_factor",
    "linger_ms",
    "max_batch_size",
    "session_timeout_ms",
    "heartbeat_interval_ms",
    "rebalance_timeout_ms",
    "request_timeout_ms",
    "fetch_max_wait_ms",
}
_FLOAT = {"connect_timeout", "revoke_timeout"}
_BOOL = {"create_topics", "idempotence"}
_STR = {
    "prefix",
    "acks",
    "client_id",
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
}


def _parse(name: str, value: Any) -> Any:
    if name in _INT:
        number = int(value)
        if number < (0 if name in ("linger_ms", "fetch_max_wait_ms") else 1):
            raise ValueError("too small")
        return number
    if name in _FLOAT:
        real = float(value)
        if real <= 0:
            raise ValueError("must be positive")
        return real
    if name in _BOOL:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError("not a boolean")
        return text in ("1", "true", "yes")
    return str(value)


def _option(name: str, value: Any) -> Any:
    if name not in _INT | _FLOAT | _BOOL | _STR:
        raise ConfigurationError(
            f"unknown Kafka broker option {name!r}",
            hint=f"use one of: {', '.join(sorted(_INT | _FLOAT | _BOOL | _STR))}",
        )
    try:
        return _parse(name, value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"bad value {value!r} for Kafka broker option {name!r}: {exc}") from exc


def from_url(url: str, **options: Any) -> KafkaBackend:
    """``kafka://host:port[,host:port][?option=value&...]``; options are :class:`KafkaOptions` fields."""
    parts = urlsplit(url)
    hosts = parts.netloc
    if parts.scheme != "kafka" or not hosts or (parts.path not in ("", "/")):
        raise ConfigurationError(f"bad Kafka broker URL {url!r}", hint="use kafka://host:port[,host:port]")
    for host in hosts.split(","):
        name, sep, port = host.rpartition(":")
        if not sep or not name or not port.isdigit():
            raise ConfigurationError(
                f"bad Kafka broker address {host!r} in {url!r}", hint="use kafka://host:port[,host:port]"
            )
    merged: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
    merged.update(options)
    values = {name: _option(name, value) for name, value in merged.items()}
    if values.get("acks", "all") not in ("all", "0", "1", "-1"):
        raise ConfigurationError(f"bad value {values['acks']!r} for Kafka broker option 'acks'", hint="use all, 1 or 0")
    safe = url.split("?", 1)[0]
    return KafkaBackend(hosts, KafkaOptions(**values), url=safe)
