"""The data patterns beside the raw drivers, measured in the same run: the outbox, the event store and sagas.

    .venv/bin/python benchmarks/data.py [--backend sqlite,postgresql] [--rounds 5] [--count 1000]
                                        [--concurrency 8] [--broker memory] [--postgres URL]

For each backend (SQLite: a file in a temporary folder; PostgreSQL: a scratch database ``meshkit_bench_<random>``
made on the server of ``--postgres`` and dropped at the end), after a warm-up, ``--rounds`` rounds of every
measure below, meshkit and its peer interleaved (the order alternates by round), medians printed:

1. **outbox write**: one ``outbox.transaction()`` that inserts a business row and ``tx.publish``-es one message,
   ``--count`` of them one after another, then by ``--concurrency`` tasks, with the relay running (as it does in a
   service). Peer, "the dual write": the raw driver inserts the same row in its own transaction (one autocommit
   statement: ``sqlite3`` on one thread of its own, the same WAL / ``synchronous=NORMAL`` settings as meshkit's; or
   ``asyncpg`` from a pool of the same size), then ``broker.publish`` sends the message directly.
   **outbox end to end**: the same ``--count`` transactions, counted until ``outbox.flush()`` returns (every row
   relayed to the broker and deleted); the peer is the dual write again (its messages are on the broker when it
   returns). ``flush`` polls with a pause that grows to 0.1 s, so this figure can be up to ~0.1 s late per round.
   A diagnostic row: the business row alone in a ``db.transaction()`` (no outbox) against the raw INSERT, to
   tell the transaction's cost from the outbox's.
2. **event append**: ``EventStore.append`` of one event to a new stream with ``expected_version=0`` (sequential,
   then ``--concurrency`` tasks). Peer: one raw ``INSERT`` of the same row into a table of the same columns and
   keys (its position from a counter in Python). **event load**: ``EventStore.load`` of a 100-event stream; peer:
   the raw ``SELECT`` of the same columns from the raw table, ``json.loads`` of data and metadata per row.
3. **saga**: ``Sagas.run`` of a 3-step saga whose steps do nothing; peer: awaiting the three step functions
   directly. The difference is the cost of writing the saga log (a row per saga, a log row per step, and the
   ``SagaRecord`` read back at the end).

The broker is ``memory://`` (``--broker sqlite``: the SQLite broker, a file beside the database), shared by the
outbox and the dual write, a topic per measure: the memory broker's publish slows from ~80k/s to ~1k/s once a
topic holds more than 10,000 ids in its dedup window (each append then rebuilds its dict of seen ids), and one
topic for the whole run would measure that instead. Nothing is traced (no tracer is given).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg

from meshkit import messaging
from meshkit._core.database import Database, connect_database, to_numbered
from meshkit.eventsourcing import EventStore, NewEvent
from meshkit.messaging import Broker
from meshkit.outbox import Outbox
from meshkit.saga import Saga, SagaContext, Sagas, Step

Row = tuple[Any, ...]
Op = Callable[[int], Awaitable[object]]
T = TypeVar("T")

_ORDERS = "CREATE TABLE IF NOT EXISTS {name} (id TEXT PRIMARY KEY, total BIGINT NOT NULL, created DOUBLE PRECISION)"
#: The raw peer's events table: the columns and keys of meshkit_events.
_EVENTS = """CREATE TABLE IF NOT EXISTS bench_events (
    position BIGINT NOT NULL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    stream TEXT NOT NULL,
    version BIGINT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    schema_version BIGINT NOT NULL,
    recorded DOUBLE PRECISION NOT NULL,
    UNIQUE (stream, version)
)"""
_INSERT_EVENT = (
    "INSERT INTO bench_events (id, stream, version, position, type, data, metadata, schema_version, recorded)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_LOAD_EVENTS = (
    "SELECT id, stream, version, position, type, data, metadata, schema_version, recorded FROM bench_events"
    " WHERE stream = ? AND version > ? ORDER BY version"
)
LOADED = 100  # events in the stream that is loaded


# -- the raw drivers -------------------------------------------------------------------------------------------------


class Raw(Protocol):
    async def execute(self, sql: str, *params: Any) -> None: ...

    async def fetch(self, sql: str, *params: Any) -> list[Row]: ...

    async def aclose(self) -> None: ...


class RawSQLite:
    """``sqlite3`` as one would use it from asyncio: one connection, on one thread of its own, one hop per
    statement (autocommit: each statement is its own transaction). The pragmas are meshkit's."""

    def __init__(self, path: Path) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="raw-sqlite")
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def execute(self, sql: str, *params: Any) -> None:
        db = self._db
        await self._run(lambda: db.execute(sql, params))

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        db = self._db
        rows: list[Row] = await self._run(lambda: db.execute(sql, params).fetchall())
        return rows

    async def aclose(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown()


class RawPostgres:
    """``asyncpg`` from a pool of meshkit's default size (10); one statement, one round trip."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str) -> RawPostgres:
        return cls(await asyncpg.create_pool(dsn, min_size=1, max_size=10))

    async def execute(self, sql: str, *params: Any) -> None:
        await self._pool.execute(to_numbered(sql), *params)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        return [tuple(r) for r in await self._pool.fetch(to_numbered(sql), *params)]

    async def aclose(self) -> None:
        await self._pool.close()


# -- one backend's contenders ----------------------------------------------------------------------------------------


async def _noop(ctx: SagaContext) -> None:
    return None


async def _noop_2(ctx: SagaContext) -> None:
    return None


async def _noop_3(ctx: SagaContext) -> None:
    return None


SAGA = Saga("bench", [Step("one", _noop), Step("two", _noop_2), Step("three", _noop_3)])


@dataclass
class Contenders:
    """meshkit's patterns and the raw peer on one database; each measure is a pair of ``op(i)`` to time."""

    db: Database
    raw: Raw
    broker: Broker
    outbox: Outbox
    store: EventStore
    sagas: Sagas
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    position: int = 0  # the raw events' global position
    loaded: str = ""  # the 100-event stream

    async def prepare(self) -> None:
        ddl = ";\n".join(_ORDERS.format(name=name) for name in ("bench_orders_meshkit", "bench_orders_raw"))
        await self.db.migrate({"sqlite": ddl, "postgresql": ddl})
        await self.raw.execute(_ORDERS.format(name="bench_orders_raw"))
        await self.raw.execute(_EVENTS)
        await self.store.migrate()
        # the stream that is loaded: 100 events, in meshkit's store and in the raw table alike
        self.loaded = f"loaded-{self.tag}"
        events = [NewEvent("Deposited", {"amount": n, "currency": "EUR"}, {"by": "bench"}) for n in range(LOADED)]
        await self.store.append(self.loaded, events, expected_version=0)
        for n, event in enumerate(events, 1):
            await self._raw_event(self.loaded, n, event)

    # outbox
    async def outbox_write(self, i: int) -> None:
        order = f"o-{self.tag}-{i}"
        async with self.outbox.transaction() as tx:
            await tx.execute(
                "INSERT INTO bench_orders_meshkit (id, total, created) VALUES (?, ?, ?)", order, i, time.time()
            )
            tx.publish(f"order.created.{self.tag}", {"id": order, "total": i}, key=order)

    async def dual_write(self, i: int) -> None:
        order = f"d-{self.tag}-{i}"
        await self.raw.execute(
            "INSERT INTO bench_orders_raw (id, total, created) VALUES (?, ?, ?)", order, i, time.time()
        )
        await self.broker.publish(f"order.created.{self.tag}", {"id": order, "total": i}, key=order)

    async def row_only(self, i: int) -> None:
        order = f"r-{self.tag}-{i}"
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO bench_orders_meshkit (id, total, created) VALUES (?, ?, ?)", order, i, time.time()
            )

    async def raw_row(self, i: int) -> None:
        order = f"q-{self.tag}-{i}"
        await self.raw.execute(
            "INSERT INTO bench_orders_raw (id, total, created) VALUES (?, ?, ?)", order, i, time.time()
        )

    # event store
    async def append(self, i: int) -> None:
        stream = f"account-{self.tag}-{i}"
        await self.store.append(stream, [NewEvent("Opened", {"owner": "ada", "n": i})], expected_version=0)

    async def raw_append(self, i: int) -> None:
        await self._raw_event(f"account-{self.tag}-{i}", 1, NewEvent("Opened", {"owner": "ada", "n": i}))

    async def _raw_event(self, stream: str, version: int, event: NewEvent) -> None:
        self.position += 1
        await self.raw.execute(
            _INSERT_EVENT,
            str(uuid.uuid4()),
            stream,
            version,
            self.position,
            event.type,
            json.dumps(event.data, separators=(",", ":")),
            json.dumps(event.metadata, separators=(",", ":")),
            event.schema_version,
            time.time(),
        )

    async def load(self, i: int) -> None:
        events = await self.store.load(self.loaded)
        assert len(events) == LOADED

    async def raw_load(self, i: int) -> None:
        rows = await self.raw.fetch(_LOAD_EVENTS, self.loaded, 0)
        events = [(*row[:5], json.loads(row[5]), json.loads(row[6]), *row[7:]) for row in rows]
        assert len(events) == LOADED

    # sagas
    async def saga(self, i: int) -> None:
        await self.sagas.run(SAGA, {"order": i})

    async def direct(self, i: int) -> None:
        ctx = SagaContext(f"s-{i}", "bench", {"order": i})
        await _noop(ctx)
        await _noop_2(ctx)
        await _noop_3(ctx)

    def renamed(self) -> None:
        """A new tag: the next ops write new keys."""
        self.tag = secrets.token_hex(3)


@asynccontextmanager
async def contenders(backend: str, folder: Path, args: argparse.Namespace) -> AsyncIterator[Contenders]:
    async with AsyncExitStack() as stack:
        if backend == "sqlite":
            db = await connect_database(f"sqlite:///{folder}/meshkit.db")
            stack.push_async_callback(db.aclose)
            raw: Raw = RawSQLite(folder / "raw.db")
        else:
            name = f"meshkit_bench_{secrets.token_hex(4)}"
            admin = await asyncpg.connect(args.postgres)
            await admin.execute(f'CREATE DATABASE "{name}"')
            await admin.close()

            async def drop() -> None:
                admin = await asyncpg.connect(args.postgres)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await admin.close()

            stack.push_async_callback(drop)
            dsn = args.postgres.rsplit("/", 1)[0] + f"/{name}"
            print(f"(scratch database {name})", file=sys.stderr)
            db = await connect_database(dsn)
            stack.push_async_callback(db.aclose)
            raw = await RawPostgres.open(dsn)
        stack.push_async_callback(raw.aclose)
        broker_url = "memory://" if args.broker == "memory" else f"sqlite:///{folder}/broker.db"
        broker = await stack.enter_async_context(messaging.connect(broker_url))
        outbox = Outbox(db, broker, source="bench")
        await outbox.start()
        stack.push_async_callback(outbox.aclose)
        sagas = Sagas(db, owner="bench")
        sagas.register(SAGA)
        await sagas.start()
        stack.push_async_callback(sagas.aclose)
        made = Contenders(db, raw, broker, outbox, EventStore(db), sagas)
        await made.prepare()
        yield made


# -- measuring -------------------------------------------------------------------------------------------------------


async def spread(count: int, concurrency: int, op: Op) -> float:
    """Seconds to run ``op(0) ... op(count - 1)`` by ``concurrency`` tasks taking the next number as they finish."""
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            await op(i)

    start = time.perf_counter()
    if concurrency == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def pair(
    meshkit: Callable[[], Awaitable[T]], peer: Callable[[], Awaitable[float]], flip: bool
) -> tuple[T, float]:
    """Both measured, the peer first when ``flip``."""
    if flip:
        p = await peer()
        return await meshkit(), p
    m = await meshkit()
    return m, await peer()


@dataclass
class Measure:
    """One row of the table: rates of meshkit and of its peer, one per round."""

    what: str
    peer: str
    meshkit: list[float] = field(default_factory=list)
    peers: list[float] = field(default_factory=list)


async def one_round(c: Contenders, args: argparse.Namespace, table: dict[str, Measure], flip: bool) -> None:
    n: int = args.count
    conc: int = args.concurrency
    saga_n = max(1, n // 4)
    load_n = max(1, n // 2)

    def add(key: str, what: str, peer: str, meshkit: float, peer_rate: float) -> None:
        row = table.setdefault(key, Measure(what, peer))
        row.meshkit.append(meshkit)
        row.peers.append(peer_rate)

    async def outbox(tasks: int) -> tuple[float, float]:
        c.renamed()
        start = time.perf_counter()
        written = await spread(n, tasks, c.outbox_write)
        await c.outbox.flush(timeout=120)
        return n / written, n / (time.perf_counter() - start)

    async def dual(tasks: int) -> float:
        c.renamed()
        return n / await spread(n, tasks, c.dual_write)

    async def append(tasks: int) -> float:
        c.renamed()
        return n / await spread(n, tasks, c.append)

    async def raw_append(tasks: int) -> float:
        c.renamed()
        return n / await spread(n, tasks, c.raw_append)

    for label, tasks in (("sequential", 1), (f"{conc} tasks", conc)):
        (write, end_to_end), peer = await pair(partial(outbox, tasks), partial(dual, tasks), flip)
        add(f"write {label}", f"outbox write (row + publish), {label}", "dual write", write, peer)
        add(f"e2e {label}", f"outbox end to end (relayed), {label}", "dual write", end_to_end, peer)

    async def row_only() -> float:
        c.renamed()
        return n / await spread(n, 1, c.row_only)

    async def raw_row() -> float:
        c.renamed()
        return n / await spread(n, 1, c.raw_row)

    m, p = await pair(row_only, raw_row, flip)
    add("row", "(the row alone: db.transaction(), sequential)", "raw INSERT", m, p)

    for label, tasks in (("sequential", 1), (f"{conc} tasks", conc)):
        m, p = await pair(partial(append, tasks), partial(raw_append, tasks), flip)
        add(f"append {label}", f"event append, new stream, {label}", "raw INSERT", m, p)

    async def load() -> float:
        return load_n / await spread(load_n, 1, c.load)

    async def raw_load() -> float:
        return load_n / await spread(load_n, 1, c.raw_load)

    m, p = await pair(load, raw_load, flip)
    add("load", f"event load, {LOADED}-event stream", "raw SELECT + json", m, p)

    async def saga() -> float:
        return saga_n / await spread(saga_n, 1, c.saga)

    async def direct() -> float:
        calls = saga_n * 100
        return calls / await spread(calls, 1, c.direct)

    m, p = await pair(saga, direct, flip)
    add("saga", "saga, 3 no-op steps", "3 direct calls", m, p)


async def warm_up(c: Contenders, args: argparse.Namespace) -> None:
    n = max(20, args.count // 10)
    for tasks in (1, args.concurrency):
        c.renamed()
        for op in (c.outbox_write, c.dual_write, c.append, c.raw_append):
            await spread(n, tasks, op)
        await c.outbox.flush(timeout=120)
    for op in (c.load, c.raw_load, c.saga, c.direct):
        await spread(max(5, n // 4), 1, op)


async def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Measure]:
    table: dict[str, Measure] = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        async with contenders(backend, Path(folder), args) as c:
            await warm_up(c, args)
            for r in range(args.rounds):
                await one_round(c, args, table, flip=r % 2 == 1)
    return table


def report(backend: str, table: dict[str, Measure], args: argparse.Namespace) -> None:
    print(f"\n## {backend}: {args.count} ops per measure, medians of {args.rounds} rounds\n")
    print("| measure | meshkit /s | peer | peer /s | meshkit / peer | added µs per op |")
    print("|---|---:|---|---:|---:|---:|")
    for row in table.values():
        m, p = statistics.median(row.meshkit), statistics.median(row.peers)
        added = 1e6 / m - 1e6 / p
        ratio = f"{m / p:.2f}x" if m / p >= 0.01 else f"{m / p:.5f}x"
        print(f"| {row.what} | {m:,.0f} | {row.peer} | {p:,.0f} | {ratio} | {added:,.0f} |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="sqlite,postgresql", help="sqlite, postgresql or both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=1000, help="writes per measure (loads: half, sagas: a quarter)")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks in the concurrent measures")
    parser.add_argument("--broker", choices=("memory", "sqlite"), default="memory")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("MESHKIT_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a database on the server where the scratch database is made (and dropped)",
    )
    args = parser.parse_args()
    backends = args.backend.split(",")
    unknown = [b for b in backends if b not in ("sqlite", "postgresql")]
    if unknown or args.rounds < 1 or args.count < 1 or args.concurrency < 1:
        parser.error(f"unknown backend {unknown}" if unknown else "--rounds, --count and --concurrency must be >= 1")
    load = os.getloadavg()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, sqlite {sqlite3.sqlite_version},"
        f" asyncpg {asyncpg.__version__}, broker {args.broker}://, concurrency {args.concurrency},"
        f" load average at start {load[0]:.2f}"
    )
    started = time.perf_counter()
    for backend in backends:
        report(backend, asyncio.run(run_backend(backend, args)), args)
    print(
        f"\nPeers: dual write = raw INSERT (autocommit) then broker.publish; raw INSERT = one autocommit INSERT into"
        f" a table like meshkit_events; raw SELECT + json = the stream's rows and json.loads of data and metadata;"
        f" 3 direct calls = the saga's three steps awaited in a row. Sagas: {max(1, args.count // 4)} per round;"
        f" loads: {max(1, args.count // 2)}. Took {time.perf_counter() - started:.0f} s;"
        f" load average at end {os.getloadavg()[0]:.2f}."
    )


if __name__ == "__main__":
    main()
