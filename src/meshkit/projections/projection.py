"""A projection (a handler that turns events into a read model) and its status."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from meshkit._core.database import Transaction
from meshkit.errors import ConfigurationError
from meshkit.eventsourcing import RecordedEvent

__all__ = ["Handler", "Projection", "ProjectionStatus", "Reset"]

#: ``async def handler(tx, event)``: write the read model for one event with ``tx`` (the checkpoint's transaction).
Handler = Callable[[Transaction, RecordedEvent], Awaitable[None]]
#: ``async def reset(tx)``: empty the read model before a rebuild replays every event.
Reset = Callable[[Transaction], Awaitable[None]]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")


@dataclass(frozen=True, slots=True)
class Projection:
    """A read model built from the event store's global log::

        async def balances(tx: Transaction, event: RecordedEvent) -> None:
            await tx.execute("UPDATE balances SET amount = amount + ? WHERE account = ?", ...)

        Projection("account_balances", balances, schema={"sqlite": ddl, "postgresql": ddl},
                   types={"AccountOpened", "MoneyDeposited", "MoneyWithdrawn"},
                   reset=lambda tx: tx.execute("DELETE FROM balances"))

    ``name`` keys its checkpoint (keep it stable). ``schema`` is DDL run at start (``CREATE TABLE IF NOT EXISTS``).
    ``types`` keeps only events of those types (None: all). ``reset`` empties the read model for a rebuild.
    """

    name: str
    handler: Handler
    schema: Mapping[str, str] | None = None
    types: Collection[str] | None = None
    reset: Reset | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"bad projection name {self.name!r}: use 1 to 200 letters, digits and _ . : - "
                "(such as 'account_balances')"
            )
        if not callable(self.handler):
            raise ConfigurationError(f"the handler of projection {self.name!r} must be an async function (tx, event)")
        if self.types is not None:
            if isinstance(self.types, str):
                raise ConfigurationError(
                    f"types of projection {self.name!r} is a collection of event types, not one str"
                )
            object.__setattr__(self, "types", frozenset(self.types))


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """Where a projection is: its checkpoint ``position``, the store's ``head``, ``lag = head - position``,
    ``updated`` (Unix seconds of its last checkpoint, None before the first) and the ``error`` that stops it
    (None when it runs)."""

    name: str
    position: int
    head: int
    lag: int
    updated: float | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "position": self.position,
            "head": self.head,
            "lag": self.lag,
            "updated": self.updated,
            "error": self.error,
        }
