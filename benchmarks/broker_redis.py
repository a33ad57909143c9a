"""Redis Streams contenders for ``benchmarks/messaging.py --broker redis``: raw redis-py at its best and FastStream.

Every contender uses keys under one run prefix (deleted at the end). Windowed publishing: raw = pipelines of
``plan.batch`` XADDs (``transaction=False``); meshkit = ``publish_batch`` of the same size; FastStream has no batch
publish to streams: one awaited publish at a time. Consuming: raw = ``XREADGROUP COUNT 500`` + one ``XACK`` of the
batch's ids, decoding each body; meshkit = ``subscribe`` (concurrency 256, prefetch 512); FastStream = a stream
subscriber (``StreamSub(max_records=500)``). redis-py parses replies with hiredis when it is installed (the dev
environment has it), which is the raw driver at its best.
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

TITLE = "Redis Streams"
URL = "redis://127.0.0.1:6379/0"
PLAN: dict[str, Any] = {}


@contextlib.contextmanager
def contenders(url: str, plan: Plan) -> Iterator[dict[str, Runner]]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    try:
        yield {
            "raw": lambda: raw(url, prefix, plan),
            "meshkit": lambda: meshkit(f"{url}?prefix={prefix}mk:", plan),
            "faststream": lambda: faststream(url, prefix, plan),
        }
    finally:
        asyncio.run(purge(url, prefix))


async def purge(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.unlink(*keys[i : i + 1000])
    finally:
        await client.aclose()


# -- raw redis-py --------------------------------------------------------------------------------------------------


async def raw(url: str, prefix: str, plan: Plan) -> dict[str, float]:
    import redis.asyncio as aioredis

    result: dict[str, float] = {}
    client = aioredis.Redis.from_url(url)
    stream = f"{prefix}raw"
    try:
        start = time.perf_counter()
        for n in range(plan.sequential):
            await client.xadd(stream + ".seq", {"data": json.dumps(payload(n, plan.size))})
        result["publish sequential"] = rate(plan.sequential, start)

        start = time.perf_counter()
        for i in range(0, plan.count, plan.batch):
            async with client.pipeline(transaction=False) as pipe:
                for n in range(i, min(i + plan.batch, plan.count)):
                    pipe.xadd(stream, {"data": json.dumps(payload(n, plan.size))})
                await pipe.execute()
        result["publish windowed"] = rate(plan.count, start)

        await client.xgroup_create(stream, "g", id="0")
        handled = 0
        start = time.perf_counter()
        while handled < plan.count:
            got: Any = await client.xreadgroup("g", "c", {stream: ">"}, count=500)
            ids = []
            for _, entries in got:
                for entry_id, fields in entries:
                    json.loads(fields[b"data"])
                    ids.append(entry_id)
            handled += len(ids)
            if ids:
                await client.xack(stream, "g", *ids)
        result["consume+ack"] = rate(plan.count, start)

        latencies: list[float] = []
        await client.xgroup_create(stream + ".lat", "g", id="$", mkstream=True)

        async def receive() -> None:
            reader = aioredis.Redis.from_url(url)
            try:
                while len(latencies) < plan.timed:
                    got: Any = await reader.xreadgroup("g", "c", {stream + ".lat": ">"}, count=100, block=100)
                    ids = []
                    for _, entries in got or []:
                        for entry_id, fields in entries:
                            latencies.append(time.time() - json.loads(fields[b"data"])["t"])
                            ids.append(entry_id)
                    if ids:
                        await reader.xack(stream + ".lat", "g", *ids)
            finally:
                await reader.aclose()

        receiver = asyncio.ensure_future(receive())
        await paced(lambda n: client.xadd(stream + ".lat", {"data": json.dumps(stamped(n, plan.size))}), plan)
        await asyncio.wait_for(receiver, 120)
        result["latency p50 ms"], result["latency p99 ms"] = quantiles(latencies)
    finally:
        await client.aclose()
    return result


# -- FastStream ----------------------------------------------------------------------------------------------------


async def faststream(url: str, prefix: str, plan: Plan) -> dict[str, float]:
    from faststream.redis import RedisBroker, StreamSub

    result: dict[str, float] = {}
    broker = RedisBroker(url, logger=None)  # type: ignore[arg-type]  # None turns its logging off
    handled = 0
    done = asyncio.Event()
    latencies: list[float] = []
    all_in = asyncio.Event()
    stream = f"{prefix}fs"

    @broker.subscriber(stream=StreamSub(stream, group="g", consumer="c", batch=False, max_records=500, last_id="0"))
    async def handle(body: dict[str, Any]) -> None:
        nonlocal handled
        handled += 1
        if handled == plan.count:
            done.set()

    @broker.subscriber(stream=StreamSub(stream + ".lat", group="g", consumer="c", max_records=100))
    async def timed(body: dict[str, Any]) -> None:
        latencies.append(time.time() - body["t"])
        if len(latencies) >= plan.timed:
            all_in.set()

    await broker.connect()
    try:
        start = time.perf_counter()
        for n in range(plan.sequential):
            await broker.publish(payload(n, plan.size), stream=stream + ".seq")
        result["publish sequential"] = rate(plan.sequential, start)

        start = time.perf_counter()
        for n in range(plan.count):  # no batch publish to streams: one at a time
            await broker.publish(payload(n, plan.size), stream=stream)
        result["publish windowed"] = rate(plan.count, start)

        start = time.perf_counter()
        await broker.start()
        await asyncio.wait_for(done.wait(), 900)
        result["consume+ack"] = rate(plan.count, start)

        await paced(lambda n: broker.publish(stamped(n, plan.size), stream=stream + ".lat"), plan)
        await asyncio.wait_for(all_in.wait(), 120)
        result["latency p50 ms"], result["latency p99 ms"] = quantiles(latencies)
    finally:
        await broker.stop()
    return result
