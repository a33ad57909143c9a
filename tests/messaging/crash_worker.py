"""A producer or consumer process for the SQLite crash test (run as ``python -m tests.messaging.crash_worker``).

The consumer appends each handled message's id to its effect log (flushed before the handler returns, so it is
on disk before the ack) and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from meshkit.messaging import Message, SubscriptionOptions, connect
from meshkit.resilience import Constant, Retry


async def produce(db: str, count: int, batch: int) -> None:
    async with connect(f"sqlite:///{db}") as broker:
        for start in range(0, count, batch):
            await broker.publish_batch("crash", [{"n": n} for n in range(start, min(start + batch, count))])
            await asyncio.sleep(0.005)  # a steady stream, so consumers are killed mid-flow


async def consume(db: str, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def handle(message: Message) -> None:
        os.write(fd, f"{message.data['n']}\n".encode())

    options = SubscriptionOptions(concurrency=32, prefetch=64, retry=Retry(attempts=50, backoff=Constant(0.05)))
    async with connect(f"sqlite:///{db}", visibility_timeout=1.0) as broker:
        await broker.subscribe("crash", handle, group="workers", options=options)
        await asyncio.Event().wait()  # until SIGKILL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["produce", "consume"])
    parser.add_argument("--db", required=True)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--log")
    args = parser.parse_args()
    if args.role == "produce":
        asyncio.run(produce(args.db, args.count, args.batch))
    else:
        asyncio.run(consume(args.db, args.log))


if __name__ == "__main__":
    main()
