"""``sqlite:///path/to/file.db``: the embedded, durable default. Several processes on one host share one file.

Layout (docs/messaging.md has it for plain readers)::

    messages(seq INTEGER PRIMARY KEY, topic, id, key, created, source, type, time, datacontenttype, subject,
             extensions JSON, data BLOB)                       the log of every topic
    groups(topic, grp, cursor)                                 the last seq each group has taken from the log
    deliveries(topic, grp, seq, key, attempts, leased, due, owner)
                                                               what a group has taken and not acked yet
    dedup(topic, id, at)                                       ids seen within the dedup window

How members of a group share work safely across processes: a fetch is one short write transaction that moves new
log rows into ``deliveries`` (advancing the group's cursor), returns expired leases to the pool, and claims up to
``limit`` available rows with ``UPDATE … RETURNING`` (setting a lease of ``visibility_timeout`` seconds). A row is
claimable only if it is the lowest ``seq`` of its key in the group (per-key order). Ack deletes the rows; nack
clears the lease and sets when the row is due again. A consumer killed with SIGKILL holds leases that expire, so
its messages are delivered again. WAL mode, ``synchronous=NORMAL``, a busy timeout, and batches of hundreds of
rows per transaction keep it fast.

Every database call runs on one thread the backend owns (closed with it), so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from meshkit._core.clock import Clock, MonotonicClock
from meshkit.errors import ConfigurationError
from meshkit.messaging.base import Backend, Capabilities, Delivery, GroupChannel, StartFrom
from meshkit.messaging.message import Envelope

__all__ = ["SqliteBackend", "from_url"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    id TEXT NOT NULL,
    key TEXT,
    created REAL NOT NULL,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    time TEXT NOT NULL,
    datacontenttype TEXT NOT NULL,
    subject TEXT,
    extensions TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_topic ON messages (topic, seq);
CREATE TABLE IF NOT EXISTS groups (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    PRIMARY KEY (topic, grp)
);
CREATE TABLE IF NOT EXISTS deliveries (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT,
    attempts INTEGER NOT NULL,
    leased INTEGER NOT NULL,
    due REAL NOT NULL,
    owner TEXT,
    PRIMARY KEY (topic, grp, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_key ON deliveries (topic, grp, key, seq) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS dedup (
    topic TEXT NOT NULL,
    id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (topic, id)
) WITHOUT ROWID;
"""

_CLAIM = """
UPDATE deliveries SET leased = 1, owner = :owner, due = :lease_until, attempts = attempts + 1
WHERE topic = :topic AND grp = :grp AND seq IN (
    SELECT d.seq FROM deliveries d
    WHERE d.topic = :topic AND d.grp = :grp AND d.leased = 0 AND d.due <= :now
      AND (d.key IS NULL OR d.seq = (SELECT MIN(k.seq) FROM deliveries k
                                      WHERE k.topic = d.topic AND k.grp = d.grp AND k.key = d.key))
    ORDER BY d.seq LIMIT :limit
)
RETURNING seq, attempts
"""


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.JSONDecoder().decode
_BUSY_WAIT = 30.0  # seconds a writer keeps trying for the lock before the error surfaces


@contextlib.contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    """One short write transaction, taking the lock fairly.

    SQLite's own busy handler sleeps 1, 2, 5, ... up to 100 ms between tries, so under steady contention a writer
    that lost once keeps losing to writers that never had to wait: a member of a group was starved that way. The
    connection's busy timeout is tiny; this loop retries after a short random pause, so every waiter gets a
    chance every millisecond or so.
    """
    deadline = time.monotonic() + _BUSY_WAIT
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.0002, 0.0015))
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SqliteBackend(Backend):
    capabilities = Capabilities(replay=True, dedup=True, durable=True, multi_process=True)

    def __init__(
        self,
        path: str | Path,
        *,
        visibility_timeout: float = 30.0,
        dedup_window: float = 600.0,
        retention: float = 7 * 24 * 3600.0,
        batch: int = 500,
        clock: Clock | None = None,
    ) -> None:
        self.path = Path(path)
        self.visibility_timeout = visibility_timeout
        self.dedup_window = dedup_window
        self.retention = retention
        self.batch = batch
        self._clock = clock or MonotonicClock()
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._opened = False
        self._closed = False
        self._appended = asyncio.Event()  # wakes this process's fetchers at once; others poll
        self._appends = 0

    # -- the database thread ---------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise ConfigurationError(f"the SQLite broker on {self.path} is closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshkit-sqlite")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._db = self._open()
        return fn(self._db)

    def _open(self) -> sqlite3.Connection:
        if not self.path.parent.exists():
            raise ConfigurationError(
                f"cannot open the SQLite broker at {self.path}: the folder {self.path.parent} does not exist",
                hint=f"create it (mkdir -p {self.path.parent}) or point the URL elsewhere",
            )
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("PRAGMA busy_timeout=2")  # from here on, waits for the write lock are ours: see _write
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open the SQLite broker at {self.path}: {exc}") from exc
        return db

    # -- publishing ------------------------------------------------------------------------------------------------

    async def append(self, topic: str, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        wall = time.time()
        rows = [
            (
                topic,
                e.id,
                e.key,
                wall,
                e.source,
                e.type,
                e.time,
                e.datacontenttype,
                e.subject,
                _dumps(dict(e.extensions)) if e.extensions else "{}",
                e.data,
            )
            for e in envelopes
        ]
        self._appends += 1
        prune = self._appends % 1000 == 1

        def write(db: sqlite3.Connection) -> None:
            with _write(db):
                # one statement records every id and returns those not seen within the window
                new = {
                    id_
                    for (id_,) in db.execute(
                        "INSERT INTO dedup (topic, id, at) SELECT ?, value, ? FROM json_each(?) WHERE true"
                        " ON CONFLICT DO NOTHING RETURNING id",
                        (topic, wall, _dumps([row[1] for row in rows])),
                    )
                }
                fresh = []
                for row in rows:
                    if row[1] in new:
                        new.discard(row[1])  # an id twice in one batch is stored once too
                        fresh.append(row)
                db.executemany(
                    "INSERT INTO messages (topic, id, key, created, source, type, time, datacontenttype, subject,"
                    " extensions, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    fresh,
                )
                if prune:
                    self._prune(db, wall)

        await self._run(write)
        self._appended.set()

    def _prune(self, db: sqlite3.Connection, wall: float) -> None:
        db.execute("DELETE FROM dedup WHERE at < ?", (wall - self.dedup_window,))
        # drop messages past retention that no group still needs
        db.execute(
            "DELETE FROM messages WHERE created < ? AND seq < COALESCE(("
            " SELECT MIN(need) FROM (SELECT MIN(seq) AS need FROM deliveries GROUP BY topic, grp"
            " UNION ALL SELECT cursor + 1 FROM groups)), 1 << 62)",
            (wall - self.retention,),
        )

    # -- consuming -------------------------------------------------------------------------------------------------

    async def group(self, topic: str, group: str, start: StartFrom) -> GroupChannel:
        def join(db: sqlite3.Connection) -> None:
            with _write(db):
                self._join(db, topic, group, start)

        await self._run(join)
        return _SqliteChannel(self, topic, group)

    @staticmethod
    def _join(db: sqlite3.Connection, topic: str, group: str, start: StartFrom) -> None:
        if db.execute("SELECT 1 FROM groups WHERE topic = ? AND grp = ?", (topic, group)).fetchone():
            return
        if start == "earliest":
            row = db.execute("SELECT MIN(seq) - 1 FROM messages WHERE topic = ?", (topic,)).fetchone()
        elif start == "latest":
            row = db.execute("SELECT MAX(seq) FROM messages WHERE topic = ?", (topic,)).fetchone()
        elif isinstance(start, int):
            row = (start - 1,)
        elif isinstance(start, datetime):
            row = db.execute(
                "SELECT MAX(seq) FROM messages WHERE topic = ? AND created < ?", (topic, start.timestamp())
            ).fetchone()
        else:  # pragma: no cover - StartFrom is checked by the type system
            raise ConfigurationError(f"unknown start {start!r}")
        cursor = row[0] if row and row[0] is not None else 0
        db.execute("INSERT OR IGNORE INTO groups (topic, grp, cursor) VALUES (?, ?, ?)", (topic, group, cursor))

    async def aclose(self) -> None:
        if self._closed:
            return
        if self._executor is not None:

            def close(db: sqlite3.Connection) -> None:
                db.close()

            if self._db is not None:
                await self._run(close)
            self._executor.shutdown(wait=True)
        self._closed = True
        self._appended.set()


class _SqliteChannel(GroupChannel):
    def __init__(self, backend: SqliteBackend, topic: str, group: str) -> None:
        self._b = backend
        self._topic = topic
        self._group = group
        self._owner = uuid.uuid4().hex  # this member's name on its leases
        self._next_expiry = 0.0  # when to look for expired leases again
        self._closed = False

    @staticmethod
    def _take_from_log(db: sqlite3.Connection, params: dict[str, str], count: int) -> bool:
        """Move up to ``count`` log rows past the group's cursor into its pool; False if there were none."""
        (cursor,) = db.execute("SELECT cursor FROM groups WHERE topic = :topic AND grp = :grp", params).fetchone()
        moved = db.execute(
            "INSERT INTO deliveries (topic, grp, seq, key, attempts, leased, due, owner)"
            " SELECT topic, :grp, seq, key, 0, 0, 0, NULL FROM messages WHERE topic = :topic AND seq > :cursor"
            " ORDER BY seq LIMIT :count RETURNING seq",
            {**params, "cursor": cursor, "count": count},
        ).fetchall()
        if moved:
            db.execute(
                "UPDATE groups SET cursor = :cursor WHERE topic = :topic AND grp = :grp",
                {**params, "cursor": max(seq for (seq,) in moved)},
            )
        return bool(moved)

    def _claim(self, db: sqlite3.Connection, limit: int) -> list[Delivery]:
        b = self._b
        now = time.time()  # leases are read by other processes: wall time, not this process's monotonic clock
        params = {"topic": self._topic, "grp": self._group}
        with _write(db):
            if now >= self._next_expiry:  # leases of dead members go back to the pool (a scan: not on every fetch)
                self._next_expiry = now + min(1.0, b.visibility_timeout / 4)
                db.execute(
                    "UPDATE deliveries SET leased = 0, owner = NULL WHERE topic = :topic AND grp = :grp AND leased = 1"
                    " AND due <= :now",
                    {**params, "now": now},
                )
            claim = {**params, "owner": self._owner, "now": now, "lease_until": now + b.visibility_timeout}
            claimed = db.execute(_CLAIM, {**claim, "limit": limit}).fetchall()
            # Take new log rows into the group's pool only when the pool runs short: the pool stays about one
            # batch deep whatever the backlog, so every statement here costs the same with 10 or 10 million
            # messages waiting (moving a batch on every fetch made the pool, and each fetch, grow with the log).
            if len(claimed) < limit and self._take_from_log(db, params, max(b.batch, limit)):
                claimed += db.execute(_CLAIM, {**claim, "limit": limit - len(claimed)}).fetchall()
            rows = []
            if claimed:
                attempts = dict(claimed)
                rows = db.execute(
                    "SELECT seq, id, source, type, time, datacontenttype, subject, extensions, data FROM messages"
                    " WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY seq",
                    (json.dumps(list(attempts)),),
                ).fetchall()
        topic, group = self._topic, self._group
        return [
            Delivery(
                topic,
                group,
                Envelope(r[1], r[2], r[3], r[4], r[5], r[8], r[6], _loads(r[7]) if r[7] != "{}" else {}),
                r[0],
                attempts[r[0]],
            )
            for r in rows
        ]

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        clock = self._b._clock
        deadline = clock.now() + wait
        pause = 0.002
        while not self._closed and not self._b._closed:
            self._b._appended.clear()
            out = await self._b._run(lambda db: self._claim(db, limit))
            if out:
                return out
            remaining = deadline - clock.now()
            if remaining <= 0:
                return []
            # another process may publish: poll, backing off to 50 ms; a publish here wakes us at once
            try:
                async with clock.deadline(min(pause, remaining)):
                    await self._b._appended.wait()
            except TimeoutError:
                pause = min(pause * 2, 0.05)
        return []

    async def _settle(self, sql: str, seqs: Sequence[int], **extra: Any) -> None:
        if not seqs:
            return
        params = [{"topic": self._topic, "grp": self._group, "seq": seq, "owner": self._owner, **extra} for seq in seqs]

        def write(db: sqlite3.Connection) -> None:
            with _write(db):
                db.executemany(sql, params)

        await self._b._run(write)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        # acked is done, whoever holds the lease now: the message is never delivered to this group again
        if not deliveries:
            return
        params = (self._topic, self._group, _dumps([d.offset for d in deliveries]))

        def write(db: sqlite3.Connection) -> None:
            with _write(db):
                db.execute(
                    "DELETE FROM deliveries WHERE topic = ? AND grp = ? AND seq IN (SELECT value FROM json_each(?))",
                    params,
                )

        await self._b._run(write)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        await self._settle(
            "UPDATE deliveries SET leased = 0, owner = NULL, due = :due"
            " WHERE topic = :topic AND grp = :grp AND seq = :seq AND owner = :owner",
            [delivery.offset],
            due=time.time() + delay,
        )

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        await self._settle(
            "UPDATE deliveries SET leased = 0, owner = NULL, due = 0, attempts = attempts - 1"
            " WHERE topic = :topic AND grp = :grp AND seq = :seq AND owner = :owner",
            [d.offset for d in deliveries],
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._b._closed:
            return
        owner = self._owner

        def leave(db: sqlite3.Connection) -> None:
            with _write(db):
                db.execute(
                    "UPDATE deliveries SET leased = 0, owner = NULL, due = 0, attempts = attempts - 1"
                    " WHERE topic = ? AND grp = ? AND owner = ?",
                    (self._topic, self._group, owner),
                )

        await self._b._run(leave)


def from_url(url: str, **options: Any) -> SqliteBackend:
    """``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (SQLAlchemy's convention)."""
    parts = urlsplit(url)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.netloc or not path:
        raise ConfigurationError(
            f"bad SQLite broker URL {url!r}", hint="use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return SqliteBackend(path, **options)
