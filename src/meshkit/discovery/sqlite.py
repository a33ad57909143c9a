"""``sqlite:///path/to/registry.db``: the embedded default. Several processes on one host share one file.

Layout (plain SQL readers are welcome)::

    instances(service, id, descriptor JSON, status, registered, last_seen, ttl, expires)   the live leases
    changes(seq INTEGER PRIMARY KEY AUTOINCREMENT, service, kind, id, descriptor, status,  the change log
            registered, last_seen, at)
    meta(name, value)                                   ``trimmed``: the highest seq pruned from the log

Times are wall-clock seconds (``clock.wall()``), the only clock processes on one host share. Every write is one
short ``BEGIN IMMEDIATE`` transaction (WAL mode, ``synchronous=NORMAL``) that changes ``instances`` and appends to
``changes`` together. Expired leases are removed, and logged as ``removed``, by the first writer or watcher that
finds them, in the same kind of transaction. Reads filter on ``expires`` and never write.

Watchers poll the change sequence: ``SELECT ... FROM changes WHERE service = ? AND seq > ?`` every
``poll_interval`` seconds (0.1 by default). The log keeps ``retention`` seconds (one hour); a watcher that falls
further behind reads a new snapshot (``meta.trimmed`` tells it so).

Every database call runs on one thread the registry owns (closed with it), so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from meshkit._core.clock import Clock
from meshkit._core.sqlite import open_database, write_transaction
from meshkit._core.urls import Parser, url_options
from meshkit.discovery.base import Capabilities, HealthStatus, Instance, LogEntry, Registry, Resync
from meshkit.errors import ConfigurationError, Unavailable

__all__ = ["SqliteRegistry", "from_url"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL,
    id TEXT NOT NULL,
    descriptor TEXT NOT NULL,
    status TEXT NOT NULL,
    registered REAL NOT NULL,
    last_seen REAL NOT NULL,
    ttl REAL NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (service, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instances_by_expiry ON instances (service, expires);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL,
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    descriptor TEXT,
    status TEXT,
    registered REAL,
    last_seen REAL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_service ON changes (service, seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value REAL NOT NULL) WITHOUT ROWID;
"""


def _instance(row: tuple[Any, ...]) -> Instance:
    return Instance.from_stored(row[0], row[1], row[2], row[3])


class SqliteRegistry(Registry):
    capabilities = Capabilities(shared=True, durable=True)

    def __init__(
        self,
        path: str | Path,
        *,
        poll_interval: float = 0.1,
        retention: float = 3600.0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock=clock)
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.retention = retention
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._writes = 0
        self._shut = False  # the executor is gone for good

    def __repr__(self) -> str:
        return f"SqliteRegistry({str(self.path)!r})"

    # -- the database thread ---------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._shut:
            raise ConfigurationError(f"the SQLite registry on {self.path} is closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshkit-registry-sqlite")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn)
        except sqlite3.Error as exc:
            raise Unavailable(f"the SQLite registry at {self.path} failed: {exc}") from exc

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._db = self._open()
        return fn(self._db)

    def _open(self) -> sqlite3.Connection:
        return open_database(self.path, _SCHEMA, what="SQLite registry")

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
        """``fn`` inside one short write transaction."""

        def run(db: sqlite3.Connection) -> T:
            with write_transaction(db):
                return fn(db)

        return run

    # -- inside transactions ---------------------------------------------------------------------------------------

    def _reap(self, db: sqlite3.Connection, service: str, now: float) -> None:
        gone = db.execute(
            "DELETE FROM instances WHERE service = ? AND expires <= ? RETURNING id", (service, now)
        ).fetchall()
        for (iid,) in sorted(gone):
            self._log(db, service, "removed", iid, None, now)

    def _log(
        self, db: sqlite3.Connection, service: str, kind: str, iid: str, row: tuple[Any, ...] | None, now: float
    ) -> None:
        values = row if row is not None else (None, None, None, None)
        db.execute(
            "INSERT INTO changes (service, kind, id, descriptor, status, registered, last_seen, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (service, kind, iid, *values, now),
        )

    def _trim(self, db: sqlite3.Connection, now: float) -> None:
        (upto,) = db.execute("SELECT max(seq) FROM changes WHERE at < ?", (now - self.retention,)).fetchone()
        if upto is not None:
            db.execute("DELETE FROM changes WHERE seq <= ?", (upto,))
            db.execute(
                "INSERT INTO meta (name, value) VALUES ('trimmed', ?) ON CONFLICT (name) DO UPDATE SET value = ?",
                (upto, upto),
            )

    # -- the primitives ----------------------------------------------------------------------------------------------

    async def _put(self, instance: Instance, ttl: float) -> Instance:
        now = self.clock.wall()
        descriptor = instance.descriptor()
        self._writes += 1
        trim = self._writes % 100 == 1

        def put(db: sqlite3.Connection) -> Instance:
            self._reap(db, instance.service, now)
            before = db.execute(
                "SELECT descriptor, status, registered, last_seen FROM instances WHERE service = ? AND id = ?",
                (instance.service, instance.id),
            ).fetchone()
            registered = before[2] if before else now
            row = (descriptor, str(instance.status), registered, now)
            db.execute(
                "INSERT INTO instances (service, id, descriptor, status, registered, last_seen, ttl, expires)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (service, id) DO UPDATE SET descriptor = excluded.descriptor, status = excluded.status,"
                " last_seen = excluded.last_seen, ttl = excluded.ttl, expires = excluded.expires",
                (instance.service, instance.id, *row, ttl, now + ttl),
            )
            if before is None:
                self._log(db, instance.service, "added", instance.id, row, now)
            elif tuple(before[:2]) != row[:2]:
                self._log(db, instance.service, "changed", instance.id, row, now)
            if trim:
                self._trim(db, now)
            return _instance(row)

        return await self._run(self._write(put))

    async def _touch(self, service: str, instance_id: str) -> bool:
        now = self.clock.wall()

        def touch(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE instances SET last_seen = ?, expires = ? + ttl WHERE service = ? AND id = ? AND expires > ?",
                (now, now, service, instance_id, now),
            )
            return cur.rowcount == 1

        return await self._run(self._write(touch))

    async def _remove(self, service: str, instance_id: str) -> bool:
        now = self.clock.wall()

        def remove(db: sqlite3.Connection) -> bool:
            self._reap(db, service, now)
            gone = db.execute(
                "DELETE FROM instances WHERE service = ? AND id = ? RETURNING id", (service, instance_id)
            ).fetchone()
            if gone is None:
                return False
            self._log(db, service, "removed", instance_id, None, now)
            return True

        return await self._run(self._write(remove))

    async def _set_status(self, service: str, instance_id: str, status: HealthStatus) -> bool:
        now = self.clock.wall()

        def set_status(db: sqlite3.Connection) -> bool:
            self._reap(db, service, now)
            row = db.execute(
                "SELECT descriptor, status, registered, last_seen FROM instances WHERE service = ? AND id = ?",
                (service, instance_id),
            ).fetchone()
            if row is None:
                return False
            if row[1] != str(status):
                db.execute(
                    "UPDATE instances SET status = ? WHERE service = ? AND id = ?", (str(status), service, instance_id)
                )
                self._log(db, service, "changed", instance_id, (row[0], str(status), row[2], row[3]), now)
            return True

        return await self._run(self._write(set_status))

    async def _list(self, service: str) -> list[Instance]:
        now = self.clock.wall()

        def read(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return db.execute(
                "SELECT descriptor, status, registered, last_seen FROM instances WHERE service = ? AND expires > ?",
                (service, now),
            ).fetchall()

        return [_instance(row) for row in await self._run(read)]

    async def _snapshot(self, service: str) -> tuple[list[Instance], str]:
        now = self.clock.wall()

        def read(db: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int]:
            db.execute("BEGIN")  # one read transaction: the rows and the cursor are of one moment
            try:
                rows = db.execute(
                    "SELECT descriptor, status, registered, last_seen FROM instances WHERE service = ? AND expires > ?",
                    (service, now),
                ).fetchall()
                (cursor,) = db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
            finally:
                db.execute("COMMIT")
            return rows, int(cursor)

        rows, cursor = await self._run(read)
        return [_instance(row) for row in rows], str(cursor)

    async def _changes(self, service: str, cursor: str) -> tuple[list[LogEntry], str]:
        now = self.clock.wall()
        after = int(cursor)

        def read(db: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int, float]:
            expired = db.execute(
                "SELECT 1 FROM instances WHERE service = ? AND expires <= ? LIMIT 1", (service, now)
            ).fetchone()
            if expired is not None:
                self._write(lambda d: self._reap(d, service, now))(db)
            db.execute("BEGIN")
            try:
                rows = db.execute(
                    "SELECT seq, kind, id, descriptor, status, registered, last_seen FROM changes"
                    " WHERE service = ? AND seq > ? ORDER BY seq",
                    (service, after),
                ).fetchall()
                trimmed = db.execute("SELECT value FROM meta WHERE name = 'trimmed'").fetchone()
            finally:
                db.execute("COMMIT")
            return rows, after if not rows else int(rows[-1][0]), float(trimmed[0]) if trimmed else 0.0

        rows, new_cursor, trimmed = await self._run(read)
        if after < trimmed:
            raise Resync
        if not rows:
            await self._wait_or_close(self.poll_interval)
            return [], cursor
        entries = [LogEntry(row[1], row[2], None if row[1] == "removed" else _instance(row[3:])) for row in rows]
        return entries, str(new_cursor)

    async def _aclose(self) -> None:
        if self._executor is None:
            self._shut = True
            return

        def close(db: sqlite3.Connection) -> None:
            db.close()

        if self._db is not None:
            await self._run(close)
            self._db = None
        self._shut = True
        self._executor.shutdown(wait=True)
        self._executor = None


_OPTIONS: dict[str, Parser] = {"poll_interval": float, "retention": float}


def from_url(url: str, **options: Any) -> SqliteRegistry:
    """``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (options: ``poll_interval``,
    ``retention``, ``clock``; the first two also as query parameters)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc or len(parts.path) < 2:
        raise ConfigurationError(
            f"not a SQLite registry URL: {url!r}", hint="use sqlite:///relative/file.db or sqlite:////absolute/file.db"
        )
    given, _ = url_options(url, _OPTIONS, options, what="SQLite registry", keywords=("clock",))
    return SqliteRegistry(parts.path[1:], **given)
