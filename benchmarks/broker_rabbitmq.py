"""RabbitMQ contenders for ``benchmarks/messaging.py --broker rabbitmq``: raw aiormq (under aio-pika) at its best,
and FastStream.

Each contender gets its own vhost (``rabbitmqctl add_vhost``, deleted afterwards). Persistent messages into durable
quorum queues, publisher confirms on. Windowed publishing: raw = ``basic_publish(wait=False)`` in windows of 1,000
outstanding confirms; meshkit = ``publish_batch`` of 1,000 (its window); FastStream has no batch publish: 1,000
concurrent awaited publishes. Consuming: raw = ``basic_consume`` with ``basic.qos`` 1,000 and one
``basic.ack(multiple=True)`` per 100 messages; meshkit = ``subscribe`` (concurrency 256, prefetch 512; the backend's
``prefetch`` 1,000); FastStream = a subscriber with ``Channel(prefetch_count=1000)`` (it acks each message).
Latency at 500 msgs/s for 4 s: confirmed publishing one at a time does not keep up with 2,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from _harness import Plan, Runner, meshkit, paced, payload, quantiles, rate, stamped

TITLE = "RabbitMQ (persistent, quorum queues, publisher confirms)"
URL = "amqp://guest:guest@127.0.0.1:5672/"
PLAN: dict[str, Any] = {"batch": 1000, "rate": 500, "seconds": 4.0, "poll": 0.5}
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


@contextlib.contextmanager
def contenders(url: str, plan: Plan) -> Iterator[dict[str, Runner]]:
    async def mine(vhost_url: str) -> dict[str, float]:
        return await meshkit(vhost_url, plan, prefetch=1000)

    yield {
        "raw": lambda: in_own_vhost(url, lambda u: raw(u, plan)),
        "meshkit": lambda: in_own_vhost(url, mine),
        "faststream": lambda: in_own_vhost(url, lambda u: faststream(u, plan)),
    }


async def in_own_vhost(url: str, run: Callable[[str], Awaitable[dict[str, float]]]) -> dict[str, float]:
    vhost = f"meshkit-bench-{uuid.uuid4().hex[:8]}"
    user = urlsplit(url).username or "guest"
    await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        return await run(with_vhost(url, vhost))
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


def with_vhost(url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{vhost}"))


# -- raw aiormq (under aio-pika) -----------------------------------------------------------------------------------


async def raw(url: str, plan: Plan) -> dict[str, float]:
    import aio_pika
    from aiormq import spec

    result: dict[str, float] = {}
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for name in ("seq", "bench", "latency"):
            await channel.declare_queue(name, durable=True, arguments=QUORUM)
        pub = await channel.get_underlay_channel()
        props = spec.Basic.Properties(content_type="application/json", delivery_mode=2)

        start = time.perf_counter()
        for n in range(plan.sequential):
            await pub.basic_publish(json.dumps(payload(n, plan.size)).encode(), routing_key="seq", properties=props)
        result["publish sequential"] = rate(plan.sequential, start)

        async def one(n: int) -> None:
            body = json.dumps(payload(n, plan.size)).encode()
            await pub.basic_publish(body, routing_key="bench", properties=props, wait=False)  # type: ignore[call-arg]

        start = time.perf_counter()
        for i in range(0, plan.count, plan.batch):
            await asyncio.gather(*(one(n) for n in range(i, min(i + plan.batch, plan.count))))
        result["publish windowed"] = rate(plan.count, start)

        consumer = await (await connection.channel()).get_underlay_channel()
        await consumer.basic_qos(prefetch_count=1000)
        handled = 0
        done = asyncio.Event()

        async def on_message(message: Any) -> None:
            nonlocal handled
            json.loads(message.body)
            handled += 1
            if handled % 100 == 0 or handled == plan.count:
                await consumer.basic_ack(message.delivery.delivery_tag, multiple=True)
            if handled == plan.count:
                done.set()

        start = time.perf_counter()
        await consumer.basic_consume("bench", on_message)
        await asyncio.wait_for(done.wait(), 900)
        result["consume+ack"] = rate(plan.count, start)

        latencies: list[float] = []
        all_in = asyncio.Event()

        async def timed(message: Any) -> None:
            latencies.append(time.time() - json.loads(message.body)["t"])
            await consumer.basic_ack(message.delivery.delivery_tag)
            if len(latencies) >= plan.timed:
                all_in.set()

        await consumer.basic_consume("latency", timed)

        async def send(n: int) -> None:
            doc = stamped(n, plan.size)
            await pub.basic_publish(json.dumps(doc).encode(), routing_key="latency", properties=props)

        await paced(send, plan)
        await asyncio.wait_for(all_in.wait(), 120)
        result["latency p50 ms"], result["latency p99 ms"] = quantiles(latencies)
    finally:
        await connection.close()
    return result


# -- FastStream ----------------------------------------------------------------------------------------------------


async def faststream(url: str, plan: Plan) -> dict[str, float]:
    from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

    def queue(name: str) -> RabbitQueue:
        return RabbitQueue(name, queue_type=QueueType.QUORUM, durable=True)

    result: dict[str, float] = {}
    handled = 0
    done = asyncio.Event()
    consuming = asyncio.Event()
    latencies: list[float] = []
    all_in = asyncio.Event()
    broker = RabbitBroker(url, logger=None)

    @broker.subscriber(queue("bench"), channel=Channel(prefetch_count=1000))
    async def handle(body: dict[str, Any]) -> None:
        nonlocal handled
        await consuming.wait()
        handled += 1
        if handled == plan.count:
            done.set()

    @broker.subscriber(queue("latency"), channel=Channel(prefetch_count=1000))
    async def timed(body: dict[str, Any]) -> None:
        latencies.append(time.time() - body["t"])
        if len(latencies) >= plan.timed:
            all_in.set()

    try:
        await broker.start()
        await broker.declare_queue(queue("seq"))
        start = time.perf_counter()
        for n in range(plan.sequential):
            await broker.publish(payload(n, plan.size), queue="seq", persist=True)
        result["publish sequential"] = rate(plan.sequential, start)

        start = time.perf_counter()
        for i in range(0, plan.count, plan.batch):
            await asyncio.gather(
                *(
                    broker.publish(payload(n, plan.size), queue="bench", persist=True)
                    for n in range(i, min(i + plan.batch, plan.count))
                )
            )
        result["publish windowed"] = rate(plan.count, start)

        # its subscriber started with the broker and holds what it took (its prefetch) until let through
        start = time.perf_counter()
        consuming.set()
        await asyncio.wait_for(done.wait(), 900)
        result["consume+ack"] = rate(plan.count, start)

        async def send(n: int) -> None:
            doc = stamped(n, plan.size)
            await broker.publish(doc, queue="latency", persist=True)

        await paced(send, plan)
        await asyncio.wait_for(all_in.wait(), 120)
        result["latency p50 ms"], result["latency p99 ms"] = quantiles(latencies)
    finally:
        await broker.stop()
    return result
