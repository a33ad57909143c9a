"""A tiny SQLite store for the example services: one file per service, calls run in a worker thread."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from meshkit import Service

T = TypeVar("T")


class Store:
    def __init__(self, schema: str) -> None:
        self._schema = schema
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    def attach(self, service: Service, filename: str) -> Store:
        """Open the store in the service's data folder when it starts, close it when it stops, and make the
        service's readiness depend on it."""

        @service.on_start
        async def open_store() -> None:
            await self.open(service.data_dir / filename)

        @service.on_stop
        async def close_store() -> None:
            await self.close()

        @service.readiness("database")
        async def database_answers() -> None:  # /readyz fails while the database does not answer
            await self.run("SELECT 1")

        return self

    async def open(self, path: Path) -> None:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(self._schema)
            return db

        self._db = await asyncio.to_thread(connect)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.to_thread(db.close)

    async def transaction(self, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
        """Several statements in one transaction; returns how many rows the first one changed."""
        db = self._db
        if db is None:
            raise RuntimeError("the store is not open")

        def run() -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                counts = [db.execute(sql, params).rowcount for sql, params in statements]
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return counts[0]

        return await self._on_thread(run)

    async def _on_thread(self, work: Callable[[], T]) -> T:
        """``work`` on a worker thread, one at a time; a caller cancelled meanwhile still waits for it to finish
        before the next one starts (they share the connection, and its transaction)."""
        async with self._lock:
            job = asyncio.ensure_future(asyncio.to_thread(work))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                await asyncio.wait([job])
                raise

    async def run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction (the replicas of a service share the file)."""
        db = self._db
        if db is None:
            raise RuntimeError("the store is not open")
        return await self._on_thread(lambda: db.execute(sql, params).fetchall())
