"""The projector: runs projections, each in its own task, from the event store's global log into read models.

Each batch of events is applied and the projection's checkpoint advanced in ONE transaction of the read model's
database, so a read model in that database gets every event exactly once, even when the process crashes mid-batch
or several replicas run the same projector (each batch locks the checkpoint row and skips what is already applied).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from meshkit._core.database import Database, Transaction
from meshkit.errors import ConfigurationError, TimeoutExceeded
from meshkit.eventsourcing import EventStore, RecordedEvent
from meshkit.projections.projection import Projection, ProjectionStatus
from meshkit.resilience.backoff import Exponential
from meshkit.tracing.spans import span

__all__ = ["CHECKPOINTS", "Projector", "read_status"]

log = logging.getLogger("meshkit.projections")

_TABLE = """
CREATE TABLE IF NOT EXISTS meshkit_projections (
    name TEXT NOT NULL PRIMARY KEY,
    position BIGINT NOT NULL,
    updated DOUBLE PRECISION,
    error TEXT
);
"""
#: The checkpoint table (one row per projection), in the read models' database.
CHECKPOINTS = {"sqlite": _TABLE, "postgresql": _TABLE}

_FIRST_BACKOFF = 0.05


class _Moved(Exception):
    """The stored checkpoint is not where this process left it: another replica advanced it, or a rebuild (here or
    in another process) reset it. The batch read from the old position is dropped and reading starts again."""

    def __init__(self, position: int) -> None:
        super().__init__(f"the checkpoint moved to {position}")
        self.position = position


class _HandlerFailed(Exception):
    def __init__(self, event: RecordedEvent) -> None:
        super().__init__(f"at event {event.position} ({event.type} of {event.stream})")
        self.event = event


@dataclass(eq=False)
class _Running:
    projection: Projection
    position: int = 0
    updated: float | None = None
    error: str | None = None
    failures: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Projector:
    """Runs projections from ``store`` into read models in ``database`` (usually the store's own database)::

        projector = Projector(store, database, tracer=tracer)
        projector.add(Projection("account_balances", balances, schema=ddl))
        await projector.start()
        ...
        await projector.aclose()

    Each projection wakes when this process appends to ``store`` and polls every ``poll_interval`` seconds for
    appends of other processes; it reads up to ``batch_size`` events at a time. A handler that raises stops its
    projection at that event (``status()`` shows the error) and is retried with backoff up to ``max_backoff``
    seconds; the other projections go on.
    """

    def __init__(
        self,
        store: EventStore,
        database: Database,
        *,
        tracer: Any = None,
        poll_interval: float = 0.5,
        batch_size: int = 100,
        max_backoff: float = 5.0,
    ) -> None:
        if poll_interval <= 0:
            raise ConfigurationError(f"poll_interval must be above 0, not {poll_interval!r}")
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size!r}")
        if max_backoff < _FIRST_BACKOFF:
            raise ConfigurationError(f"max_backoff must be at least {_FIRST_BACKOFF}, not {max_backoff!r}")
        self.store = store
        self.database = database
        self.tracer = tracer
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.max_backoff = max_backoff
        self._backoff = Exponential(_FIRST_BACKOFF, cap=max_backoff, jitter="none")
        self._runs: dict[str, _Running] = {}
        self._started = False
        self._closed = False
        self._unsubscribe: Any = None
        self._progress = asyncio.Event()

    @property
    def projections(self) -> list[Projection]:
        return [run.projection for run in self._runs.values()]

    def add(self, projection: Projection) -> Projection:
        """Run ``projection`` (before :meth:`start`); returns it."""
        if self._started:
            raise ConfigurationError(f"add projection {projection.name!r} before the projector starts")
        if projection.name in self._runs:
            raise ConfigurationError(f"a projection named {projection.name!r} is already added")
        self._runs[projection.name] = _Running(projection)
        return projection

    async def start(self) -> None:
        """Create the checkpoint table and each projection's schema, then run each projection in its own task."""
        if self._closed:
            raise ConfigurationError("this projector is closed; make a new one")
        if self._started:
            return
        await self.store.migrate()
        await self.database.migrate(CHECKPOINTS)
        for run in self._runs.values():
            if run.projection.schema is not None:
                await self.database.migrate(run.projection.schema)
        async with self.database.transaction() as tx:
            for name, run in self._runs.items():
                await tx.execute(
                    "INSERT INTO meshkit_projections (name, position, updated) VALUES (?, 0, NULL)"
                    " ON CONFLICT (name) DO NOTHING",
                    name,
                )
                row = await tx.fetchone("SELECT position, updated FROM meshkit_projections WHERE name = ?", name)
                assert row is not None
                run.position, run.updated = int(row[0]), row[1]
        self._unsubscribe = self.store.on_append(self._woken)
        self._started = True
        for run in self._runs.values():
            self._launch(run)

    async def __aenter__(self) -> Projector:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every projection's task and wait for it (safe to call twice)."""
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        for run in self._runs.values():
            run.task = None
        await _cancel(tasks)

    # -- status -----------------------------------------------------------------------------------------------------

    async def status(self) -> list[ProjectionStatus]:
        """Each projection's checkpoint as committed (whichever replica advanced it), the head, lag and error."""
        self._check_started()
        head = await self.store.head()
        async with self.database.transaction() as tx:
            rows = await tx.fetch("SELECT name, position, updated FROM meshkit_projections")
        stored = {name: (int(position), updated) for name, position, updated in rows}
        statuses = []
        for name, run in self._runs.items():
            position, updated = stored.get(name, (run.position, run.updated))
            statuses.append(ProjectionStatus(name, position, head, max(head - position, 0), updated, run.error))
        return statuses

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until every projection's checkpoint reaches the store's head as it is now;
        :class:`~meshkit.errors.TimeoutExceeded` (naming the projections behind, and their errors) otherwise."""
        self._check_started()
        head = await self.store.head()
        deadline = time.monotonic() + timeout
        while True:
            self._progress.clear()
            behind = [run for run in self._runs.values() if run.position < head]
            if not behind:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                lagging = ", ".join(
                    f"{run.projection.name} at {run.position}" + (f" ({run.error})" if run.error else "")
                    for run in behind
                )
                raise TimeoutExceeded(
                    f"projections not caught up to {head} after {timeout:g}s: {lagging}", timeout=timeout
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, self.poll_interval)):
                    await self._progress.wait()

    # -- rebuild ----------------------------------------------------------------------------------------------------

    async def rebuild(self, name: str) -> None:
        """Replay every event into projection ``name``: stop it, run its ``reset`` hook and set its checkpoint to 0
        in one transaction, and start it again. Wait with :meth:`wait_caught_up`."""
        run = self._runs.get(name)
        if run is None:
            known = ", ".join(sorted(self._runs)) or "none"
            raise ConfigurationError(f"no projection named {name!r} (known: {known})")
        self._check_started()
        task, run.task = run.task, None
        await _cancel([task] if task is not None else [])
        try:
            async with self.database.transaction() as tx:
                await self._lock_checkpoint(tx, name)
                if run.projection.reset is not None:
                    await run.projection.reset(tx)
                now = time.time()
                await tx.execute("UPDATE meshkit_projections SET position = 0, updated = ? WHERE name = ?", now, name)
            run.position, run.updated, run.error, run.failures = 0, now, None, 0
            log.info("projection %s rebuilding", name, extra={"projection": name})
        finally:
            if not self._closed:
                self._launch(run)

    # -- the loop ---------------------------------------------------------------------------------------------------

    def _check_started(self) -> None:
        if not self._started:
            raise ConfigurationError("the projector is not started: await projector.start() first")

    def _woken(self, events: object) -> None:
        for run in self._runs.values():
            run.wake.set()

    def _launch(self, run: _Running) -> None:
        run.task = asyncio.create_task(self._run(run), name=f"meshkit projection {run.projection.name}")

    async def _run(self, run: _Running) -> None:
        name = run.projection.name
        while True:
            try:
                moved = await self._step(run)
            except Exception as exc:
                run.failures += 1
                event = exc.event if isinstance(exc, _HandlerFailed) else None
                cause = exc.__cause__ if event is not None and exc.__cause__ is not None else exc
                error = f"{type(cause).__name__}: {cause}" + (f" {exc}" if event is not None else "")
                extra = {
                    "projection": name,
                    "position": run.position,
                    "attempt": run.failures,
                    "event_position": event.position if event else None,
                    "event_type": event.type if event else None,
                    "stream": event.stream if event else None,
                }
                # the first failure (or a new one) at full level; the same one again at debug, not a flood
                level = logging.ERROR if error != run.error else logging.DEBUG
                log.log(level, "projection %s stopped: %s", name, error, exc_info=exc, extra=extra)
                if error != run.error:
                    await self._keep_error(name, error)
                run.error = error
                await asyncio.sleep(self._backoff.delay(run.failures))
                continue
            if run.error is not None:
                log.info("projection %s runs again", name, extra={"projection": name, "position": run.position})
                run.error, run.failures = None, 0
                await self._keep_error(name, None)
            if not moved:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await run.wake.wait()

    async def _step(self, run: _Running) -> bool:
        """Apply the next batch; False when there was nothing to read."""
        run.wake.clear()  # before reading: an append from now on wakes the next wait
        head = await self.store.head()
        if head <= run.position:
            return False
        events = await self.store.read_all(run.position, self.batch_size, types=run.projection.types, until=head)
        # every event up to `head` is committed (appends commit in position order), so a short page ends at head
        target = events[-1].position if len(events) == self.batch_size else head
        try:
            try:
                await self._commit(run, events, target)
            except _HandlerFailed:
                if len(events) <= 1:
                    raise
                # find the failing event: one transaction per event up to it, so the checkpoint stops right before
                for event in events:
                    await self._commit(run, [event], event.position)
                await self._commit(run, [], target)
        except _Moved as moved:
            run.position = moved.position  # read again from where the checkpoint is
        return True

    async def _commit(self, run: _Running, events: list[RecordedEvent], target: int) -> None:
        projection = run.projection
        name = projection.name
        attributes = {
            "db.system": self.database.dialect,
            "meshkit.projection.name": name,
            "meshkit.projection.events": len(events),
            "meshkit.projection.position": target,
        }
        moved: int | None = None
        with span(self.tracer if events else None, f"projection {name}", attributes=attributes):
            async with self.database.transaction() as tx:
                current = await self._lock_checkpoint(tx, name)
                if current != run.position:
                    # the events were read after run.position: behind a reset checkpoint they would skip the
                    # ones before it for good, ahead of it they are stale; drop them (nothing is written)
                    moved = position = current
                    events = []
                for event in events:
                    try:
                        await projection.handler(tx, event)
                    except Exception as exc:
                        raise _HandlerFailed(event) from exc
                if moved is None:
                    position = target
                    now = time.time()
                    if position != current:
                        await tx.execute(
                            "UPDATE meshkit_projections SET position = ?, updated = ? WHERE name = ?",
                            position,
                            now,
                            name,
                        )
        if moved is not None:
            raise _Moved(moved)
        if position != run.position:
            run.position = position
            run.updated = now
            self._progress.set()

    async def _keep_error(self, name: str, error: str | None) -> None:
        """Keep why the projection stopped beside its checkpoint, so other processes (the dashboard) see it too."""
        try:
            await self.database.execute("UPDATE meshkit_projections SET error = ? WHERE name = ?", error, name)
        except Exception:  # the database may be what failed: the in-process status still has it
            log.debug("cannot record the error of projection %s", name, exc_info=True, extra={"projection": name})

    async def _lock_checkpoint(self, tx: Transaction, name: str) -> int:
        lock = " FOR UPDATE" if tx.dialect == "postgresql" else ""  # SQLite: the transaction holds the write lock
        row = await tx.fetchone(f"SELECT position FROM meshkit_projections WHERE name = ?{lock}", name)  # noqa: S608
        if row is None:
            raise ConfigurationError(f"projection {name!r} has no checkpoint row; was it added before start()?")
        return int(row[0])


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def read_status(store: EventStore, database: Database) -> list[ProjectionStatus]:
    """Every projection's status as the database has it (whichever process runs it), by name: for a reader that
    runs no projection itself, such as the dashboard. The checkpoint table must exist (``database.migrate(
    CHECKPOINTS)`` makes it, as a projector's start does)."""
    head = await store.head()
    rows = await database.fetch("SELECT name, position, updated, error FROM meshkit_projections ORDER BY name")
    return [
        ProjectionStatus(name, int(position), head, max(head - int(position), 0), updated, error)
        for name, position, updated, error in rows
    ]
