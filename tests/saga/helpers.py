"""Shared pieces of the saga tests: a journal of what steps did, and steps that succeed, fail or hang on cue."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from meshkit._core.database import Database, connect_database
from meshkit.saga import Saga, SagaContext, Sagas, Step
from meshkit.testing import eventually

__all__ = ["Journal", "backdate", "crash", "opened", "three_steps"]


class Journal:
    """Records every call of the steps it makes, in order (``"charge"``, ``"undo charge"``), and counts them."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()  # entries that raise
        self.fail_times: Counter[str] = Counter()  # entries that raise this many more times
        self.hang: set[str] = set()  # entries that block (until cancelled) the next time they run

    def count(self, entry: str) -> int:
        return self.calls.count(entry)

    async def _do(self, entry: str) -> None:
        self.calls.append(entry)
        if entry in self.hang:
            self.hang.discard(entry)
            await asyncio.Event().wait()  # a crash in the middle of it: only cancellation ends this
        if self.fail_times[entry] > 0:
            self.fail_times[entry] -= 1
            raise RuntimeError(f"{entry} broke (transient)")
        if entry in self.fail:
            raise RuntimeError(f"{entry} broke")

    def step(self, name: str, *, compensate: bool = True, retry: int = 0) -> Step:
        async def action(ctx: SagaContext) -> dict[str, Any]:
            await self._do(name)
            return {"step": name, "saw": sorted(ctx.results), "order": ctx.data.get("order")}

        async def undo(ctx: SagaContext) -> None:
            assert name in ctx.results, f"compensating {name} without its result"
            await self._do(f"undo {name}")

        return Step(name, action, compensate=undo if compensate else None, retry=retry)


def three_steps(journal: Journal, name: str = "checkout") -> Saga:
    """charge (compensated by refund) -> reserve (release) -> schedule (no compensation)."""
    return Saga(name, [journal.step("charge"), journal.step("reserve"), journal.step("schedule", compensate=False)])


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Database]:
    database = await connect_database(url)
    try:
        yield database
    finally:
        await database.aclose()


async def crash(sagas: Sagas, saga: Saga, journal: Journal, entry: str, saga_id: str, **data: Any) -> None:
    """Start ``saga`` and kill its run while ``entry`` is in flight (as a crash would), leaving it unfinished."""
    journal.hang.add(entry)
    before = journal.count(entry)
    task = asyncio.create_task(sagas.run(saga, data, saga_id=saga_id))
    await eventually(lambda: journal.count(entry) > before or task.done(), f"{entry} to start")
    assert not task.done(), task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def backdate(database: Database, saga_id: str, seconds: float = 3600.0) -> None:
    """Make a saga look abandoned ``seconds`` ago (instead of waiting that long)."""
    changed = await database.execute("UPDATE meshkit_sagas SET updated = updated - ? WHERE id = ?", seconds, saga_id)
    assert changed == 1
