"""``sqlite:///path/to/file.db``: the embedded, durable default. Several processes on one host share one file.

Layout (docs/messaging.md has it for plain readers)::

    messages(seq INTEGER PRIMARY KEY, topic, id, key, created, source, type, time, datacontenttype, subject,
             extensions JSON, data BLOB)                       the log of every topic
    groups(topic, grp, cursor)                                 the last seq each group has taken from the log
    spans(topic, grp, lo, hi, size, owner, due, done JSON)     runs of unkeyed log rows a member leased in one go
    deliveries(topic, grp, seq, key, attempts, leased, due, owner)
                                                               single rows a group holds: keyed, redelivered, ...
    dedup(topic, id, at)                                       ids seen within the dedup window

How members of a group share work safely across processes: a fetch is one short write transaction. It first claims
rows waiting in the pool (``deliveries`` rows not leased and due: redeliveries, released messages, keys that were
held) with ``UPDATE … RETURNING``; a row is claimable only if it is the lowest ``seq`` of its key in the group
(per-key order). Then it takes new log rows past the group's cursor: the unkeyed ones become one ``spans`` row
leased to the member (one write for hundreds of messages), the keyed ones become ``deliveries`` rows, leased, or
waiting in the pool while an earlier message of their key is held. A lease lasts ``visibility_timeout`` seconds.
Ack deletes ``deliveries`` rows and records the seqs of a span in its ``done`` list (deleting the span once all are
done); nack and release move a message to the pool. A member killed with SIGKILL holds leases that expire: the
next member to scan puts their messages (a span's not done) back in the pool, so they are delivered again. The
messages are read after the transaction (the write lock is held for the writes only). WAL mode,
``synchronous=NORMAL``, a busy timeout, and batches of hundreds of rows per transaction keep it fast.

Every database call runs on one thread the backend owns (closed with it), so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from meshkit._core.clock import Clock, MonotonicClock
from meshkit._core.sqlite import open_database, write_transaction
from meshkit.errors import ConfigurationError
from meshkit.messaging.base import (
    Backend,
    Capabilities,
    Delivery,
    GroupChannel,
    GroupNotFound,
    Lag,
    StartFrom,
    make_delivery,
)
from meshkit.messaging.message import NO_EXTENSIONS, Envelope, make_envelope

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
CREATE INDEX IF NOT EXISTS deliveries_waiting ON deliveries (topic, grp, seq) WHERE leased = 0;
CREATE TABLE IF NOT EXISTS spans (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    lo INTEGER NOT NULL,
    hi INTEGER NOT NULL,
    size INTEGER NOT NULL,
    owner TEXT NOT NULL,
    due REAL NOT NULL,
    done TEXT NOT NULL,
    PRIMARY KEY (topic, grp, lo)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_keyed ON messages (topic, seq) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS dedup (
    topic TEXT NOT NULL,
    id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (topic, id)
) WITHOUT ROWID;
"""

# the pool: rows waiting (leased = 0, in the deliveries_waiting index) that are due and the lowest of their key
_CLAIM = """
UPDATE deliveries SET leased = 1, owner = :owner, due = :lease_until, attempts = attempts + 1
WHERE topic = :topic AND grp = :grp AND seq IN (
    SELECT d.seq FROM deliveries d INDEXED BY deliveries_waiting
    WHERE d.topic = :topic AND d.grp = :grp AND d.leased = 0 AND d.due <= :now
      AND (d.key IS NULL OR d.seq = (SELECT MIN(k.seq) FROM deliveries k
                                      WHERE k.topic = d.topic AND k.grp = d.grp AND k.key = d.key))
    ORDER BY d.seq LIMIT :limit
)
RETURNING seq, attempts
"""

# is there anything to claim: log rows past the group's cursor, or waiting rows that are due
_ANYTHING = """
SELECT COALESCE((SELECT cursor FROM groups WHERE topic = :topic AND grp = :grp)
                < (SELECT MAX(seq) FROM messages WHERE topic = :topic), 0)
    OR EXISTS (SELECT 1 FROM deliveries INDEXED BY deliveries_waiting
               WHERE topic = :topic AND grp = :grp AND leased = 0 AND due <= :now)
"""
# the rows just taken from the log whose key an earlier row of the group holds (keyed rows are few: a partial index)
_HELD_KEYS = """
SELECT d.seq FROM deliveries d INDEXED BY deliveries_by_key
WHERE d.topic = :topic AND d.grp = :grp AND d.key IS NOT NULL AND d.seq > :cursor AND d.seq <= :last
  AND EXISTS (SELECT 1 FROM deliveries k WHERE k.topic = d.topic AND k.grp = d.grp AND k.key = d.key AND k.seq < d.seq)
"""
# the keyed rows just taken from the log
_TAKEN_KEYED = """
SELECT seq FROM deliveries INDEXED BY deliveries_by_key
WHERE topic = :topic AND grp = :grp AND key IS NOT NULL AND seq > :cursor AND seq <= :last
"""
# a group's lag, in one read (one snapshot): log rows past its cursor, then the rows it holds in deliveries and in
# spans, split by whether a member's lease on them still runs (an expired lease is waiting: the next scan puts it
# back in the pool)
_LAG = """
SELECT
  (SELECT COUNT(*) FROM messages m WHERE m.topic = g.topic AND m.seq > g.cursor),
  (SELECT COUNT(*) FROM deliveries d WHERE d.topic = g.topic AND d.grp = g.grp AND (d.leased = 0 OR d.due <= :now)),
  (SELECT COUNT(*) FROM deliveries d WHERE d.topic = g.topic AND d.grp = g.grp AND d.leased = 1 AND d.due > :now),
  (SELECT COALESCE(SUM(s.size - json_array_length(s.done)), 0) FROM spans s
   WHERE s.topic = g.topic AND s.grp = g.grp AND s.due <= :now),
  (SELECT COALESCE(SUM(s.size - json_array_length(s.done)), 0) FROM spans s
   WHERE s.topic = g.topic AND s.grp = g.grp AND s.due > :now)
FROM groups g WHERE g.topic = :topic AND g.grp = :grp
"""
_SELECT_SEQS = (
    "SELECT seq, id, source, type, time, datacontenttype, subject, extensions, data FROM messages"
    " WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY seq"
)
_FIRST_IN_SPAN = (
    "SELECT source, type, time, datacontenttype FROM messages WHERE topic = ? AND seq > ? ORDER BY seq LIMIT 1"
)
_SELECT_SPAN = (
    "SELECT seq, id, NULLIF(source, :source), NULLIF(type, :type), NULLIF(time, :time), NULLIF(datacontenttype, :ct),"
    " subject, NULLIF(extensions, '{}'), data FROM messages WHERE topic = :topic AND seq > :lo AND seq <= :hi"
    " ORDER BY seq"
)

# A batch is inserted by one statement, two to three times as fast as executemany (which binds eleven parameters per
# row): the attributes every message of the batch shares are bound once, the data of all messages as one BLOB.
# _INSERT_PLAIN (no message has a key, a subject or extensions) walks the JSON array of ids (the one dedup uses) and
# cuts each message's data out of the BLOB at offsets given as fixed-width decimals (one C-level format in Python,
# no per-row JSON); _INSERT_ROWS_JSON takes a JSON array with a row per message: its id, where its data starts
# and how long it is, its key, subject and extensions. A batch whose messages differ in the shared attributes takes
# the executemany path.
_INSERT_PLAIN = """
INSERT INTO messages (topic, id, key, created, source, type, time, datacontenttype, subject, extensions, data)
SELECT :topic, value, NULL, :created, :source, :type, :time, :ct, NULL, '{}', COALESCE(substr(:data, s, e - s), X'')
FROM (SELECT value, CAST(substr(:offsets, key * 10 + 1, 10) AS INTEGER) AS s,
             CAST(substr(:offsets, key * 10 + 11, 10) AS INTEGER) AS e FROM json_each(:ids))
"""
_INSERT_ROWS_JSON = """
INSERT INTO messages (topic, id, key, created, source, type, time, datacontenttype, subject, extensions, data)
SELECT :topic, json_extract(value, '$[0]'), json_extract(value, '$[3]'), :created, :source, :type, :time, :ct,
       json_extract(value, '$[4]'), COALESCE(json_extract(value, '$[5]'), '{}'),
       COALESCE(substr(:data, json_extract(value, '$[1]'), json_extract(value, '$[2]')), X'')
FROM json_each(:rows)
"""
_INSERT_ROWS = (
    "INSERT INTO messages (topic, id, key, created, source, type, time, datacontenttype, subject, extensions, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Records the ids; an id seen within the window is left alone, one seen before it counts as new. Without RETURNING
# (which costs more than the insert): if it changed fewer rows than there are ids, some are duplicates, and the
# batch takes _DEDUP_RETURNING instead, which says which ids are new.
_DEDUP = (
    "INSERT INTO dedup (topic, id, at) SELECT :topic, value, :now FROM json_each(:ids) WHERE true"
    " ON CONFLICT DO UPDATE SET at = excluded.at WHERE at < :since"
)
_DEDUP_RETURNING = _DEDUP + " RETURNING id"


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.JSONDecoder().decode


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
        db = open_database(self.path, _SCHEMA, what="SQLite broker")
        # Checkpoint every 10,000 WAL pages (40 MB) rather than SQLite's 1,000: the commit that triggers one stalls
        # its writer (two fsyncs and the copy), and a broker's pages (the pool's, the spans') are rewritten many
        # times between checkpoints, so fewer, larger checkpoints copy each page once instead of many times.
        db.execute("PRAGMA wal_autocheckpoint=10000")
        return db

    # -- publishing ------------------------------------------------------------------------------------------------

    async def append(self, topic: str, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        wall = time.time()
        ids = _json_strings([e.id for e in envelopes])
        dedup = {"topic": topic, "now": wall, "since": wall - self.dedup_window, "ids": ids}
        batch = _batch(topic, wall, envelopes, ids)  # built before the transaction: the lock is held for SQL only
        self._appends += 1
        prune = self._appends % 1000 == 1

        def write(db: sqlite3.Connection) -> None:
            with write_transaction(db):
                db.execute("SAVEPOINT dedup")
                if db.execute(_DEDUP, dedup).rowcount == len(envelopes):
                    db.execute("RELEASE dedup")
                    self._insert(db, topic, wall, envelopes, batch)
                else:  # duplicates: an id seen within the window, or twice in this batch (stored once)
                    db.execute("ROLLBACK TO dedup")
                    new = {id_ for (id_,) in db.execute(_DEDUP_RETURNING, dedup)}
                    db.execute("RELEASE dedup")
                    fresh = []
                    for e in envelopes:
                        if e.id in new:
                            new.discard(e.id)
                            fresh.append(e)
                    if fresh:
                        self._insert(db, topic, wall, fresh, _batch(topic, wall, fresh))
                if prune:
                    self._prune(db, wall)

        await self._run(write)
        self._appended.set()

    @staticmethod
    def _insert(
        db: sqlite3.Connection,
        topic: str,
        wall: float,
        envelopes: Sequence[Envelope],
        batch: tuple[str, dict[str, Any]] | None,
    ) -> None:
        if batch is not None:
            db.execute(*batch)
            return
        db.executemany(
            _INSERT_ROWS,
            [
                (
                    topic,
                    e.id,
                    e.extensions.get("partitionkey"),
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
            ],
        )

    def _prune(self, db: sqlite3.Connection, wall: float) -> None:
        db.execute("DELETE FROM dedup WHERE at < ?", (wall - self.dedup_window,))
        # drop messages past retention that no group still needs
        db.execute(
            "DELETE FROM messages WHERE created < ? AND seq < COALESCE(("
            " SELECT MIN(need) FROM (SELECT MIN(seq) AS need FROM deliveries GROUP BY topic, grp"
            " UNION ALL SELECT MIN(lo) FROM spans GROUP BY topic, grp UNION ALL SELECT cursor + 1 FROM groups)),"
            " 1 << 62)",
            (wall - self.retention,),
        )

    # -- consuming -------------------------------------------------------------------------------------------------

    async def group(self, topic: str, group: str, start: StartFrom) -> GroupChannel:
        def join(db: sqlite3.Connection) -> None:
            with write_transaction(db):
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

    async def lag(self, topic: str, group: str) -> Lag:
        now = time.time()  # leases are wall time (other processes read them)

        def read(db: sqlite3.Connection) -> tuple[int, int, int, int, int] | None:
            row = db.execute(_LAG, {"topic": topic, "grp": group, "now": now}).fetchone()
            return None if row is None else tuple(row)

        counts = await self._run(read)
        if counts is None:
            raise GroupNotFound(topic, group)
        new, pooled, leased, span_expired, span_leased = counts
        return Lag(waiting=new + pooled + span_expired, in_flight=leased + span_leased)

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


class _Span:
    """A run of log rows one member leased in one go: unkeyed rows of the topic with ``lo <= seq <= hi``."""

    __slots__ = ("done", "size")

    def __init__(self, size: int) -> None:
        self.size = size  # how many rows
        self.done: frozenset[int] = frozenset()  # seqs settled (acked, or handed back to the pool)


class _SqliteChannel(GroupChannel):
    def __init__(self, backend: SqliteBackend, topic: str, group: str) -> None:
        self._b = backend
        self._topic = topic
        self._group = group
        self._owner = uuid.uuid4().hex  # this member's name on its leases
        self._next_expiry = 0.0  # when to look for expired leases again
        self._acks: list[int] = []  # acked offsets not written yet: the next transaction of this member writes them
        self._acks_lock = threading.Lock()  # the event loop adds to _acks, the database thread takes them
        # the spans this member holds (by lo) and the span of each seq it took from one; database thread only
        self._spans: dict[int, _Span] = {}
        self._span_of: dict[int, int] = {}
        self._closed = False

    # Everything below ending in _tx runs on the database thread, inside a write transaction where it says so; the
    # in-memory span bookkeeping changes only after that transaction commits (the callables they return).

    def _settle_spans_tx(
        self, db: sqlite3.Connection, seqs: Sequence[int]
    ) -> tuple[list[int], list[Callable[[], None]]]:
        """Mark ``seqs`` settled in the spans this member holds (inside a transaction).

        Returns the seqs that are not in a span it still holds (they are rows of ``deliveries``) and what to do to
        the in-memory bookkeeping once the transaction commits. A span whose rows are all settled is deleted; a
        span gone from the table (its lease ran out and another member returned its rows to the pool) is forgotten,
        and its seqs are settled as rows.
        """
        rows: list[int] = []
        by_span: dict[int, list[int]] = {}
        for seq in seqs:
            lo = self._span_of.get(seq)
            if lo is not None and lo in self._spans:
                by_span.setdefault(lo, []).append(seq)
            else:
                rows.append(seq)
        after: list[Callable[[], None]] = []
        for lo, settled in by_span.items():
            span = self._spans[lo]
            done = span.done.union(settled)
            key = {"topic": self._topic, "grp": self._group, "lo": lo, "owner": self._owner}
            if len(done) >= span.size:
                held = db.execute(
                    "DELETE FROM spans WHERE topic = :topic AND grp = :grp AND lo = :lo AND owner = :owner", key
                ).rowcount
            else:
                held = db.execute(
                    "UPDATE spans SET done = :done WHERE topic = :topic AND grp = :grp AND lo = :lo AND owner = :owner",
                    {**key, "done": _dumps(sorted(done))},
                ).rowcount
            if not held:
                rows.extend(settled)
            after.append(partial(self._span_settled, lo, settled, done if held else None))
        return rows, after

    def _span_settled(self, lo: int, settled: list[int], done: frozenset[int] | None) -> None:
        for seq in settled:
            self._span_of.pop(seq, None)
        span = self._spans.get(lo)
        if span is None:
            return
        if done is None or len(done) >= span.size:
            del self._spans[lo]
        else:
            span.done = done

    def _take_acks_tx(self, db: sqlite3.Connection) -> tuple[list[int], list[Callable[[], None]]]:
        """Write the pending acks (inside the caller's transaction); returns them, to put back on failure, and what
        to run once the transaction commits."""
        with self._acks_lock:
            acks, self._acks = self._acks, []
        if not acks:
            return acks, []
        rows, after = self._settle_spans_tx(db, acks)
        if rows:
            # the range lets SQLite walk the rows in order instead of looking each one up (a third cheaper)
            db.execute(
                "DELETE FROM deliveries WHERE topic = ? AND grp = ? AND seq BETWEEN ? AND ?"
                " AND seq IN (SELECT value FROM json_each(?))",
                (self._topic, self._group, min(rows), max(rows), _dumps(rows)),
            )
        return acks, after

    def _put_back(self, acks: list[int]) -> None:
        if acks:
            with self._acks_lock:
                self._acks[:0] = acks

    def _expire_tx(self, db: sqlite3.Connection, now: float) -> list[Callable[[], None]]:
        """Leases of dead (or slow) members go back to the pool, counting the delivery they had."""
        params = {"topic": self._topic, "grp": self._group, "now": now}
        db.execute(
            "UPDATE deliveries SET leased = 0, owner = NULL WHERE topic = :topic AND grp = :grp"
            " AND leased = 1 AND due <= :now",
            params,
        )
        expired = db.execute(
            "DELETE FROM spans WHERE topic = :topic AND grp = :grp AND due <= :now RETURNING lo, hi, done", params
        ).fetchall()
        for lo, hi, done in expired:
            self._unspan_tx(db, lo, hi, done, attempts=1)
        return [partial(self._forget_span, lo) for lo, _, _ in expired]

    def _forget_span(self, lo: int) -> None:
        self._spans.pop(lo, None)  # its seqs stay in _span_of: settling them finds no span and takes the rows

    def _unspan_tx(self, db: sqlite3.Connection, lo: int, hi: int, done: str, *, attempts: int) -> None:
        """Put the unsettled rows of a span (deleted by the caller) in the pool, with ``attempts`` deliveries."""
        db.execute(
            "INSERT INTO deliveries (topic, grp, seq, key, attempts, leased, due, owner)"
            " SELECT topic, :grp, seq, NULL, :attempts, 0, 0, NULL FROM messages"
            " WHERE topic = :topic AND seq BETWEEN :lo AND :hi AND key IS NULL"
            " AND seq NOT IN (SELECT value FROM json_each(:done))",
            {"topic": self._topic, "grp": self._group, "lo": lo, "hi": hi, "done": done, "attempts": attempts},
        )

    def _claim_tx(self, db: sqlite3.Connection, limit: int) -> tuple[list[Delivery], int]:
        """Claim up to ``limit`` deliveries; also returns the file's ``data_version`` read just before."""
        b = self._b
        (version,) = db.execute("PRAGMA data_version").fetchone()
        now = time.time()  # leases are read by other processes: wall time, not this process's monotonic clock
        lease_until = now + b.visibility_timeout
        topic, group = self._topic, self._group
        params = {"topic": topic, "grp": group}
        # A read first (no lock): with nothing to claim, do not take the write lock the others need. Most wake-ups
        # of an idle member are another member's commits; the lease-expiry scan still runs when it is due.
        if now < self._next_expiry and not db.execute(_ANYTHING, {**params, "now": now}).fetchone()[0]:
            return [], version
        acks: list[int] = []
        after: list[Callable[[], None]] = []
        pooled: list[tuple[int, int]] = []  # (seq, attempt) claimed from the pool
        taken: _Taken | None = None
        try:
            with write_transaction(db):
                acks, after = self._take_acks_tx(db)
                if now >= self._next_expiry:  # a scan: not on every claim
                    after += self._expire_tx(db, now)
                # first what is waiting in the pool: redeliveries, released messages, keys that were held
                pooled = db.execute(
                    _CLAIM, {**params, "owner": self._owner, "now": now, "lease_until": lease_until, "limit": limit}
                ).fetchall()
                if len(pooled) < limit:
                    taken = self._take_from_log_tx(db, params, min(limit - len(pooled), b.batch), lease_until)
        except BaseException:
            self._put_back(acks)
            raise
        if now >= self._next_expiry:
            self._next_expiry = now + min(1.0, b.visibility_timeout / 4)
        for done in after:
            done()
        if taken is not None and taken.size:
            self._spans[taken.cursor + 1] = _Span(taken.size)
        # The claimed rows are ours now: read their messages outside the write transaction (the lock is held only
        # for the writes; a message is never changed, and it is not pruned while a group still holds it).
        rows: list[Any] = []
        if pooled:
            rows = db.execute(_SELECT_SEQS, (_dumps([s for s, _ in pooled]),)).fetchall()
        shared: tuple[str, str, str, str] = ("", "", "", "")
        if taken is not None:
            # the attributes most messages of a span share (those of one publish_batch) come back as NULL when
            # they equal the first message's: cheaper than building the same strings again for every row
            shared = db.execute(_FIRST_IN_SPAN, (topic, taken.cursor)).fetchone()
            rows += db.execute(
                _SELECT_SPAN,
                {
                    "topic": topic,
                    "lo": taken.cursor,
                    "hi": taken.last,
                    "source": shared[0],
                    "type": shared[1],
                    "time": shared[2],
                    "ct": shared[3],
                },
            ).fetchall()
        source0, kind0, time0, ct0 = shared
        attempts = dict(pooled)
        keyed = taken.keyed if taken is not None else _NONE
        blocked = taken.blocked if taken is not None else _NONE
        span_of = self._span_of
        lo = taken.cursor + 1 if taken is not None else 0
        out = []
        for seq, ident, source, kind, stamp, ct, subject, extensions, data in rows:
            if seq in attempts:  # from the pool (if it was in a span of ours, that span is gone)
                span_of.pop(seq, None)
            elif seq in keyed:
                if seq in blocked:
                    continue
            else:
                span_of[seq] = lo
            envelope = make_envelope(
                ident,
                source0 if source is None else source,
                kind0 if kind is None else kind,
                time0 if stamp is None else stamp,
                ct0 if ct is None else ct,
                data,
                subject,
                NO_EXTENSIONS if extensions is None or extensions == "{}" else _loads(extensions),
            )
            out.append(make_delivery(topic, group, envelope, seq, attempts.get(seq, 1)))
        return out, version

    def _take_from_log_tx(
        self, db: sqlite3.Connection, params: dict[str, str], count: int, lease_until: float
    ) -> _Taken | None:
        """Lease up to ``count`` log rows past the group's cursor to this member at once (no pool round trip).

        The unkeyed rows become one span (one row in ``spans``, whatever their number); keyed rows go to
        ``deliveries`` one by one, leased, or unleased in the pool when the group still holds their key (an
        earlier message of that key is in flight or waiting): the pool claim hands a row out once it is the lowest
        of its key.
        """
        (cursor,) = db.execute("SELECT cursor FROM groups WHERE topic = :topic AND grp = :grp", params).fetchone()
        rows, last = db.execute(
            "SELECT COUNT(*), MAX(seq) FROM (SELECT seq FROM messages WHERE topic = :topic AND seq > :cursor"
            " ORDER BY seq LIMIT :count)",
            {**params, "cursor": cursor, "count": count},
        ).fetchone()
        if not rows:
            return None
        span = {**params, "cursor": cursor, "last": last}
        keyed = db.execute(
            "INSERT INTO deliveries (topic, grp, seq, key, attempts, leased, due, owner)"
            " SELECT topic, :grp, seq, key, 1, 1, :due, :owner FROM messages INDEXED BY messages_keyed"
            " WHERE topic = :topic AND seq > :cursor AND seq <= :last AND key IS NOT NULL",
            {**span, "due": lease_until, "owner": self._owner},
        ).rowcount
        keyed_seqs: frozenset[int] = _NONE
        blocked: frozenset[int] = _NONE
        if keyed:
            keyed_seqs = frozenset(seq for (seq,) in db.execute(_TAKEN_KEYED, span))
            blocked = frozenset(seq for (seq,) in db.execute(_HELD_KEYS, span))
            if blocked:
                db.execute(
                    "UPDATE deliveries SET attempts = 0, leased = 0, due = 0, owner = NULL"
                    " WHERE topic = ? AND grp = ? AND seq IN (SELECT value FROM json_each(?))",
                    (params["topic"], params["grp"], _dumps(sorted(blocked))),
                )
        if rows > keyed:
            db.execute(
                "INSERT INTO spans (topic, grp, lo, hi, size, owner, due, done)"
                " VALUES (:topic, :grp, :lo, :last, :size, :owner, :due, '[]')",
                {**span, "lo": cursor + 1, "size": rows - keyed, "owner": self._owner, "due": lease_until},
            )
        db.execute("UPDATE groups SET cursor = :last WHERE topic = :topic AND grp = :grp", span)
        return _Taken(cursor, last, rows - keyed, keyed_seqs, blocked)

    def _write_acks_tx(self, db: sqlite3.Connection) -> None:
        with self._acks_lock:
            if not self._acks:  # an earlier transaction of this member wrote them
                return
        acks: list[int] = []
        after: list[Callable[[], None]] = []
        try:
            with write_transaction(db):
                acks, after = self._take_acks_tx(db)
        except BaseException:
            self._put_back(acks)
            raise
        for done in after:
            done()

    def _give_back_tx(self, db: sqlite3.Connection, seqs: Sequence[int], due: float, *, count: bool) -> None:
        """nack (``count``: the delivery counts as an attempt) or release: the rows wait in the pool until ``due``."""
        after: list[Callable[[], None]] = []
        with write_transaction(db):
            rows, after = self._settle_spans_tx(db, [s for s in seqs if s in self._span_of])
            not_held = set(rows)
            from_spans = [s for s in seqs if s in self._span_of and s not in not_held]
            if from_spans:
                db.execute(
                    "INSERT INTO deliveries (topic, grp, seq, key, attempts, leased, due, owner)"
                    " SELECT :topic, :grp, value, NULL, :attempts, 0, :due, NULL FROM json_each(:seqs)",
                    {
                        "topic": self._topic,
                        "grp": self._group,
                        "attempts": 1 if count else 0,
                        "due": due,
                        "seqs": _dumps(from_spans),
                    },
                )
            moved = set(from_spans)
            rest = [s for s in seqs if s not in moved]
            if rest:
                db.executemany(
                    "UPDATE deliveries SET leased = 0, owner = NULL, due = :due,"
                    " attempts = attempts - :uncount WHERE topic = :topic AND grp = :grp AND seq = :seq"
                    " AND owner = :owner",
                    [
                        {
                            "topic": self._topic,
                            "grp": self._group,
                            "seq": seq,
                            "owner": self._owner,
                            "due": due,
                            "uncount": 0 if count else 1,
                        }
                        for seq in rest
                    ],
                )
        for done in after:
            done()

    # -- on the event loop -----------------------------------------------------------------------------------------

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        b = self._b
        clock = b._clock
        deadline = clock.now() + wait
        pause = 0.002  # the longest wait between claims (which also find redeliveries coming due), backing off
        while not self._closed and not b._closed:
            b._appended.clear()
            out, version = await b._run(lambda db: self._claim_tx(db, limit))
            if out:
                return out
            now = clock.now()
            if now >= deadline:
                return []
            if not await self._news(version, min(deadline, now + pause)):
                pause = min(pause * 2, 0.05)
        return []

    async def _news(self, version: int, until: float) -> bool:
        """Wait until something may have come (True) or until ``until`` (False).

        A publish in this process wakes us at once; a commit by another process changes the file's data_version,
        which is cheap to poll (a read: a claim takes the write lock the producer needs).
        """
        b = self._b
        clock = b._clock
        step = 0.001
        while True:
            remaining = until - clock.now()
            if remaining <= 0:
                return False
            try:
                async with clock.deadline(min(step, remaining)):
                    await b._appended.wait()
            except TimeoutError:
                pass
            else:
                return True
            if await b._run(_data_version) != version:
                return True
            step = min(step * 1.5, 0.01)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        # acked is done, whoever holds the lease now: the message is never delivered to this group again
        if not deliveries:
            return
        with self._acks_lock:
            self._acks.extend(d.offset for d in deliveries)
        # written by this member's next transaction: this one, or a claim queued before it on the database thread
        await self._b._run(self._write_acks_tx)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        due = time.time() + delay
        await self._b._run(lambda db: self._give_back_tx(db, [delivery.offset], due, count=True))

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            seqs = [d.offset for d in deliveries]
            await self._b._run(lambda db: self._give_back_tx(db, seqs, 0.0, count=False))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._b._closed:
            return
        await self._b._run(self._leave_tx)

    def _leave_tx(self, db: sqlite3.Connection) -> None:
        """Whatever this member holds goes back to the pool at once, without counting the delivery."""
        acks: list[int] = []
        params = {"topic": self._topic, "grp": self._group, "owner": self._owner}
        try:
            with write_transaction(db):
                acks, _ = self._take_acks_tx(db)
                db.execute(
                    "UPDATE deliveries SET leased = 0, owner = NULL, due = 0, attempts = attempts - 1"
                    " WHERE topic = :topic AND grp = :grp AND owner = :owner",
                    params,
                )
                held = db.execute(
                    "DELETE FROM spans WHERE topic = :topic AND grp = :grp AND owner = :owner RETURNING lo, hi, done",
                    params,
                ).fetchall()
                for lo, hi, done in held:
                    self._unspan_tx(db, lo, hi, done, attempts=0)
        except BaseException:
            self._put_back(acks)
            raise
        self._spans.clear()
        self._span_of.clear()


class _Taken:
    """What a claim took from the log: seqs ``cursor < seq <= last``, ``size`` of them in a span (the unkeyed),
    ``keyed`` the others, ``blocked`` those of them that went to the pool (their key is held)."""

    __slots__ = ("blocked", "cursor", "keyed", "last", "size")

    def __init__(self, cursor: int, last: int, size: int, keyed: frozenset[int], blocked: frozenset[int]) -> None:
        self.cursor = cursor
        self.last = last
        self.size = size
        self.keyed = keyed
        self.blocked = blocked


_NONE: frozenset[int] = frozenset()


def _batch(
    topic: str, wall: float, envelopes: Sequence[Envelope], ids: str | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The statement and parameters that insert ``envelopes`` (``ids``: their ids as a JSON array, if built), or
    None if they differ in the attributes those statements share."""
    first = envelopes[0]
    source, kind, stamp, content_type = first.source, first.type, first.time, first.datacontenttype
    datas = []
    plain = True  # no message has extensions or a subject
    for e in envelopes:
        if e.source != source or e.type != kind or e.time != stamp or e.datacontenttype != content_type:
            return None
        if plain and (e.extensions or e.subject is not None):
            plain = False
        datas.append(e.data)
    params: dict[str, Any] = {
        "topic": topic,
        "created": wall,
        "source": source,
        "type": kind,
        "time": stamp,
        "ct": content_type,
        "data": b"".join(datas),
    }
    if plain:
        offsets = tuple(itertools.accumulate(map(len, datas), initial=1))  # substr() counts from 1
        params["offsets"] = b"%010d" * len(offsets) % offsets
        params["ids"] = ids if ids is not None else _json_strings([e.id for e in envelopes])
        return _INSERT_PLAIN, params
    params["rows"] = _dumps(
        [
            (
                e.id,
                start,
                len(e.data),
                e.extensions.get("partitionkey"),
                e.subject,
                _dumps(dict(e.extensions)) if e.extensions else None,
            )
            for e, start in zip(envelopes, itertools.accumulate(map(len, datas), initial=1), strict=False)
        ]
    )
    return _INSERT_ROWS_JSON, params


def _json_strings(values: list[str]) -> str:
    """``values`` as a JSON array: joined directly when no value needs escaping (ids almost never do)."""
    body = '","'.join(values)
    if body.count('"') == 2 * len(values) - 2 and "\\" not in body and body.isprintable():
        return f'["{body}"]'
    return _dumps(values)


def _data_version(db: sqlite3.Connection) -> int:
    """Changes whenever another connection commits to the file."""
    (version,) = db.execute("PRAGMA data_version").fetchone()
    return int(version)


def from_url(url: str, **options: Any) -> SqliteBackend:
    """``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (SQLAlchemy's convention)."""
    parts = urlsplit(url)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.netloc or not path:
        raise ConfigurationError(
            f"bad SQLite broker URL {url!r}", hint="use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return SqliteBackend(path, **options)
