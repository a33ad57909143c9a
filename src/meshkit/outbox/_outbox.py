"""The :class:`Outbox`: transactions that publish, the relay that sends what they committed, and the inbox."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from meshkit._core.database import Database
from meshkit._core.ids import new_id
from meshkit.errors import ConfigurationError, MeshkitError, TimeoutExceeded
from meshkit.messaging import Broker, Message
from meshkit.outbox._schema import SCHEMA
from meshkit.outbox._transaction import InboxTransaction, OutboxTransaction
from meshkit.resilience.backoff import Exponential
from meshkit.tracing import extracted
from meshkit.tracing.spans import span

__all__ = ["Outbox"]

log = logging.getLogger("meshkit.outbox")

_BACKOFF = Exponential(0.1, cap=30.0, jitter="equal")


@dataclass(frozen=True, slots=True)
class _Row:
    seq: int
    id: str
    topic: str
    key: str | None
    type: str | None
    subject: str | None
    data: str
    headers: str
    trace: str


class _Discard(Exception):
    """Rolls back the transaction of a duplicate inbox message (caught by :meth:`Outbox.receive`)."""


class _PublishFailed(Exception):
    def __init__(self, row: _Row, cause: Exception) -> None:
        super().__init__(str(cause))
        self.row = row
        self.cause = cause


class Outbox:
    """A transactional outbox (and inbox) for the service ``source`` over ``database``, relaying to ``broker``.

    ``poll_interval`` is how often the relay looks for rows it was not told about (other processes' rows, leases
    that expired); a commit through this outbox wakes it at once. ``batch_size`` rows are claimed at a time, for
    ``lease`` seconds (renewed while the relay works through them). ``tracer`` (an OpenTelemetry tracer, or None)
    records an ``outbox relay <topic>`` producer span per message sent.

    ``await start()`` before use; ``await aclose()`` stops the relay (the database and the broker stay open: they
    belong to the caller). It is also an async context manager doing both.
    """

    def __init__(
        self,
        database: Database,
        broker: Broker,
        *,
        source: str,
        tracer: Any = None,
        poll_interval: float = 1.0,
        batch_size: int = 100,
        lease: float = 30.0,
    ) -> None:
        if not source:
            raise ConfigurationError("an outbox needs a source (the service name)")
        if not poll_interval > 0 or not lease > 0:
            raise ConfigurationError(f"poll_interval and lease must be positive, not {poll_interval} and {lease}")
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size}")
        self.database = database
        self.broker = broker
        self.source = source
        self.tracer = tracer
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.lease = lease
        #: how many messages this outbox's relay has sent since it started
        self.relayed = 0
        self._owner = new_id()  # this relay's name in claimed_by
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._stopping = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._starting = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the tables (if missing) and start the relay. Calling it again does nothing."""
        if self._closed:
            raise ConfigurationError("this outbox is closed", hint="make a new Outbox")
        async with self._starting:
            if self._started:
                return
            await self.database.migrate(SCHEMA)
            async with self.database.transaction() as tx:
                await tx.execute(
                    "INSERT INTO meshkit_outbox_sources (source) VALUES (?) ON CONFLICT (source) DO NOTHING",
                    self.source,
                )
            self._started = True
        # a fresh context: the relay must not inherit the caller's trace (each row brings its own)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"meshkit outbox relay {self.source}", context=contextvars.Context()
        )

    async def aclose(self, *, timeout: float = 5.0) -> None:
        """Stop the relay: the message being sent is finished (for up to ``timeout`` seconds, then it is
        cancelled), and the rows it claimed are released for other relays. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # (the loop catches its errors: this only waits for it)
        try:
            await self._release()
        except MeshkitError as exc:  # the database went first: the lease expires on its own
            log.debug("outbox claims not released", extra={"outbox_source": self.source, "error": str(exc)})

    async def __aenter__(self) -> Outbox:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _check_started(self) -> None:
        if self._closed:
            raise ConfigurationError("this outbox is closed", hint="make a new Outbox")
        if not self._started:
            raise ConfigurationError("this outbox is not started", hint="await outbox.start() first")

    # -- writing ---------------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[OutboxTransaction]:
        """``async with outbox.transaction() as tx:`` a database transaction whose ``tx.publish`` messages commit
        with its statements; the relay is woken once it commits. An error leaving the block rolls all of it
        back: nothing is published."""
        self._check_started()
        outbox_tx: OutboxTransaction | None = None
        try:
            async with self.database.transaction() as tx:
                outbox_tx = OutboxTransaction(tx, self.source)
                yield outbox_tx
                await outbox_tx._write()
        finally:
            if outbox_tx is not None:
                outbox_tx._close()
        if outbox_tx.published:
            self._wake.set()

    @contextlib.asynccontextmanager
    async def receive(self, message: Message, *, consumer: str) -> AsyncIterator[InboxTransaction]:
        """``async with outbox.receive(message, consumer="email") as tx:`` the transaction of an idempotent
        handler. The message is recorded as handled by ``consumer`` in the same transaction as the block's
        statements and publishes; ``tx.duplicate`` is True when ``consumer`` already handled it (same CloudEvents
        ``source`` and ``id``), and then the block changes nothing (it is rolled back whatever it runs)."""
        self._check_started()
        if not consumer:
            raise ConfigurationError("the inbox needs a consumer name (one per handler that must run once)")
        inbox_tx: InboxTransaction | None = None
        try:
            async with self.database.transaction() as tx:
                inserted = await tx.execute(
                    "INSERT INTO meshkit_inbox (consumer, source, message_id, topic, received) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (consumer, source, message_id) DO NOTHING",
                    consumer,
                    message.source,
                    message.id,
                    message.topic,
                    time.time(),
                )
                inbox_tx = InboxTransaction(tx, self.source, duplicate=inserted == 0)
                yield inbox_tx
                if inbox_tx.duplicate:
                    raise _Discard  # noqa: TRY301 - the way to roll the database transaction back
                await inbox_tx._write()
        except _Discard:
            log.debug(
                "duplicate message skipped",
                extra={"consumer": consumer, "topic": message.topic, "message_id": message.id},
            )
            return
        finally:
            if inbox_tx is not None:
                inbox_tx._close()
        if inbox_tx.published:
            self._wake.set()

    async def prune_inbox(self, older_than: float) -> int:
        """Forget inbox rows older than ``older_than`` seconds (keep longer than a message can be redelivered);
        returns how many were deleted."""
        self._check_started()
        return await self.database.execute("DELETE FROM meshkit_inbox WHERE received < ?", time.time() - older_than)

    # -- observing -------------------------------------------------------------------------------------------------

    async def pending(self) -> int:
        """How many messages of this source are written and not relayed yet."""
        row = await self.database.fetchone("SELECT COUNT(*) FROM meshkit_outbox WHERE source = ?", self.source)
        return int(row[0]) if row is not None else 0

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until every message of this source is relayed (by this relay or another process's); raises
        :class:`~meshkit.errors.TimeoutExceeded` after ``timeout`` seconds."""
        self._check_started()
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            left = await self.pending()
            if not left:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutExceeded(
                    f"{left} outbox message(s) of {self.source!r} still not relayed after {timeout:g}s",
                    timeout=timeout,
                )
            self._wake.set()
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.1)

    # -- the relay -------------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        delay = 0.0
        while not self._stopping:
            self._wake.clear()
            try:
                sent, more = await self._relay_batch()
            except Exception as exc:
                failures += 1
                delay = _BACKOFF.delay(failures, delay)
                failed = exc.row if isinstance(exc, _PublishFailed) else None
                cause = exc.cause if isinstance(exc, _PublishFailed) else exc
                log.warning(
                    "outbox relay failed; retrying" if failed is None else "outbox relay could not publish; retrying",
                    extra={
                        "outbox_source": self.source,
                        "topic": failed.topic if failed else None,
                        "message_id": failed.id if failed else None,
                        "attempt": failures,
                        "retry_in": round(delay, 3),
                        "error": f"{type(cause).__name__}: {cause}",
                    },
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                continue
            failures = 0
            delay = 0.0
            if sent:
                self.relayed += sent
            if more:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()

    async def _relay_batch(self) -> tuple[int, bool]:
        """Claim the head of this source's rows and publish them in order; returns how many were sent and whether
        there may be more right away."""
        rows = await self._claim()
        if not rows:
            return 0, False
        claimed_at = time.monotonic()
        done: list[str] = []
        remaining = len(rows)
        for row in rows:
            if self._stopping:
                break
            if time.monotonic() - claimed_at > self.lease / 2:  # keep the lease while working through the batch
                await self._settle(done)
                done = []
                if await self._renew() < remaining:
                    log.info(
                        "outbox lease lost to another relay", extra={"outbox_source": self.source, "left": remaining}
                    )
                    return len(rows) - remaining, True
                claimed_at = time.monotonic()
            try:
                await self._publish(row)
            except Exception as exc:
                await self._fail(done, row, exc)
                raise _PublishFailed(row, exc) from exc
            done.append(row.id)
            remaining -= 1
        await self._settle(done)
        return len(rows) - remaining, len(rows) == self.batch_size and not self._stopping

    async def _claim(self) -> list[_Row]:
        """The first ``batch_size`` rows of this source, claimed for ``lease`` seconds; none while another relay
        holds a live claim on this source (it is sending them, in order)."""
        now = time.time()
        async with self.database.transaction() as tx:
            # one claim of this source at a time (the row lock is held until commit on PostgreSQL)
            await tx.execute("UPDATE meshkit_outbox_sources SET claimed_at = ? WHERE source = ?", now, self.source)
            busy = await tx.fetchone(
                "SELECT 1 FROM meshkit_outbox WHERE source = ? AND claimed_by IS NOT NULL AND claimed_by <> ?"
                " AND claimed_until > ? LIMIT 1",
                self.source,
                self._owner,
                now,
            )
            if busy is not None:
                return []
            found = await tx.fetch(
                "SELECT seq, id, topic, msg_key, type, subject, data, headers, trace FROM meshkit_outbox"
                " WHERE source = ? ORDER BY seq LIMIT ?",
                self.source,
                self.batch_size,
            )
            if not found:
                return []
            await tx.execute(
                "UPDATE meshkit_outbox SET claimed_by = ?, claimed_until = ?"
                " WHERE source = ? AND seq >= ? AND seq <= ?",
                self._owner,
                now + self.lease,
                self.source,
                found[0][0],
                found[-1][0],
            )
        return [_Row(*row) for row in found]

    async def _renew(self) -> int:
        return await self.database.execute(
            "UPDATE meshkit_outbox SET claimed_until = ? WHERE claimed_by = ? AND source = ?",
            time.time() + self.lease,
            self._owner,
            self.source,
        )

    async def _publish(self, row: _Row) -> None:
        trace: dict[str, str] = json.loads(row.trace)
        headers: dict[str, str] = json.loads(row.headers)
        attributes = {
            "messaging.system": "meshkit",
            "messaging.destination.name": row.topic,
            "messaging.operation.type": "send",
            "messaging.message.id": row.id,
            "meshkit.outbox.source": self.source,
        }
        # the span's parent is the context of tx.publish; the broker carries the span's own context onwards
        with (
            extracted(trace),
            span(self.tracer, f"outbox relay {row.topic}", kind="producer", attributes=attributes),
        ):
            await self.broker.publish(
                row.topic,
                json.loads(row.data),
                key=row.key,
                headers=headers or None,
                id=row.id,
                type=row.type,
                subject=row.subject,
            )

    async def _settle(self, sent: list[str]) -> None:
        """Delete the rows that were sent."""
        if not sent:
            return
        async with self.database.transaction() as tx:
            await tx.executemany("DELETE FROM meshkit_outbox WHERE id = ?", [(i,) for i in sent])
            await tx.execute(
                "UPDATE meshkit_outbox_sources SET relayed = relayed + ? WHERE source = ?", len(sent), self.source
            )

    async def _fail(self, sent: list[str], row: _Row, exc: Exception) -> None:
        """After a failed publish: delete what was sent, note the error on the row, release the claims (another
        relay may take over; this one retries from the same row after a backoff)."""
        await self._settle(sent)
        async with self.database.transaction() as tx:
            await tx.execute(
                "UPDATE meshkit_outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                f"{type(exc).__name__}: {exc}"[:1000],
                row.id,
            )
            await tx.execute(
                "UPDATE meshkit_outbox SET claimed_by = NULL, claimed_until = 0 WHERE claimed_by = ?", self._owner
            )

    async def _release(self) -> None:
        await self.database.execute(
            "UPDATE meshkit_outbox SET claimed_by = NULL, claimed_until = 0 WHERE claimed_by = ?", self._owner
        )
