"""NATS JetStream contenders for ``benchmarks/messaging.py --broker nats``: raw nats-py at its best and FastStream.

Each contender gets its own stream (deleted afterwards). Windowed publishing: raw = ``publish_async`` with up to
4,000 PubAcks outstanding; meshkit = ``publish_batch`` of 1,000 (its window of outstanding PubAcks); FastStream
has no batch publish for NATS: 500 concurrent awaited publishes at a time. Consuming: raw = ``fetch`` of 500 +
``ack()`` each; meshkit = ``subscribe`` (concurrency 256, prefetch 512); FastStream = a pull subscriber
(``PullSub(batch_size=500)``; its default of one worker: ``max_workers=256`` measured 4x slower).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from _harness import Plan, Runner, meshkit, paced, payload, quantiles, rate, stamped

TITLE = "NATS JetStream"
URL = "nats://127.0.0.1:4222"
PLAN: dict[str, Any] = {"batch": 1000, "poll": 0.5}
FASTSTREAM_WINDOW = 500  # concurrent awaited publishes: with 1,000 its requests time out on a loaded machine


@contextlib.contextmanager
def contenders(url: str, plan: Plan) -> Iterator[dict[str, Runner]]:
    async def mine() -> dict[str, float]:
        prefix = f"bench-mk-{uuid.uuid4().hex[:8]}"
        try:
            return await meshkit(f"{url}?prefix={prefix}", plan)
        finally:
            from meshkit.messaging.nats import NatsBackend

            await drop_stream(url, NatsBackend(url, prefix=prefix).stream)

    yield {"raw": lambda: raw(url, plan), "meshkit": mine, "faststream": lambda: faststream(url, plan)}


async def drop_stream(url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


# -- raw nats-py ---------------------------------------------------------------------------------------------------


async def raw(url: str, plan: Plan) -> dict[str, float]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

    prefix = f"bench-raw-{uuid.uuid4().hex[:8]}"
    stream = prefix.upper().replace("-", "_")
    result: dict[str, float] = {}
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"], duplicate_window=120))
        start = time.perf_counter()
        for n in range(plan.sequential):
            await js.publish(f"{prefix}.seq", json.dumps(payload(n, plan.size)).encode())
        result["publish sequential"] = rate(plan.sequential, start)

        start = time.perf_counter()
        for n in range(plan.count):
            await js.publish_async(f"{prefix}.bench", json.dumps(payload(n, plan.size)).encode())
        await js.publish_async_completed()
        result["publish windowed"] = rate(plan.count, start)

        config = ConsumerConfig(durable_name="g", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000)
        sub = await js.pull_subscribe(f"{prefix}.bench", durable="g", stream=stream, config=config)
        handled = 0
        start = time.perf_counter()
        while handled < plan.count:
            try:
                msgs = await sub.fetch(500, timeout=5)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                json.loads(msg.data)
                await msg.ack()
                handled += 1
        result["consume+ack"] = rate(plan.count, start)

        latencies: list[float] = []
        lat = await js.pull_subscribe(f"{prefix}.latency", durable="lat", stream=stream)

        async def receive() -> None:
            while len(latencies) < plan.timed:
                try:
                    msgs = await lat.fetch(100, timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    latencies.append(time.time() - json.loads(msg.data)["t"])
                    await msg.ack()

        receiver = asyncio.ensure_future(receive())

        async def send(n: int) -> None:
            await js.publish(f"{prefix}.latency", json.dumps(stamped(n, plan.size)).encode())

        await paced(send, plan)
        await asyncio.wait_for(receiver, 120)
        result["latency p50 ms"], result["latency p99 ms"] = quantiles(latencies)
        await js.delete_stream(stream)
    finally:
        await nc.close()
    return result


# -- FastStream ----------------------------------------------------------------------------------------------------


async def faststream(url: str, plan: Plan) -> dict[str, float]:
    from faststream.nats import JStream, NatsBroker, PullSub

    prefix = f"bench-fs-{uuid.uuid4().hex[:8]}"
    stream = JStream(name=prefix.upper().replace("-", "_"), subjects=[f"{prefix}.>"])
    result: dict[str, float] = {}
    handled = 0
    done = asyncio.Event()
    latencies: list[float] = []
    all_in = asyncio.Event()
    consuming = asyncio.Event()

    broker = NatsBroker(url, logger=None)

    @broker.subscriber(f"{prefix}.bench", stream=stream, durable="g", pull_sub=PullSub(batch_size=500, timeout=1.0))
    async def handle(body: dict[str, Any]) -> None:
        nonlocal handled
        await consuming.wait()
        handled += 1
        if handled == plan.count:
            done.set()

    @broker.subscriber(f"{prefix}.latency", stream=stream, durable="lat", pull_sub=PullSub(batch_size=100, timeout=0.5))
    async def timed(body: dict[str, Any]) -> None:
        latencies.append(time.time() - body["t"])
        if len(latencies) >= plan.timed:
            all_in.set()

    try:
        await broker.start()
        start = time.perf_counter()
        for n in range(plan.sequential):
            await broker.publish(payload(n, plan.size), f"{prefix}.seq", stream=stream.name)
        result["publish sequential"] = rate(plan.sequential, start)

        start = time.perf_counter()
        for i in range(0, plan.count, FASTSTREAM_WINDOW):
            await asyncio.gather(
                *(
                    broker.publish(payload(n, plan.size), f"{prefix}.bench", stream=stream.name)
                    for n in range(i, min(i + FASTSTREAM_WINDOW, plan.count))
                )
            )
        result["publish windowed"] = rate(plan.count, start)

        # its subscriber started with the broker and has been pulling meanwhile: count from the moment the
        # handlers are let through (they hold the messages they took until then)
        start = time.perf_counter()
        consuming.set()
        await asyncio.wait_for(done.wait(), 900)
        result["consume+ack"] = rate(plan.count, start)

        async def send(n: int) -> None:
            await broker.publish(stamped(n, plan.size), f"{prefix}.latency", stream=stream.name)

        await paced(send, plan)
        await asyncio.wait_for(all_in.wait(), 120)
        result["latency p50 ms"], result["latency p99 ms"] = quantiles(latencies)
    finally:
        await broker.stop()
        await drop_stream(url, stream.name)
    return result
