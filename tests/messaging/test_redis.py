"""The Redis Streams backend against a real server: conformance, CloudEvents interop, bad input.

The machine's Redis (``MESHKIT_REDIS_URL``, default ``redis://127.0.0.1:6379/0``) is shared: every test and every
scenario run uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from meshkit.errors import ConfigurationError, Unavailable
from meshkit.messaging import Message, Outgoing, SubscriptionOptions, connect
from meshkit.messaging.message import Envelope
from meshkit.messaging.redis import RedisBackend, entry_id_of, from_url, offset_of
from meshkit.messaging.testing import SCENARIOS, OpenBroker, Scenario, eventually, run_scenario
from meshkit.testing import FlakyHTTPServer
from tests.helpers import wait_until
from tests.messaging.outage import until_accepted
from tests.redis_keys import fresh_prefix
from tests.servers import free_port

REDIS_URL = os.environ.get("MESHKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
FAST = SubscriptionOptions(poll_interval=0.05, drain_timeout=10)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A fresh key prefix on the shared server; every key under it is deleted afterwards."""
    async with fresh_prefix(REDIS_URL, f"t-{uuid.uuid4().hex[:12]}:") as name:
        yield name


def url_for(prefix: str, **query: Any) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"prefix": prefix, **query}.items())
    return f"{REDIS_URL}?{params}"


# -- conformance ---------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_conformance(scenario: Scenario, prefix: str) -> None:
    opener: OpenBroker = lambda: connect(url_for(prefix))  # noqa: E731
    ran = await run_scenario(scenario, opener)
    assert ran, f"redis lacks a capability {scenario.__name__} needs"


# -- the layout and the offsets ------------------------------------------------------------------------------------


def test_offsets_round_trip_entry_ids() -> None:
    for entry_id in ("0-0", "0-1", "1795443434651-0", "1795443434651-7", f"{2**48}-{2**64 - 1}"):
        assert entry_id_of(offset_of(entry_id)) == entry_id
    assert offset_of("5-0") > offset_of("4-999999")


# -- interop with a plain client -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_plain_client_reads_a_meshkit_message_as_a_cloudevent(prefix: str) -> None:
    async with connect(url_for(prefix), source="meshkit://orders") as broker:
        sent = await broker.publish(
            "order.created", {"id": 42}, key="order-42", headers={"tenant": "acme"}, subject="orders/42"
        )
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        entries = await client.xrange(f"{prefix}{{order.created}}")
    finally:
        await client.aclose()
    assert entries is not None and len(entries) == 1
    _, raw = entries[0]
    assert raw is not None
    fields: dict[bytes, bytes] = {bytes(k): bytes(v) for k, v in raw.items()}  # type: ignore[arg-type]
    headers = {k.decode(): v for k, v in fields.items() if k != b"data"}
    event = from_binary(KafkaMessage(headers=headers, key=None, value=fields[b"data"]), JSONFormat())
    assert event.get_id() == sent
    assert event.get_source() == "meshkit://orders"
    assert event.get_type() == "order.created"
    assert event.get_subject() == "orders/42"
    assert event.get_datacontenttype() == "application/json"
    assert event.get_extension("partitionkey") == "order-42"
    assert event.get_extension("tenant") == "acme"
    assert event.get_data() == {"id": 42}
    assert event.get_time() is not None


@pytest.mark.anyio
async def test_a_cloudevent_written_by_a_plain_client_reaches_a_meshkit_handler(prefix: str) -> None:
    event = CloudEvent(
        attributes={
            "id": "ext-1",
            "source": "https://example.com/billing",
            "type": "invoice.paid",
            "subject": "invoices/7",
            "datacontenttype": "application/json",
            "partitionkey": "invoice-7",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        data={"invoice": 7, "amount": "12.50"},
    )
    kafka = to_binary(event, JSONFormat())
    fields: dict[str, bytes] = {**kafka.headers, "data": kafka.value}
    structured = CloudEvent(
        attributes={"id": "ext-2", "source": "/s", "type": "invoice.paid", "datacontenttype": "application/json"},
        data={"invoice": 8},
    )
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        stream = f"{prefix}{{invoice.paid}}"
        await client.xadd(stream, fields)  # type: ignore[arg-type]
        await client.xadd(
            stream,
            {"content-type": "application/cloudevents+json", "data": JSONFormat().write(structured)},
        )
    finally:
        await client.aclose()
    got: list[Message] = []

    async def handle(message: Message) -> None:
        got.append(message)

    async with connect(url_for(prefix)) as broker:
        await broker.subscribe("invoice.paid", handle, group="books", options=FAST)
        await eventually(lambda: len(got) == 2, "both plain-client events")
    first, second = got
    assert (first.id, first.source, first.type, first.subject) == (
        "ext-1",
        "https://example.com/billing",
        "invoice.paid",
        "invoices/7",
    )
    assert first.data == {"invoice": 7, "amount": "12.50"}
    assert first.key == "invoice-7"
    assert first.traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert (second.id, second.data) == ("ext-2", {"invoice": 8})


@pytest.mark.anyio
async def test_a_stream_entry_that_is_not_a_cloudevent_is_dead_lettered(prefix: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.xadd(f"{prefix}{{raw}}", {"hello": "world"})
    finally:
        await client.aclose()
    seen: list[Message] = []

    async def handle(message: Message) -> None:
        seen.append(message)

    async with connect(url_for(prefix)) as broker:
        await broker.subscribe("raw", handle, group="g", options=FAST)
        dead: list[Message] = []

        async def dead_lettered() -> bool:
            dead[:] = await broker.dead_letters("raw").list()
            return bool(dead)

        await eventually(dead_lettered, "the foreign entry to reach the dead letters", every=0.01)
    assert not seen
    assert dead[0].headers["dlqreason"].startswith("undecodable")
    assert dead[0].headers["dlqid"].startswith("redis:")  # no ce_id: the entry id stands in


@pytest.mark.anyio
async def test_foreign_entries_with_odd_fields_are_read_leniently(prefix: str) -> None:
    """A header that is not UTF-8, a repeated attribute, an entry with nothing but data: read, never a crash.

    They share one fetch with a meshkit entry, which must come through intact.
    """
    stream = f"{prefix}{{odd}}"
    base = [
        ("ce_specversion", "1.0"),
        ("ce_source", "/plain"),
        ("ce_type", "odd"),
        ("ce_time", "2026-01-02T03:04:05+00:00"),
        ("content-type", "application/json"),
    ]
    client = aioredis.Redis.from_url(REDIS_URL)

    async def xadd(*fields: tuple[str, str | bytes]) -> None:  # a list: a field may come twice
        parts = [part for field in fields for part in field]
        await client.execute_command("XADD", stream, "*", *parts)  # type: ignore[no-untyped-call]

    try:
        await xadd(("ce_id", "latin"), *base, ("ce_tenant", b"\xff\xfeacme"), ("data", b'{"n":1}'))
        await xadd(("ce_specversion", "1.0"), ("ce_id", "empty"))  # no data: not JSON, a dead letter
        # meshkit's layout up to the data, then the id again: the later one counts, as for any field
        await xadd(base[0], ("ce_id", "first"), *base[1:], ("ce_id", "second"), ("data", b'{"n":2}'))
        await client.xadd(stream, {"data": b"no attributes at all"})
    finally:
        await client.aclose()
    got: list[Message] = []

    async def handle(message: Message) -> None:
        got.append(message)

    async with connect(url_for(prefix)) as broker:
        await broker.publish("odd", {"n": 3}, headers={"tenant": "ünïcode"}, subject="s/3")
        await broker.subscribe("odd", handle, group="g", options=FAST)
        await eventually(lambda: len(got) == 3, "three readable entries")
        dead: list[Message] = []

        async def both_dead() -> bool:  # the entry without data and the one without attributes
            dead[:] = await broker.dead_letters("odd").list()
            return len(dead) >= 2

        await eventually(both_dead, "the entries that are not CloudEvents to reach the dead letters", every=0.01)
    by_id = {m.id: m for m in got}
    assert by_id["latin"].headers["tenant"] == "\ufffd\ufffdacme" and by_id["latin"].data == {"n": 1}
    assert by_id["second"].data == {"n": 2}
    (mine,) = [m for m in got if m.data == {"n": 3}]
    assert (mine.headers["tenant"], mine.subject, mine.source) == ("ünïcode", "s/3", "meshkit://app")
    assert sorted(m.headers["dlqid"] for m in dead)[0] == "empty" and len(dead) == 2


@pytest.mark.anyio
async def test_a_large_mixed_batch_round_trips_in_order(prefix: str) -> None:
    """Several script calls in one pipeline; messages with different attributes (several templates); any bytes."""
    binary = bytes(range(256)) * 2
    items: list[Outgoing] = []
    for n in range(1234):
        if n % 7 == 0:
            items.append(Outgoing(binary + n.to_bytes(2, "big"), headers={"kind": "bin"}))
        elif n % 5 == 0:
            items.append(Outgoing({"n": n}, type="other", subject=f"s/{n}", headers={"tenant": f"t{n % 3}"}))
        else:
            items.append(Outgoing({"n": n}))
    items.append(Outgoing({"n": "again"}, id="dup"))
    items.append(Outgoing({"n": "dropped"}, id="dup"))  # the same id within one batch: stored once
    got: list[Message] = []

    async def handle(message: Message) -> None:
        got.append(message)

    async with connect(url_for(prefix)) as broker:
        ids = await broker.publish_batch("mixed", items)
        opts = SubscriptionOptions(concurrency=1, prefetch=300, poll_interval=0.05, drain_timeout=10)
        await broker.subscribe("mixed", handle, group="g", options=opts)
        await eventually(lambda: len(got) == 1235, "every message of the batch")
    assert [m.id for m in got] == ids[:1235]  # one worker: the stream's order
    for n, m in enumerate(got[:1234]):
        if n % 7 == 0:
            assert (m.data, m.headers, m.datacontenttype) == (
                binary + n.to_bytes(2, "big"),
                {"kind": "bin"},
                "application/octet-stream",
            )
        elif n % 5 == 0:
            assert (m.data, m.type, m.subject, m.headers) == ({"n": n}, "other", f"s/{n}", {"tenant": f"t{n % 3}"})
        else:
            assert (m.data, m.type, m.subject, m.headers) == ({"n": n}, "mixed", None, {})
    assert got[-1].data == {"n": "again"}


# -- Redis specifics -----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_dead_members_messages_are_claimed_after_the_visibility_timeout(prefix: str) -> None:
    """A member that fetched and vanished (no ack, no leave): its messages go to another member, counted."""
    backend = from_url(url_for(prefix, visibility_timeout=0.5))
    try:
        async with connect(url_for(prefix)) as producer:
            await producer.publish_batch("jobs", [{"n": n} for n in range(10)])
        dead = await backend.group("jobs", "workers", "earliest")
        taken = await dead.fetch(10, 5.0)
        assert len(taken) == 10
        # the member dies: it never acks and never leaves. Another member of the group picks up its work.
        got: list[Message] = []

        async def handle(message: Message) -> None:
            got.append(message)

        async with connect(url_for(prefix, visibility_timeout=0.5)) as broker:
            await broker.subscribe("jobs", handle, group="workers", options=FAST)
            await eventually(lambda: len(got) == 10, "the dead member's 10 messages")
        assert sorted(m.data["n"] for m in got) == list(range(10))
        assert all(m.delivery_count == 2 for m in got), [m.delivery_count for m in got]
    finally:
        await backend.aclose()


@pytest.mark.anyio
async def test_a_slow_member_cannot_settle_what_was_claimed_from_it(prefix: str) -> None:
    """After the visibility timeout another member owns the message: the slow one's nack is ignored, its ack holds.

    A message nacked for later sits idle in the pool meanwhile: recovering stuck messages must leave it alone.
    """
    patient_backend = from_url(url_for(prefix))  # its members never find anything stuck within this test
    eager_backend = from_url(url_for(prefix, visibility_timeout=0.5))
    try:
        async with connect(url_for(prefix)) as producer:
            await producer.publish_batch("jobs", [{"n": 1}, {"n": 2}, {"n": 3}])
        patient, slow, late = [await patient_backend.group("jobs", "workers", "earliest") for _ in range(3)]
        other = await eager_backend.group("jobs", "workers", "earliest")
        (later,) = await patient.fetch(1, 5.0)
        await patient.nack(later, 60.0)
        held = await slow.fetch(2, 5.0)
        assert len(held) == 2
        claimed = await other.fetch(1, 30.0)  # returns once the slow member's two were idle for 0.5 s
        assert len(claimed) == 1 and claimed[0].attempt == 2 and claimed[0].offset in {d.offset for d in held}
        (lost,) = [d for d in held if d.offset == claimed[0].offset]
        (back_in_ready,) = [d for d in held if d.offset != claimed[0].offset]
        await slow.nack(lost, 0.0)  # not the slow member's any more: no effect
        await slow.ack([back_in_ready])  # handled after all: it must not come again
        assert await late.fetch(10, 1.0) == []
        await other.ack(claimed)
        assert await late.fetch(10, 0.5) == []
        for channel in (patient, slow, other, late):
            await channel.aclose()
    finally:
        await patient_backend.aclose()
        await eager_backend.aclose()


@pytest.mark.anyio
async def test_retention_trims_the_stream(prefix: str) -> None:
    async with connect(url_for(prefix, maxlen=100)) as broker:
        for start in range(0, 2000, 200):
            await broker.publish_batch("trimmed", list(range(start, start + 200)))
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        length = await client.xlen(f"{prefix}{{trimmed}}")
    finally:
        await client.aclose()
    assert length < 2000 and length <= 100 + 200, length  # MAXLEN ~ trims whole nodes, so about 100


@pytest.mark.anyio
async def test_dedup_can_be_turned_off(prefix: str) -> None:
    async with connect(url_for(prefix, dedup_window=0)) as broker:
        for _ in range(3):
            await broker.publish("twice", 1, id="same")
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert await client.xlen(f"{prefix}{{twice}}") == 3
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_purge_deletes_everything_under_the_prefix(prefix: str) -> None:
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    try:
        async with connect(url_for(prefix)) as broker:
            await broker.publish("a", 1)
            await broker.publish("b", 2)
        assert await backend.purge() >= 2
        assert await backend.purge() == 0
    finally:
        await backend.aclose()


@pytest.mark.anyio
async def test_closing_after_the_stream_was_deleted_is_quiet(prefix: str) -> None:
    """Someone deletes the topic's stream (an operator, a purge) while a member is subscribed: closing still works."""
    seen: list[int] = []

    async def handler(message: Message) -> None:
        seen.append(message.data)

    async with connect(url_for(prefix)) as broker:
        await broker.subscribe("gone", handler, group="g", options=FAST)
        await broker.publish("gone", 1)
        await eventually(lambda: seen == [1], "the message handled")
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            assert await client.delete(f"{prefix}{{gone}}") == 1
        finally:
            await client.aclose()
    # leaving the __aexit__ without an error is the test: the member's leave script finds no group to leave


# -- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_unreachable_server_is_a_clear_error_naming_the_url() -> None:
    url = "redis://127.0.0.1:1/0?connect_timeout=2"
    async with asyncio.timeout(120), connect(url) as broker:  # a hang fails the test (TimeoutError), not a slow run
        with pytest.raises(Unavailable) as info:
            await broker.publish("t", 1)
        with pytest.raises(Unavailable):
            await broker.subscribe("t", _noop, group="g")
    assert "redis://127.0.0.1:1/0" in str(info.value)
    assert info.value.hint is not None and "server running" in info.value.hint


@pytest.mark.anyio
async def test_a_server_that_never_answers_times_out_with_a_clear_error() -> None:
    """Something accepts the connection and then says nothing: a clear error after the socket timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # never accepted, never answered: the kernel completes the handshake
    port = silent.getsockname()[1]
    try:
        async with connect(f"redis://127.0.0.1:{port}/0?socket_timeout=0.3&connect_timeout=0.3") as broker:
            with pytest.raises(Unavailable) as info:
                async with asyncio.timeout(120):  # the socket timeout must end it; a hang fails with TimeoutError
                    await broker.publish("t", 1)
    finally:
        silent.close()
    assert f"127.0.0.1:{port}" in str(info.value)


@pytest.mark.anyio
async def test_a_server_that_is_not_redis_is_a_clear_error() -> None:
    """An HTTP server where Redis was expected."""
    with FlakyHTTPServer() as http:
        url = http.url.replace("http://", "redis://") + "/0"
        async with connect(url) as broker:
            with pytest.raises(Unavailable) as info:
                await broker.publish("t", 1)
    assert url.split("//")[1].split("/")[0] in str(info.value)


async def _noop(message: Message) -> None:
    pass


def test_bad_url_options_are_named() -> None:
    with pytest.raises(ConfigurationError) as info:
        connect("redis://127.0.0.1:6379/0?prefx=a&visibility_timeout=5")
    assert "'prefx'" in str(info.value)
    assert info.value.hint is not None and "prefix" in info.value.hint
    with pytest.raises(ConfigurationError) as info:
        connect("redis://127.0.0.1:6379/0", visiblity_timeout=5)
    assert "'visiblity_timeout'" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        connect("redis://127.0.0.1:6379/0?visibility_timeout=soon")
    assert "'visibility_timeout'" in str(info.value) and "'soon'" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        connect("redis://127.0.0.1:6379/zero")
    assert "'zero'" in str(info.value)
    with pytest.raises(ConfigurationError):
        connect("redis://127.0.0.1:6379/0?visibility_timeout=-1")


def test_a_password_never_shows_in_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        connect("redis://user:s3cret@127.0.0.1:6379/0?nope=1")
    assert "s3cret" not in str(info.value)
    assert "user:***@127.0.0.1:6379" in str(info.value)


def test_the_entry_layout_is_the_documented_one() -> None:
    """docs/messaging.md shows the entry layout; keep it in step with the code."""
    backend = RedisBackend(REDIS_URL)
    fields = backend._fields(
        Envelope(
            id="1",
            source="meshkit://orders",
            type="order.created",
            time="t",
            datacontenttype="application/json",
            data=json.dumps({"id": 42}).encode(),
            extensions={"partitionkey": "order-42"},
        )
    )
    names = list(fields[::2])
    assert names == [
        "ce_specversion",
        "ce_id",
        "ce_source",
        "ce_type",
        "ce_time",
        "content-type",
        "ce_partitionkey",
        "data",
    ]


# -- a broker restart ----------------------------------------------------------------------------------------------


class _OwnRedis:
    """A redis-server of our own on a free port, with AOF (fsync always), that a test may stop and start."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(64).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(answers, "redis-server to answer", every=0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
            self.process = None


@pytest.mark.anyio
async def test_10000_messages_survive_two_broker_restarts(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    server = _OwnRedis(tmp_path)
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0?prefix=restart:"
    total = 10_000
    handled: Counter[int] = Counter()
    acknowledged: set[int] = set()

    async def handle(message: Message) -> None:
        handled[message.data["n"]] += 1

    try:
        async with connect(url) as consumer, connect(url) as producer:
            await consumer.subscribe("work", handle, group="g", options=FAST)
            restarts = {total // 3, total // 2}
            for n in range(total):
                if n in restarts:
                    await asyncio.to_thread(server.stop)
                    await asyncio.to_thread(server.start)
                # the publisher retries a clear meshkit error; dedup makes the retry safe
                await until_accepted(functools.partial(producer.publish, "work", {"n": n}, id=f"msg-{n}"))
                acknowledged.add(n)
            await eventually(lambda: acknowledged <= set(handled), "every acknowledged publish handled", 120)
    finally:
        server.stop()
    lost = acknowledged - set(handled)
    duplicates = sum(c - 1 for c in handled.values())
    print(
        f"redis restart x2: published {len(acknowledged)}, handled {len(handled)}, lost {len(lost)}, dup {duplicates}"
    )
    assert not lost
