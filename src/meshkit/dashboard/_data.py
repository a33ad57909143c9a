"""What the dashboard's Sagas page reads: every service's sagas and projections, from the database they share.

The dashboard only reads: it never runs, recovers or rebuilds anything. The runner opens the database
(``[database] url``) and hands it over; the tables are created if no service made them yet, so an empty system
shows empty lists rather than errors.
"""

from __future__ import annotations

from typing import Any, Final

from meshkit._core.database import Database
from meshkit.eventsourcing import EventStore
from meshkit.projections import CHECKPOINTS, read_status
from meshkit.saga import Sagas

__all__ = ["SAGA_STATUSES", "DataSource"]

SAGA_STATUSES: Final = ("running", "compensating", "completed", "compensated", "failed")


class DataSource:
    """Sagas and projections as JSON rows (see docs/dashboard.md for their keys)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._sagas = Sagas(database, owner="dashboard")
        self._store = EventStore(database)
        self._migrated = False

    async def _ready(self) -> None:
        if not self._migrated:
            await self._sagas.migrate()
            await self._store.migrate()
            await self.database.migrate(CHECKPOINTS)
            self._migrated = True

    async def sagas(self, *, status: str | None, name: str | None, limit: int) -> list[dict[str, Any]]:
        await self._ready()
        records = await self._sagas.list(name=name, status=status, limit=limit)
        return [{k: v for k, v in r.to_dict().items() if k not in ("data", "results", "steps")} for r in records]

    async def saga(self, saga_id: str) -> dict[str, Any] | None:
        await self._ready()
        record = await self._sagas.get(saga_id)
        return record.to_dict() if record is not None else None

    async def projections(self) -> list[dict[str, Any]]:
        await self._ready()
        return [status.to_dict() for status in await read_status(self._store, self.database)]
