"""The saga tables and every statement on them (portable SQL: the same text runs on SQLite and PostgreSQL).

``meshkit_sagas`` holds one row per saga. Besides what :class:`SagaRecord` shows it keeps:

- ``step_index``: while running, the index of the step in flight (or next); while compensating, how many of the
  first steps are still to be undone (the next compensation is of ``steps[step_index - 1]``).
- ``lease``: a token that changes whenever a process takes the saga over. Every write of the process running the
  saga names the lease it holds, so a process that lost the saga (it was slow, not dead, and another recovered it)
  cannot write over the new holder's progress: its next write finds no row and it stops.
- ``trace``: the ``traceparent`` of the span that started the saga, for the span of a recovery to link to.

``meshkit_saga_steps`` is the step log: one row per attempt at an action or a compensation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from meshkit._core.database import Database, Row, Transaction
from meshkit.saga._record import ACTIVE, Phase, SagaRecord, SagaStatus, StepLog, StepStatus

__all__ = ["SCHEMA", "Lost", "Store", "Stored"]

_SAGAS_DDL = """
CREATE TABLE IF NOT EXISTS meshkit_sagas (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    data TEXT NOT NULL,
    results TEXT NOT NULL,
    error TEXT,
    failed_step TEXT,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    step_index BIGINT NOT NULL,
    lease TEXT NOT NULL,
    trace TEXT
);
CREATE INDEX IF NOT EXISTS meshkit_sagas_by_owner ON meshkit_sagas (owner, status, updated);
CREATE INDEX IF NOT EXISTS meshkit_sagas_by_created ON meshkit_sagas (created);
CREATE TABLE IF NOT EXISTS meshkit_saga_steps (
    saga_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    step TEXT NOT NULL,
    phase TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    started DOUBLE PRECISION NOT NULL,
    ended DOUBLE PRECISION,
    PRIMARY KEY (saga_id, seq)
);
"""

#: The same DDL serves both engines: it uses only the types both store alike.
SCHEMA: Mapping[str, str] = {"sqlite": _SAGAS_DDL, "postgresql": _SAGAS_DDL}

_COLUMNS = "id, name, owner, status, data, results, error, failed_step, created, updated, step_index, lease, trace"
_STEP_COLUMNS = "saga_id, step, phase, status, error, started, ended, attempt"
#: The saga columns a transition may change (names are never taken from callers' strings).
_CHANGEABLE = frozenset({"status", "results", "error", "failed_step", "step_index"})
_ACTIVE_SQL = ", ".join(f"'{status}'" for status in ACTIVE)
# Statements built once from the constants above (no caller's text ever goes into SQL).
_INSERT = (
    f"INSERT INTO meshkit_sagas ({_COLUMNS})"  # noqa: S608
    " VALUES (?, ?, ?, 'running', ?, '{}', NULL, NULL, ?, ?, 0, ?, ?)"
)
_STALE = (
    "SELECT id, name, lease, updated FROM meshkit_sagas"  # noqa: S608
    f" WHERE owner = ? AND status IN ({_ACTIVE_SQL}) AND updated < ?{{names}} ORDER BY updated LIMIT ?"
)
_CLAIM = (
    "UPDATE meshkit_sagas SET lease = ?, updated = ?"  # noqa: S608
    f" WHERE id = ? AND lease = ? AND updated = ? AND status IN ({_ACTIVE_SQL})"
)
_SELECT = f"SELECT {_COLUMNS} FROM meshkit_sagas"  # noqa: S608
_SELECT_STEPS = f"SELECT {_STEP_COLUMNS} FROM meshkit_saga_steps"  # noqa: S608


class Lost(Exception):
    """The saga's lease is no longer ours: another process took it over. Internal: the orchestrator stops."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A saga row with what only the orchestrator needs (the record is what everybody else sees)."""

    record: SagaRecord
    step_index: int
    lease: str
    trace: str | None


def _record(row: Row, steps: list[StepLog]) -> Stored:
    (saga_id, name, owner, status, data, results, error, failed_step, created, updated, index, lease, trace) = row
    record = SagaRecord(
        id=saga_id,
        name=name,
        owner=owner,
        status=cast(SagaStatus, status),
        data=json.loads(data),
        results=json.loads(results),
        error=error,
        failed_step=failed_step,
        created=float(created),
        updated=float(updated),
        steps=steps,
    )
    return Stored(record, int(index), lease, trace)


def _step(row: Row) -> StepLog:
    _, step, phase, status, error, started, ended, attempt = row
    return StepLog(
        step=step,
        phase=cast(Phase, phase),
        status=cast(StepStatus, status),
        error=error,
        started=float(started),
        ended=None if ended is None else float(ended),
        attempt=int(attempt),
    )


class Store:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def migrate(self) -> None:
        await self.database.migrate(SCHEMA)

    async def create(
        self, saga_id: str, name: str, owner: str, data: str, *, lease: str, now: float, trace: str | None
    ) -> None:
        """A new running saga (``ConflictError`` if the id is taken)."""
        async with self.database.transaction() as tx:
            await tx.execute(
                _INSERT,
                saga_id,
                name,
                owner,
                data,
                now,
                now,
                lease,
                trace,
            )

    async def _change(self, tx: Transaction, saga_id: str, lease: str, now: float, changes: Mapping[str, Any]) -> None:
        unknown = set(changes) - _CHANGEABLE
        if unknown:
            raise ValueError(f"not changeable: {sorted(unknown)}")
        columns = "".join(f", {column} = ?" for column in changes)
        changed = await tx.execute(
            f"UPDATE meshkit_sagas SET updated = ?{columns} WHERE id = ? AND lease = ?",  # noqa: S608 (known columns)
            now,
            *changes.values(),
            saga_id,
            lease,
        )
        if changed != 1:
            raise Lost(saga_id)

    async def begin(
        self,
        saga_id: str,
        lease: str,
        now: float,
        *,
        step: str,
        phase: Phase,
        attempt: int,
        changes: Mapping[str, Any] | None = None,
    ) -> int:
        """Log the start of an attempt (and apply ``changes`` to the saga row) in one transaction; returns the log
        entry's number."""
        async with self.database.transaction() as tx:
            await self._change(tx, saga_id, lease, now, changes or {})
            row = await tx.fetchone("SELECT COALESCE(MAX(seq), 0) FROM meshkit_saga_steps WHERE saga_id = ?", saga_id)
            seq = int(row[0] if row else 0) + 1
            await tx.execute(
                "INSERT INTO meshkit_saga_steps (saga_id, seq, step, phase, attempt, status, error, started, ended)"
                " VALUES (?, ?, ?, ?, ?, 'running', NULL, ?, NULL)",
                saga_id,
                seq,
                step,
                phase,
                attempt,
                now,
            )
        return seq

    async def end(
        self,
        saga_id: str,
        lease: str,
        now: float,
        *,
        seq: int | None,
        status: StepStatus = "done",
        error: str | None = None,
        changes: Mapping[str, Any] | None = None,
    ) -> None:
        """Log the outcome of attempt ``seq`` (if any) and apply ``changes`` to the saga row, in one transaction."""
        async with self.database.transaction() as tx:
            await self._change(tx, saga_id, lease, now, changes or {})
            if seq is not None:
                await tx.execute(
                    "UPDATE meshkit_saga_steps SET status = ?, error = ?, ended = ? WHERE saga_id = ? AND seq = ?",
                    status,
                    error,
                    now,
                    saga_id,
                    seq,
                )

    async def touch(self, saga_id: str, lease: str, now: float) -> bool:
        """Refresh ``updated`` (so the saga is not taken for stale); False if the lease is lost."""
        async with self.database.transaction() as tx:
            changed = await tx.execute(
                "UPDATE meshkit_sagas SET updated = ? WHERE id = ? AND lease = ?", now, saga_id, lease
            )
        return changed == 1

    async def stale(
        self, owner: str, names: list[str], before: float, limit: int, *, known: bool
    ) -> list[tuple[str, str, str, float]]:
        """``(id, name, lease, updated)`` of ``owner``'s unfinished sagas last updated before ``before``, whose
        name is in ``names`` (``known``) or is not."""
        if not names:
            if known:
                return []
            where = ""
        else:
            where = f" AND name {'IN' if known else 'NOT IN'} ({', '.join('?' * len(names))})"
        rows = await self.database.fetch(_STALE.format(names=where), owner, before, *names, limit)
        return [(row[0], row[1], row[2], float(row[3])) for row in rows]

    async def claim(self, saga_id: str, *, lease: str, updated: float, new_lease: str, now: float) -> bool:
        """Take a stale saga over: compare-and-set on its lease and ``updated`` (of two processes that try, one
        wins). Attempts it left ``running`` are marked failed: they were interrupted."""
        async with self.database.transaction() as tx:
            changed = await tx.execute(
                _CLAIM,
                new_lease,
                now,
                saga_id,
                lease,
                updated,
            )
            if changed != 1:
                return False
            await tx.execute(
                "UPDATE meshkit_saga_steps SET status = 'failed', error = ?, ended = ?"
                " WHERE saga_id = ? AND status = 'running'",
                "interrupted: the process running it stopped; the saga was recovered",
                now,
                saga_id,
            )
        return True

    async def load(self, saga_id: str) -> Stored | None:
        async with self.database.transaction() as tx:
            row = await tx.fetchone(f"{_SELECT} WHERE id = ?", saga_id)
            if row is None:
                return None
            steps = await tx.fetch(f"{_SELECT_STEPS} WHERE saga_id = ? ORDER BY seq", saga_id)
        return _record(row, [_step(step) for step in steps])

    async def list_records(self, *, name: str | None, status: str | None, limit: int) -> list[SagaRecord]:
        where: list[str] = []
        params: list[Any] = []
        if name is not None:
            where.append("name = ?")
            params.append(name)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        async with self.database.transaction() as tx:
            rows = await tx.fetch(f"{_SELECT}{clause} ORDER BY created DESC, id DESC LIMIT ?", *params, limit)
            by_saga: dict[str, list[StepLog]] = {row[0]: [] for row in rows}
            if by_saga:
                marks = ", ".join("?" for _ in by_saga)
                for step in await tx.fetch(
                    f"{_SELECT_STEPS} WHERE saga_id IN ({marks}) ORDER BY saga_id, seq",
                    *by_saga,
                ):
                    by_saga[step[0]].append(_step(step))
        return [_record(row, by_saga[row[0]]).record for row in rows]
