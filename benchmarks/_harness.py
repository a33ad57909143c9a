"""What the messaging benchmarks share: the plan, payloads, pacing, the meshkit measurement, the table.

Every contender (meshkit, a raw driver, FastStream) is measured on the same :class:`Plan` and reports the same
:data:`COLUMNS`, so the rows of one table compare like with like:

- publish sequential: one awaited publish at a time, on a tenth of the messages;
- publish windowed: ``plan.batch`` publishes in flight at a time (meshkit: ``publish_batch`` of that size);
- consume+ack: the windowed messages, already stored, with a trivial handler (decode the JSON);
- latency p50/p99: ``plan.rate`` msgs/s for ``plan.seconds``, each carrying its send time, to a running consumer.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

COLUMNS = ("publish sequential", "publish windowed", "consume+ack", "latency p50 ms", "latency p99 ms")

#: One contender's measurement: a coroutine function run in its own event loop.
Runner = Callable[[], Coroutine[Any, Any, dict[str, float]]]


@dataclass(frozen=True)
class Plan:
    count: int = 100_000
    size: int = 64  # bytes of JSON per message
    batch: int = 500  # publishes in flight in the windowed run
    rate: int = 2000  # msgs/s in the latency run
    seconds: float = 2.0  # how long the latency run lasts
    poll: float = 0.05  # meshkit's poll_interval in the latency run (brokers that push or long-poll: larger)

    @property
    def sequential(self) -> int:
        return max(self.count // 10, 1)

    @property
    def timed(self) -> int:
        return int(self.rate * self.seconds)


def payload(n: int, size: int = 64) -> dict[str, Any]:
    """``{"n": n, "t": 0.0, "p": "xx..."}``: about ``size`` bytes of JSON; ``t`` carries a send time."""
    doc: dict[str, Any] = {"n": n, "t": 0.0, "p": ""}
    doc["p"] = "x" * max(size - len(json.dumps(doc)), 0)
    return doc


def stamped(n: int, size: int = 64) -> dict[str, Any]:
    doc = payload(n, size)
    doc["t"] = time.time()
    return doc


async def paced(send: Callable[[int], Awaitable[object]], plan: Plan) -> None:
    """Call ``send(n)`` ``plan.rate`` times a second for ``plan.seconds``."""
    start = time.perf_counter()
    for n in range(plan.timed):
        await send(n)
        ahead = start + (n + 1) / plan.rate - time.perf_counter()
        if ahead > 0:
            await asyncio.sleep(ahead)


def quantiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    q = statistics.quantiles(latencies, n=100)
    return q[49] * 1000, q[98] * 1000


def rate(count: int, start: float) -> float:
    return count / (time.perf_counter() - start)


async def meshkit(url: str, plan: Plan, **options: Any) -> dict[str, float]:
    """meshkit on ``url`` (any backend): the four measurements through the public API."""
    from meshkit.messaging import Message, SubscriptionOptions, connect

    result: dict[str, float] = {}
    async with connect(url, max_message_bytes=10 * plan.size + 1024, **options) as broker:
        for topic in ("bench", "bench.latency"):  # the groups exist before publishing (RabbitMQ keeps no log)
            await (await broker.subscribe(topic, _ignore, group="g")).aclose()
        start = time.perf_counter()
        for n in range(plan.sequential):
            await broker.publish("bench.seq", payload(n, plan.size))
        result["publish sequential"] = rate(plan.sequential, start)

        start = time.perf_counter()
        for i in range(0, plan.count, plan.batch):
            await broker.publish_batch(
                "bench", [payload(n, plan.size) for n in range(i, min(i + plan.batch, plan.count))]
            )
        result["publish windowed"] = rate(plan.count, start)

        handled = 0
        done = asyncio.Event()

        async def handle(message: Message) -> None:
            nonlocal handled
            handled += 1
            if handled == plan.count:
                done.set()

        start = time.perf_counter()
        await broker.subscribe("bench", handle, group="g", options=SubscriptionOptions(concurrency=256, prefetch=512))
        await asyncio.wait_for(done.wait(), 900)
        result["consume+ack"] = rate(plan.count, start)

        latencies: list[float] = []
        all_in = asyncio.Event()

        async def timed(message: Message) -> None:
            latencies.append(time.time() - message.data["t"])
            if len(latencies) >= plan.timed:
                all_in.set()

        options_latency = SubscriptionOptions(concurrency=64, prefetch=64, poll_interval=plan.poll)
        await broker.subscribe("bench.latency", timed, group="g", options=options_latency)
        await paced(lambda n: broker.publish("bench.latency", stamped(n, plan.size)), plan)
        await asyncio.wait_for(all_in.wait(), 120)
        result["latency p50 ms"], result["latency p99 ms"] = quantiles(latencies)
    return result


async def _ignore(message: object) -> None:
    return None


def table_head() -> str:
    return "| contender | " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * len(COLUMNS)


def table_row(name: str, r: dict[str, float]) -> str:
    cells = [f"{r[c]:,.0f}" if "ms" not in c else f"{r[c]:.2f}" for c in COLUMNS]
    return f"| {name} | " + " | ".join(cells) + " |"


def ratios(results: dict[str, dict[str, float]]) -> list[str]:
    """meshkit / each peer, on the throughput columns."""
    lines = []
    mine = results.get("meshkit")
    for peer, theirs in results.items():
        if mine is None or peer == "meshkit":
            continue
        parts = [f"{c} {mine[c] / theirs[c]:.2f}x" for c in COLUMNS[:3] if theirs.get(c)]
        lines.append(f"meshkit / {peer}: " + ", ".join(parts))
    return lines
