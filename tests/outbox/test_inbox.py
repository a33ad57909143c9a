"""The inbox: a consumer handles a message id once; its inbox row, business rows and publishes commit together."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meshkit import messaging
from meshkit.errors import ConfigurationError
from meshkit.messaging import Message
from meshkit.outbox import Outbox
from meshkit.testing import eventually
from tests.outbox.support import RecordingBroker, opened

pytestmark = pytest.mark.anyio


async def test_a_duplicate_is_skipped_and_business_rows_commit_with_the_inbox_row(database_url: str) -> None:
    received: list[Message] = []

    async def collect(message: Message) -> None:
        received.append(message)

    async with (
        opened(database_url) as db,
        messaging.connect("memory://") as broker,
        Outbox(db, broker, source="email") as outbox,
    ):
        await broker.subscribe("order.created", collect, group="test")
        await broker.publish("order.created", {"id": "o-1", "total": 5}, key="o-1")
        await eventually(lambda: len(received) == 1, "the message")
        (message,) = received
        handled: list[bool] = []

        async def on_order(message: Message, *, fail: bool = False) -> None:
            async with outbox.receive(message, consumer="billing") as tx:
                handled.append(tx.duplicate)
                if tx.duplicate:
                    return
                await tx.execute(
                    "INSERT INTO orders (id, total) VALUES (?, ?)", message.data["id"], message.data["total"]
                )
                tx.publish("invoice.created", {"order": message.data["id"]})
                if fail:
                    raise RuntimeError("handler failed")

        # a failing handler leaves nothing behind: not the business row, not the inbox row, not the publish
        with pytest.raises(RuntimeError, match="handler failed"):
            await on_order(message, fail=True)
        assert await db.fetch("SELECT id FROM orders") == []
        assert await db.fetch("SELECT consumer FROM meshkit_inbox") == []
        assert await outbox.pending() == 0
        # delivered again: handled for real this time, once
        await on_order(message)
        await on_order(message)
        assert handled == [False, False, True]
        assert await db.fetch("SELECT id, total FROM orders") == [("o-1", 5)]
        assert await db.fetch("SELECT consumer, message_id, topic FROM meshkit_inbox") == [
            ("billing", message.id, "order.created")
        ]
        await outbox.flush()
        assert outbox.relayed == 1  # the duplicate published nothing

        # another consumer of the same message has its own record
        async with outbox.receive(message, consumer="audit") as tx:
            assert not tx.duplicate

        # a duplicate's block is rolled back even if it writes anyway
        async with outbox.receive(message, consumer="billing") as tx:
            assert tx.duplicate
            await tx.execute("UPDATE orders SET total = ?", 999)
            tx.publish("invoice.created", {"order": "again"})
        assert await db.fetch("SELECT total FROM orders") == [(5,)]
        assert await outbox.pending() == 0

        with pytest.raises(ConfigurationError, match="consumer"):
            async with outbox.receive(message, consumer=""):
                pass


async def test_old_inbox_rows_are_pruned(database_url: str) -> None:
    broker = RecordingBroker()
    async with opened(database_url) as db, Outbox(db, broker, source="email") as outbox:
        when = datetime.now(UTC)
        message = Message("order.created", {}, "m-1", "meshkit://orders", "order.created", when, "application/json")
        async with outbox.receive(message, consumer="billing") as tx:
            assert not tx.duplicate
        assert await outbox.prune_inbox(older_than=3600) == 0  # still young
        await db.execute("UPDATE meshkit_inbox SET received = received - 7200")
        assert await outbox.prune_inbox(older_than=3600) == 1
        async with outbox.receive(message, consumer="billing") as tx:
            assert not tx.duplicate  # forgotten
    await broker.aclose()
