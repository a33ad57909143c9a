"""Test doubles and helpers for the outbox tests: a broker that records, fails or hangs on demand, and a database
with a business table."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from meshkit._core.database import Database, connect_database
from meshkit.errors import Unavailable
from meshkit.messaging import Backend, Broker
from meshkit.messaging.memory import MemoryBackend

__all__ = ["ORDERS", "RecordingBroker", "opened"]

ORDERS = {
    "sqlite": "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, total BIGINT NOT NULL);",
    "postgresql": "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, total BIGINT NOT NULL);",
}


class RecordingBroker(Broker):
    """An in-memory broker that records the ids it published (into ``sent``, which several brokers may share),
    refuses to publish once ``len(sent) >= fail_after`` (raising Unavailable, like a broker that went away), and
    never returns from a publish while ``hang`` is set. The next ``lose_replies`` publishes reach the broker and
    then raise, as when a connection drops before the broker's answer arrives."""

    def __init__(self, sent: list[str] | None = None, *, backend: Backend | None = None) -> None:
        super().__init__(backend or MemoryBackend())
        self.sent: list[str] = sent if sent is not None else []
        self.fail_after: int | None = None
        self.hang = False
        self.sent_at: list[float] = []  # wall clock time of each publish in sent
        self.attempts = 0
        self.failures = 0
        self.lose_replies = 0

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
        type: str | None = None,
        subject: str | None = None,
    ) -> str:
        self.attempts += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            self.failures += 1
            raise Unavailable("the broker is down (test)")
        message_id = await super().publish(topic, data, key=key, headers=headers, id=id, type=type, subject=subject)
        self.sent.append(message_id)
        self.sent_at.append(time.time())
        if self.lose_replies:
            self.lose_replies -= 1
            self.failures += 1
            raise Unavailable("the connection dropped before the broker answered (test)")
        return message_id


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Database]:
    """The database at ``url``, with the ``orders`` table, closed afterwards."""
    database = await connect_database(url)
    try:
        await database.migrate(ORDERS)
        yield database
    finally:
        await database.aclose()
