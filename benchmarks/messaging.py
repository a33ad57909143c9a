"""Messaging throughput and latency: meshkit beside its peers, one table per setup.

    .venv/bin/python benchmarks/messaging.py [--count 100000] [--e2e-count 50000] [--skip-inprocess]
    .venv/bin/python benchmarks/messaging.py --broker redis,nats,rabbitmq,kafka [--count 100000] [--only ...]

Embedded (the default), part 1, in one process, for memory:// and sqlite:// and 64 B / 4 KiB payloads: publish
throughput (windowed: batches of 500; sequential: one awaited publish at a time, on a tenth of the messages),
consume+ack throughput with a trivial handler, and end-to-end latency p50/p99 at a fixed moderate rate (2,000
msgs/s for 2 s). Part 2, the SQLite setup of issue 4: ``--e2e-count`` 64 B messages through one SQLite file, 1
producer process and 2 consumer processes, for meshkit, litequeue (``put`` / ``get`` + ``done``) and
persist-queue's ``SQLiteAckQueue`` (``put`` / ``get`` + ``ack``; not safe across processes, so its duplicates are
counted). End-to-end rate = messages / (last message handled - producer ready to publish), the producer's
interpreter start and imports excluded (they are not throughput; the consumers' are excluded the same way); the
rate from the producer's spawn is printed beside it. Also: duplicates, lost, and each
consumer's share.

``--broker NAME``: the same measurements (``_harness.py`` says exactly what each column is) on a real broker, for
the raw driver at its best, meshkit and FastStream, in one run; ``broker_<name>.py`` holds the peers and what is
particular to that broker. The URL defaults to this machine's server (``--url`` or ``MESHKIT_<NAME>_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness

HERE = Path(__file__).resolve()


# -- part 2: processes on one SQLite file --------------------------------------------------------------------------


def produce(kind: str, db: str, count: int, stamp: str | None = None) -> None:
    """Publish `count` messages; `stamp` gets the time the producer is ready to publish (its imports done)."""

    def started() -> None:
        if stamp:
            Path(stamp).write_text(json.dumps(time.time()))

    if kind == "meshkit":
        from meshkit.messaging import connect

        async def run() -> None:
            started()
            async with connect(f"sqlite:///{db}") as broker:
                for i in range(0, count, 500):
                    await broker.publish_batch("e2e", [{"n": n} for n in range(i, min(i + 500, count))])

        asyncio.run(run())
    elif kind == "litequeue":
        from litequeue import LiteQueue

        started()
        q = LiteQueue(db)
        for n in range(count):
            q.put(json.dumps({"n": n}))
    else:
        from persistqueue import SQLiteAckQueue

        started()
        q = SQLiteAckQueue(db, multithreading=True, auto_commit=True)
        for n in range(count):
            q.put({"n": n})


def consume(kind: str, db: str, status: str) -> None:
    seen: list[int] = []
    last = [0.0]
    stop = [False]

    def report() -> None:
        Path(status).write_text(json.dumps({"count": len(seen), "last": last[0], "seen": seen if stop[0] else []}))

    def on_term(*_: Any) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_term)
    report()  # "I am running"
    next_report = time.time() + 0.1
    if kind == "meshkit":
        from meshkit.messaging import Message, SubscriptionOptions, connect

        async def run() -> None:
            nonlocal next_report

            async def handle(message: Message) -> None:
                seen.append(message.data["n"])
                last[0] = time.time()

            async with connect(f"sqlite:///{db}") as broker:
                options = SubscriptionOptions(concurrency=256, prefetch=512, poll_interval=0.05)
                await broker.subscribe("e2e", handle, group="workers", options=options)
                while not stop[0]:
                    await asyncio.sleep(0.1)
                    report()

        asyncio.run(run())
    else:
        if kind == "litequeue":
            from litequeue import LiteQueue

            lq = LiteQueue(db)

            def take() -> int | None:
                message = lq.pop()
                if message is None:
                    return None
                lq.done(message.message_id)
                return int(json.loads(message.data)["n"])
        else:
            from persistqueue import SQLiteAckQueue
            from persistqueue.exceptions import Empty

            pq = SQLiteAckQueue(db, multithreading=True, auto_commit=True)

            def take() -> int | None:
                try:
                    item = pq.get(block=False)
                except Empty:
                    return None
                pq.ack(item)
                return int(item["n"])

        while not stop[0]:
            n = take()
            if n is None:
                time.sleep(0.001)
            else:
                seen.append(n)
                last[0] = time.time()
            if time.time() > next_report:
                report()
                next_report = time.time() + 0.1
    stop[0] = True
    report()


def end_to_end(kind: str, count: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    db = str(folder / "queue.db")
    if kind != "meshkit":  # create the queue's tables before anyone races to
        produce(kind, db, 0)
    statuses = [str(folder / f"consumer-{i}.json") for i in range(2)]
    consumers = [subprocess.Popen([sys.executable, str(HERE), "--worker", "consume", kind, db, s]) for s in statuses]
    ready = time.time() + 120  # the clock starts once both consumers run (imports are not part of the measure)
    while not all(Path(s).exists() for s in statuses) and time.time() < ready:
        time.sleep(0.01)
    spawned = time.time()
    stamp = str(folder / "producer-start.json")
    producer = subprocess.Popen([sys.executable, str(HERE), "--worker", "produce", kind, db, str(count), stamp])
    # stop when the producer is done, at least `count` deliveries were reported, and nothing new came for 1 s
    # (deliveries, not unique messages: a queue that duplicates must not be stopped before it drains)
    deadline = time.time() + 600
    last_total, quiet_since = -1, time.time()
    while time.time() < deadline:
        total = 0
        for s in statuses:
            try:
                total += json.loads(Path(s).read_text())["count"]
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        if total != last_total:
            last_total, quiet_since = total, time.time()
        if total >= count and producer.poll() is not None and time.time() - quiet_since > 1.0:
            break
        time.sleep(0.05)
    producer.wait()
    for c in consumers:
        c.send_signal(signal.SIGTERM)
    for c in consumers:
        c.wait(timeout=60)
    reports = [json.loads(Path(s).read_text()) for s in statuses]
    everything = [n for r in reports for n in r["seen"]]
    last = max(r["last"] for r in reports)
    start = json.loads(Path(stamp).read_text())
    unique = set(everything)
    return {
        "msgs/s": len(unique) / (last - start) if last > start else 0.0,
        "with start-up": len(unique) / (last - spawned) if last > spawned else 0.0,
        "duplicates": len(everything) - len(unique),
        "lost": count - len(unique),
        "shares": [len(r["seen"]) for r in reports],
    }


BROKERS = ("redis", "nats", "rabbitmq", "kafka")


def on_broker(name: str, url: str | None, count: int, only: list[str]) -> None:
    """One table: the raw driver, meshkit and FastStream on one broker, then meshkit's ratios to each."""
    module: Any = importlib.import_module(f"broker_{name}")
    plan = _harness.Plan(count=count, **module.PLAN)
    url = url or os.environ.get(f"MESHKIT_{name.upper()}_URL", module.URL)
    print(f"\n## {module.TITLE}: {count:,} x {plan.size} B ({url})\n")
    print(_harness.table_head())
    results: dict[str, dict[str, float]] = {}
    with module.contenders(url, plan) as contenders:
        for contender in only:
            results[contender] = asyncio.run(contenders[contender]())
            print(_harness.table_row(contender, results[contender]), flush=True)
    print()
    for line in _harness.ratios(results):
        print(line)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        role, kind, *rest = sys.argv[2:]
        if role == "produce":
            produce(kind, rest[0], int(rest[1]), rest[2])
        else:
            consume(kind, rest[0], rest[1])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--e2e-count", type=int, default=50_000)
    parser.add_argument("--skip-inprocess", action="store_true")
    parser.add_argument("--queues", default="meshkit,litequeue,persist-queue", help="which queues run end to end")
    parser.add_argument("--broker", help=f"compare on real brokers instead: any of {','.join(BROKERS)}")
    parser.add_argument("--url", help="the broker's URL (with one --broker)")
    parser.add_argument("--only", default="raw,meshkit,faststream", help="which contenders run on a broker")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores", file=sys.stderr)
    if args.broker:
        names = args.broker.split(",")
        unknown = [n for n in names if n not in BROKERS]
        if unknown or (args.url and len(names) > 1):
            parser.error(f"unknown broker {unknown}" if unknown else "--url goes with one --broker")
        for name in names:
            on_broker(name, args.url, args.count, args.only.split(","))
        return

    if not args.skip_inprocess:
        print(f"\n## In one process: {args.count} messages\n")
        print(_harness.table_head())
        for backend in ("memory", "sqlite"):
            for size in (64, 4096):
                folder = tempfile.mkdtemp(prefix="bench-inproc-")
                url = "memory://" if backend == "memory" else f"sqlite:///{folder}/b.db"
                r = asyncio.run(_harness.meshkit(url, _harness.Plan(count=args.count, size=size)))
                print(_harness.table_row(f"{backend}, {size} B", r), flush=True)

    print(f"\n## One SQLite file, 1 producer + 2 consumer processes: {args.e2e_count} x 64 B\n")
    print("| queue | end-to-end msgs/s | with producer start-up | duplicates | lost | per consumer |")
    print("|---|---:|---:|---:|---:|---|")
    results = {}
    for kind in args.queues.split(","):
        r = results[kind] = end_to_end(kind, args.e2e_count)
        print(
            f"| {kind} | {r['msgs/s']:,.0f} | {r['with start-up']:,.0f} | {r['duplicates']} | {r['lost']}"
            f" | {r['shares']} |",
            flush=True,
        )
    for peer in ("litequeue", "persist-queue"):
        if "meshkit" in results and results.get(peer, {}).get("msgs/s"):
            print(f"\nmeshkit / {peer}: {results['meshkit']['msgs/s'] / results[peer]['msgs/s']:.1f}x")


if __name__ == "__main__":
    main()
