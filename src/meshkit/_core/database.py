"""The one way meshkit's data patterns reach their database: the outbox, sagas, the event store and read models.

::

    db = await connect_database("sqlite:///.meshkit/data.db")     # or postgresql://user@host:5432/app
    await db.migrate({"sqlite": "CREATE TABLE ...", "postgresql": "CREATE TABLE ..."})
    async with db.transaction() as tx:                           # every statement in it commits together
        await tx.execute("INSERT INTO orders (id, total) VALUES (?, ?)", order_id, total)
        rows = await tx.fetch("SELECT id FROM orders WHERE total > ?", 100)
    await db.aclose()

SQL is written once, with ``?`` placeholders, for both engines: PostgreSQL gets ``$1, $2, ...`` (a ``?`` inside a
quoted literal is left alone). Rows come back as tuples. Types that both engines store alike are what meshkit's own
tables use: ``TEXT``, ``BIGINT`` and ``DOUBLE PRECISION`` (times are Unix seconds), JSON kept as ``TEXT``.

- ``sqlite:///path`` (the embedded default): one connection on a thread the database owns, so the event loop never
  waits on disk. A transaction is ``BEGIN IMMEDIATE`` (taken fairly between processes: :mod:`meshkit._core.sqlite`)
  and holds the connection until it ends, so transactions of one process run one at a time, and several processes
  (replicas) share the file.
- ``postgresql://`` (or ``postgres://``): an asyncpg pool (``?pool_size=10``; ``sslmode`` and the like go to the
  driver). A transaction holds one pooled connection.

Errors are meshkit's: a unique key taken is :class:`~meshkit.errors.ConflictError`, any other refusal
:class:`~meshkit.errors.DatabaseError`, a server that cannot be reached :class:`~meshkit.errors.Unavailable`; the
driver's error is the ``__cause__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

from meshkit._core.optional import require
from meshkit._core.sqlite import begin_immediate
from meshkit._core.sqlite import open_database as open_sqlite
from meshkit._core.urls import redact, url_options
from meshkit.errors import ConfigurationError, ConflictError, DatabaseError, MeshkitError, Unavailable

__all__ = ["Database", "Dialect", "Row", "Transaction", "connect_database", "to_numbered"]

Dialect = Literal["sqlite", "postgresql"]
Row = tuple[Any, ...]
T = TypeVar("T")

log = logging.getLogger("meshkit.database")

_PG_DRIVER_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name", "target_session_attrs")


class Transaction(ABC):
    """One open transaction: what it runs commits together when the ``async with`` block ends, or not at all."""

    dialect: Dialect

    @abstractmethod
    async def execute(self, sql: str, *params: Any) -> int:
        """Run one statement; returns how many rows it changed."""

    @abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per parameter row."""

    @abstractmethod
    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        """Run one query; returns its rows."""

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        """The first row of a query (None when it has none)."""
        rows = await self.fetch(sql, *params)
        return rows[0] if rows else None


_OPEN: contextvars.ContextVar[tuple[Database, asyncio.Task[Any] | None] | None] = contextvars.ContextVar(
    "meshkit_open_transaction", default=None
)


class Database(ABC):
    """A database opened by :func:`connect_database`; close it with :meth:`aclose`."""

    dialect: Dialect
    url: str  # redacted: fit for logs and errors

    @contextlib.contextmanager
    def _entered(self) -> Iterator[None]:
        """Mark the current task as inside a transaction of this database, refusing a second one in it: the
        second would wait for the connection (or pool slot) the first holds, for ever."""
        task = asyncio.current_task()
        held = _OPEN.get()
        if held is not None and held[0] is self and held[1] is task:
            raise ConfigurationError(
                f"a transaction of {self.url} is already open in this task",
                hint="run the statement on the open transaction (tx.execute / tx.fetch), not on the database",
            )
        token = _OPEN.set((self, task))
        try:
            yield
        finally:
            _OPEN.reset(token)

    @abstractmethod
    def transaction(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """``async with db.transaction() as tx:`` one transaction (committed when the block ends without error)."""

    async def execute(self, sql: str, *params: Any) -> int:
        """One statement in its own transaction."""
        async with self.transaction() as tx:
            return await tx.execute(sql, *params)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        """One query in its own transaction."""
        async with self.transaction() as tx:
            return await tx.fetch(sql, *params)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        async with self.transaction() as tx:
            return await tx.fetchone(sql, *params)

    @abstractmethod
    async def migrate(self, schema: Mapping[str, str]) -> None:
        """Run the DDL script of this database's dialect (``CREATE TABLE IF NOT EXISTS ...``: safe to repeat, and
        safe when several processes start at once)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the connections; safe to call twice."""


async def connect_database(url: str, **options: Any) -> Database:
    """Open the database at ``url`` (``sqlite:///path`` or ``postgresql://...``) and check that it answers."""
    scheme = urlsplit(url).scheme
    database: Database
    if scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigurationError(
                f"bad SQLite database URL {redact(url)!r}", hint="use sqlite:///relative/file.db or sqlite:////abs.db"
            )
        url_options(url, {}, options, what="SQLite database")
        database = SQLiteDatabase(Path(path.split("?", 1)[0]))
    elif scheme in ("postgresql", "postgres"):
        known = {"pool_size": int, "connect_timeout": float}
        chosen, driver = url_options(url, known, options, what="PostgreSQL database", passthrough=_PG_DRIVER_OPTIONS)
        parts = urlsplit(url)
        dsn = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(driver), ""))
        database = PostgresDatabase(dsn, pool_size=chosen.get("pool_size", 10), timeout=chosen.get("connect_timeout"))
    else:
        raise ConfigurationError(
            f"unknown database URL scheme {scheme!r} in {redact(url)!r}",
            hint="use sqlite:///path (the default) or postgresql://user@host:5432/db",
        )
    try:
        await database.fetch("SELECT 1")
    except BaseException:
        await database.aclose()
        raise
    return database


# -- SQLite ---------------------------------------------------------------------------------------------------------


class SQLiteDatabase(Database):
    dialect: Dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="meshkit-database")
        self._lock = asyncio.Lock()  # one transaction at a time holds the connection

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        executor = self._executor
        if executor is None:
            raise ConfigurationError(f"the database {self.url} is closed")
        # The executor runs jobs in order on one thread, so a rollback queued by a cancelled transaction runs
        # before the next transaction's BEGIN even when nobody awaits it.
        future = asyncio.get_running_loop().run_in_executor(executor, self._call, fn)
        return await asyncio.shield(future)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._db = open_sqlite(self.path, "", what="database")
        try:
            return fn(self._db)
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                raise ConflictError(f"{exc} (in {self.url})") from exc
            raise DatabaseError(f"{exc} (in {self.url})") from exc
        except sqlite3.Error as exc:
            raise DatabaseError(f"{exc} (in {self.url})") from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        with self._entered():
            async with self._lock:
                # BEGIN goes to the thread with the first statement (one hop fewer per transaction: each hop is a
                # round trip through the executor); a transaction that ran nothing has nothing to end
                tx = _SQLiteTransaction(self)
                try:
                    yield tx
                except BaseException:
                    if tx.begun:
                        await self._run(_rollback)
                    raise
                if tx.begun:
                    await self._run(_commit)

    async def migrate(self, schema: Mapping[str, str]) -> None:
        script = _script(schema, self.dialect)

        def run(db: sqlite3.Connection) -> None:
            # one write transaction taken fairly: processes starting together on a new file take turns
            begin_immediate(db)
            try:
                for statement in _statements(script):
                    db.execute(statement)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        with self._entered():
            async with self._lock:
                await self._run(run)

    async def aclose(self) -> None:
        executor = self._executor
        if executor is None:
            return
        async with self._lock:  # after the transaction in flight, if any
            self._executor = None
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
        executor.shutdown(wait=True)

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


def _begin(db: sqlite3.Connection) -> None:
    if db.in_transaction:  # left open by a transaction whose owner was cancelled mid-statement
        db.execute("ROLLBACK")
    begin_immediate(db)


def _commit(db: sqlite3.Connection) -> None:
    db.execute("COMMIT")


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        db.execute("ROLLBACK")


class _SQLiteTransaction(Transaction):
    dialect: Dialect = "sqlite"

    def __init__(self, database: SQLiteDatabase) -> None:
        self._database = database
        self.begun = False

    async def _in_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self.begun:
            return await self._database._run(fn)
        self.begun = True  # from here on the block's end rolls back or commits, whatever this job does

        def begin_then(db: sqlite3.Connection) -> T:
            _begin(db)
            return fn(db)

        return await self._database._run(begin_then)

    async def execute(self, sql: str, *params: Any) -> int:
        return await self._in_transaction(lambda db: db.execute(sql, params).rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = [tuple(row) for row in rows]
        await self._in_transaction(lambda db: db.executemany(sql, batch))

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        return await self._in_transaction(lambda db: db.execute(sql, params).fetchall())


# -- PostgreSQL -----------------------------------------------------------------------------------------------------


class PostgresDatabase(Database):
    dialect: Dialect = "postgresql"

    def __init__(self, dsn: str, *, pool_size: int = 10, timeout: float | None = None) -> None:
        if pool_size < 1:
            raise ConfigurationError(f"pool_size must be at least 1, not {pool_size}")
        self._asyncpg = require("asyncpg", "postgres")
        self._dsn = dsn
        self.url = redact(dsn)
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: Any = None
        self._closed = False
        self._opening = asyncio.Lock()

    async def _acquire_pool(self) -> Any:
        if self._closed:
            raise ConfigurationError(f"the database {self.url} is closed")
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    extra = {"timeout": self._timeout} if self._timeout is not None else {}
                    with self._mapped():
                        self._pool = await self._asyncpg.create_pool(
                            self._dsn, min_size=1, max_size=self._pool_size, **extra
                        )
        return self._pool

    @contextlib.contextmanager
    def _mapped(self) -> Any:
        """Driver errors as meshkit's (see the module docstring)."""
        errors = self._asyncpg.exceptions
        try:
            yield
        except MeshkitError:
            raise
        except (errors.UniqueViolationError, errors.SerializationError, errors.DeadlockDetectedError) as exc:
            raise ConflictError(f"{exc} (in {self.url})") from exc
        except (OSError, errors.CannotConnectNowError, errors.ConnectionDoesNotExistError) as exc:
            raise Unavailable(f"cannot reach the database {self.url}: {exc}") from exc
        except (errors.PostgresError, errors.InterfaceError, errors.DataError) as exc:
            raise DatabaseError(f"{exc} (in {self.url})") from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        # Only the driver's own calls are mapped: an error the block raises (an OSError from an HTTP call, say)
        # goes through as it is.
        with self._entered():
            pool = await self._acquire_pool()
            with self._mapped():
                connection = await pool.acquire()
            try:
                transaction = connection.transaction()
                with self._mapped():
                    await transaction.start()
                try:
                    yield _PostgresTransaction(connection, self._mapped)
                except BaseException:
                    try:
                        await transaction.rollback()
                    except Exception:  # the connection is gone: the server rolled back; the block's error counts
                        log.debug("rollback failed on %s", self.url, exc_info=True)
                    raise
                with self._mapped():
                    await transaction.commit()
            finally:
                await pool.release(connection)

    async def migrate(self, schema: Mapping[str, str]) -> None:
        script = _script(schema, self.dialect)
        async with self.transaction() as tx:
            # several processes starting at once would race to create the same types: one at a time
            await tx.fetch("SELECT pg_advisory_xact_lock(7419263801)")
            assert isinstance(tx, _PostgresTransaction)
            with self._mapped():
                await tx.connection.execute(script)

    async def aclose(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


class _PostgresTransaction(Transaction):
    dialect: Dialect = "postgresql"

    def __init__(self, connection: Any, mapped: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self.connection = connection
        self._mapped = mapped

    async def execute(self, sql: str, *params: Any) -> int:
        with self._mapped():
            status: str = await self.connection.execute(to_numbered(sql), *params)
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._mapped():
            await self.connection.executemany(to_numbered(sql), [tuple(row) for row in rows])

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        with self._mapped():
            records = await self.connection.fetch(to_numbered(sql), *params)
        return [tuple(record) for record in records]


@functools.lru_cache(maxsize=512)
def to_numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (not inside '...' or "..." quotes)."""
    out: list[str] = []
    number = 0
    quote = ""
    for char in sql:
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "?":
            number += 1
            out.append(f"${number}")
            continue
        out.append(char)
    return "".join(out)


def _statements(script: str) -> list[str]:
    """The statements of a DDL script, split where ``sqlite3.complete_statement`` says one ends (a ``;`` inside a
    quoted literal or a trigger's body does not end one)."""
    out: list[str] = []
    start = 0
    for end, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start : end + 1]):
            out.append(script[start : end + 1].strip())
            start = end + 1
    rest = script[start:].strip()
    if rest:
        out.append(rest)
    return [statement for statement in out if statement.strip("; \n\t")]


def _script(schema: Mapping[str, str], dialect: Dialect) -> str:
    script = schema.get(dialect)
    if script is None:
        raise ConfigurationError(f"no {dialect} schema given", hint=f"pass {{'{dialect}': 'CREATE TABLE ...'}}")
    return script
