"""The RabbitMQ backend against the machine's RabbitMQ (127.0.0.1:5672, guest/guest).

Every test gets its own vhost (``rabbitmqctl add_vhost``), deleted afterwards with everything in it, so runs never
see each other's queues and the server does not fill up. The broker-restart test stops and starts the shared
server's RabbitMQ application (``rabbitmqctl stop_app`` / ``start_app``); it runs last in this file and restores
the server even when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import socket
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from cloudevents.core.bindings import amqp, rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from meshkit.errors import ConfigurationError, Unavailable
from meshkit.messaging import Message, SubscriptionOptions, connect
from meshkit.messaging.testing import SCENARIOS, Scenario, eventually, run_scenario
from tests.messaging.outage import until_accepted
from tests.servers import free_port

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractExchange

aio_pika = pytest.importorskip("aio_pika")

HOST = "127.0.0.1"
PORT = 5672


def _server_up() -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, PORT), timeout=2):
        return True
    return False


pytestmark = [
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not installed"),
    pytest.mark.skipif(not _server_up(), reason=f"no RabbitMQ on {HOST}:{PORT}"),
]


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh vhost for one test; deleted (with every queue and exchange in it) afterwards."""
    name = f"meshkit-test-{uuid.uuid4().hex[:12]}"
    _ctl("add_vhost", name)
    try:
        _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        _ctl("delete_vhost", name)


def url_for(vhost: str, **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"amqp://guest:guest@{HOST}:{PORT}/{vhost}" + (f"?{q}" if q else "")


# -- (a) the conformance suite ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_conformance(scenario: Scenario, vhost: str) -> None:
    url = url_for(vhost)
    ran = await run_scenario(scenario, lambda: connect(url))
    if not ran:
        pytest.skip(f"rabbitmq lacks a capability {scenario.__name__} needs (RabbitMQ queues keep no log, no dedup)")


# -- (b) interop with a plain aio-pika client and the CloudEvents SDK -------------------------------------------


async def _declare_exchange(channel: AbstractChannel) -> AbstractExchange:
    """The exchange as meshkit declares it (docs/messaging.md): a plain client can declare it the same way."""
    unrouted = await channel.declare_exchange("meshkit.unrouted", aio_pika.ExchangeType.TOPIC, durable=True)
    parked = await channel.declare_queue("meshkit.unrouted", durable=True, arguments={"x-queue-type": "classic"})
    await parked.bind(unrouted, routing_key="#")
    return await channel.declare_exchange(
        "meshkit", aio_pika.ExchangeType.TOPIC, durable=True, arguments={"alternate-exchange": "meshkit.unrouted"}
    )


@pytest.mark.anyio
async def test_a_plain_client_reads_what_meshkit_publishes_as_cloudevents(vhost: str) -> None:
    url = url_for(vhost)
    async with await aio_pika.connect(url) as plain, connect(url, source="meshkit://orders") as broker:
        channel = await plain.channel()
        exchange = await _declare_exchange(channel)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="order.created")
        sent = await broker.publish(
            "order.created", {"id": 42}, key="order-42", headers={"tenant": "acme"}, subject="orders/42"
        )
        message = await queue.get(timeout=30, fail=True)
        assert message is not None
        await message.ack()
        event = amqp.from_binary(
            amqp.AMQPMessage(
                properties={"content-type": message.content_type},
                application_properties=dict(message.headers),
                application_data=message.body,
            ),
            JSONFormat(),
            CloudEvent,
        )
    assert event.get_id() == sent == message.message_id
    assert (event.get_source(), event.get_type(), event.get_subject()) == (
        "meshkit://orders",
        "order.created",
        "orders/42",
    )
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data() == {"id": 42}
    assert event.get_extension("partitionkey") == "order-42"
    assert event.get_extension("tenant") == "acme"
    assert event.get_time() is not None
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


@pytest.mark.anyio
@pytest.mark.parametrize("binding", ["amqp-binary", "rabbitmq-binary", "structured"])
async def test_meshkit_handles_cloudevents_a_plain_client_publishes(vhost: str, binding: str) -> None:
    """The SDK's AMQP binding (cloudEvents_ properties), its RabbitMQ binding (ce- headers) and structured JSON.

    The structured message is published before any group exists: meshkit keeps it for the first group.
    """
    url = url_for(vhost)
    event = CloudEvent(
        attributes={
            "type": "com.example.payment.done",
            "source": "/payments",
            "id": f"pay-{binding}",
            "subject": "payments/7",
            "time": datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
            "datacontenttype": "application/json",
            "partitionkey": "order-7",
        },
        data={"amount": 12.5},
    )
    if binding == "amqp-binary":
        m = amqp.to_binary(event, JSONFormat())
        outgoing = aio_pika.Message(
            m.application_data, headers=m.application_properties, content_type=m.properties["content-type"]
        )
    else:
        r = (rabbitmq.to_binary_event if binding == "rabbitmq-binary" else rabbitmq.to_structured_event)(event)
        outgoing = aio_pika.Message(r.body, headers=dict(r.headers), content_type=r.content_type)
    seen: list[Message] = []

    async def handle(message: Message) -> None:
        seen.append(message)

    async with await aio_pika.connect(url) as plain, connect(url) as broker:
        channel = await plain.channel()
        exchange = await _declare_exchange(channel)
        if binding != "structured":
            await broker.subscribe("payment.done", handle, group="orders")
        await exchange.publish(outgoing, routing_key="payment.done")
        if binding == "structured":
            await broker.subscribe("payment.done", handle, group="orders")
        await eventually(lambda: len(seen) == 1, "the plain client's event")
    got = seen[0]
    assert got.id == f"pay-{binding}"
    assert (got.source, got.type, got.subject) == ("/payments", "com.example.payment.done", "payments/7")
    assert got.data == {"amount": 12.5}
    assert got.key == "order-7"
    assert got.time == datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


# -- (d) bad input ----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_unreachable_server_is_a_clear_error_naming_the_url() -> None:
    port = free_port()
    async with asyncio.timeout(60), connect(f"amqp://guest:secret@{HOST}:{port}/?connect_timeout=5") as broker:
        with pytest.raises(Unavailable) as info:
            await broker.publish("t", 1)
    assert f"amqp://guest:***@{HOST}:{port}/" in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.anyio
async def test_wrong_credentials_and_a_missing_vhost_are_configuration_errors() -> None:
    async with asyncio.timeout(60):
        async with connect(f"amqp://guest:wrong@{HOST}:{PORT}/") as broker:
            with pytest.raises(ConfigurationError) as info:
                await broker.publish("t", 1)
        assert "refused the login" in str(info.value) and "wrong" not in str(info.value)
        async with connect(f"amqp://guest:guest@{HOST}:{PORT}/no-such-vhost-{uuid.uuid4().hex}") as broker:
            with pytest.raises(ConfigurationError) as info:
                await broker.subscribe("t", _ignore, group="g")
        assert "vhost" in str(info.value)


async def _ignore(message: Message) -> None:
    pass


@pytest.mark.parametrize(
    ("url", "options", "named"),
    [
        ("amqp://guest:guest@localhost/?prefetch=lots", {}, "prefetch"),
        ("amqp://guest:guest@localhost/?bogus=1&prefix=x", {}, "bogus"),
        ("amqp://guest:guest@localhost/?queue_type=stream", {}, "queue_type"),
        ("amqp://guest:guest@localhost/?prefetch=0", {}, "prefetch"),
        ("amqp://guest:guest@localhost/", {"colour": "blue"}, "colour"),
        ("amqp:///nohost", {}, "amqp://"),
    ],
)
def test_bad_url_options_are_named(url: str, options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        connect(url, **options)
    assert named in str(info.value)


@pytest.mark.anyio
async def test_bad_names_and_replay_starts_are_refused(vhost: str) -> None:
    async with connect(url_for(vhost)) as broker:
        with pytest.raises(ConfigurationError, match="topic"):
            await broker.publish("orders.*", 1)
        with pytest.raises(ConfigurationError, match="group"):
            await broker.subscribe("orders", _ignore, group="bad group!")
        with pytest.raises(ConfigurationError, match="keep no log"):
            await broker.subscribe("orders", _ignore, group="g", options=SubscriptionOptions(start=5))


# -- the server-side safety net ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_message_returned_too_often_goes_to_the_dead_letters_not_away(vhost: str) -> None:
    """A message whose member keeps leaving (as if it crashed its process) is dead-lettered by the server."""
    async with connect(url_for(vhost), delivery_limit=2) as broker:
        await broker.publish("crashy", {"n": 1})
        backend = broker._backend
        for _ in range(10):
            member = await backend.group("crashy", "g", "earliest")
            got = await member.fetch(1, 5.0)
            await member.aclose()  # never acked: the server gets it back and counts a delivery
            if not got:
                break
        else:
            raise AssertionError("the server never gave up on the message")
        dead: list[Message] = []

        async def listed() -> bool:
            dead[:] = await broker.dead_letters("crashy").list()
            return len(dead) == 1

        await eventually(listed, "the message to be dead-lettered (not dropped)", every=0.05)
        assert dead[0].data == {"n": 1}


# -- (c) broker restart: runs last in this file -------------------------------------------------------------------


async def _rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {err.decode(errors='replace')}"


async def _answering(url: str) -> bool:
    try:
        async with asyncio.timeout(10):
            connection = await aio_pika.connect(url)
            await connection.close()
    except Exception:
        return False
    return True


async def _restart(url: str) -> None:
    """Stop and start the RabbitMQ application (the node stays up); return once it answers again."""
    await _rabbitmqctl("stop_app")
    try:
        await eventually(lambda: not _server_up(), "the listener to close", timeout=60)
    finally:
        await _rabbitmqctl("start_app")
    await eventually(lambda: _answering(url), "RabbitMQ to answer after start_app", timeout=120, every=0.2)


@pytest.mark.anyio
async def test_a_publish_whose_confirm_never_comes_is_unavailable_not_a_hang(vhost: str) -> None:
    """A channel lost with confirms outstanding may never resolve them: the publish gives up after
    ``publish_timeout`` with Unavailable (found as a hang of the restart test below)."""
    async with connect(url_for(vhost, publish_timeout="0.5")) as broker:
        await broker.publish("confirm.lost", {"n": 0})  # connected, confirms work
        backend: Any = broker._backend
        channel = await backend._publisher.get_underlay_channel()

        async def never_confirmed(*args: Any, **kwargs: Any) -> Any:
            await asyncio.Event().wait()  # the confirm that never arrives

        channel.basic_publish = never_confirmed
        async with asyncio.timeout(60):  # a hang fails here; the publish must give up after 0.5 s
            with pytest.raises(Unavailable, match=r"did not confirm a publish to 'confirm\.lost' within 0\.5 s"):
                await broker.publish("confirm.lost", {"n": 1})


@pytest.mark.anyio
async def test_zz_broker_restarted_twice_loses_no_acknowledged_publish(vhost: str) -> None:
    """10,000 messages published and consumed while the shared server's RabbitMQ app is restarted twice.

    Every publish that returned is handled at least once (lost = 0); duplicates (publishes retried after a lost
    confirm, deliveries whose ack was cut off) are counted and printed. The consumer reconnects by itself; the
    publisher retries a batch that failed with a meshkit error.
    """
    total, batch = 10_000, 50
    url = url_for(vhost, reconnect_interval="0.5", publish_timeout="60")
    handled: Counter[int] = Counter()
    acknowledged: set[int] = set()
    retries = 0

    async def handle(message: Message) -> None:
        handled[message.data["n"]] += 1

    restarts: list[asyncio.Task[None]] = []
    try:
        async with connect(url) as consumer, connect(url) as producer:
            await consumer.subscribe(
                "restart.work", handle, group="g", options=SubscriptionOptions(concurrency=16, poll_interval=0.1)
            )
            for start in range(0, total, batch):
                if start in (total // 3 // batch * batch, total // 2 // batch * batch):
                    if restarts:
                        await restarts[-1]  # one restart at a time
                    restarts.append(asyncio.create_task(_restart(url_for(vhost))))
                numbers = list(range(start, start + batch))
                body = [{"n": n} for n in numbers]
                retries += await until_accepted(
                    functools.partial(producer.publish_batch, "restart.work", body), pause=0.2
                )
                acknowledged.update(numbers)
            await asyncio.gather(*restarts)
            await eventually(lambda: acknowledged <= set(handled), "every acknowledged publish handled", timeout=180)
    finally:
        for task in restarts:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if not _server_up():  # never leave the shared server stopped
            await _rabbitmqctl("start_app")
    lost = acknowledged - set(handled)
    duplicates = sum(c - 1 for c in handled.values() if c > 1)
    print(f"\nrestart x2: published {len(acknowledged)}, lost {len(lost)}, duplicates {duplicates}, retries {retries}")
    assert not lost, f"lost {len(lost)} acknowledged messages, e.g. {sorted(lost)[:10]}"
    assert len(restarts) == 2
