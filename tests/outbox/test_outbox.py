"""Writing through the outbox: a commit publishes (same id, data and key), a rollback publishes nothing, order is
kept, sources are separate, bad messages fail at ``publish``; ``pending``, ``flush`` and the lifecycle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshkit import messaging
from meshkit.errors import ConfigurationError, MessagingError, TimeoutExceeded
from meshkit.messaging import Message, SubscriptionOptions
from meshkit.outbox import Outbox
from meshkit.testing import eventually
from tests.outbox.support import RecordingBroker, opened

pytestmark = pytest.mark.anyio

ONE_BY_ONE = SubscriptionOptions(concurrency=1, prefetch=1, poll_interval=0.05)


def broker_url(kind: str, tmp_path: Path) -> str:
    return "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'broker.db'}"


@pytest.mark.parametrize("broker_kind", ["memory", "sqlite"])
async def test_a_commit_publishes_and_a_rollback_publishes_nothing(
    database_url: str, tmp_path: Path, broker_kind: str
) -> None:
    received: list[Message] = []

    async def handle(message: Message) -> None:
        received.append(message)

    async with (
        opened(database_url) as db,
        messaging.connect(broker_url(broker_kind, tmp_path)) as broker,
        Outbox(db, broker, source="orders", poll_interval=30.0) as outbox,
    ):
        await broker.subscribe("order.created", handle, group="email", options=ONE_BY_ONE)

        async def declined() -> None:
            async with outbox.transaction() as tx:
                await tx.execute("INSERT INTO orders (id, total) VALUES (?, ?)", "o-1", 10)
                tx.publish("order.created", {"id": "o-1"}, key="o-1")
                raise RuntimeError("payment declined")

        with pytest.raises(RuntimeError, match="payment declined"):
            await declined()

        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id, total) VALUES (?, ?)", "o-2", 20)
            message_id = tx.publish(
                "order.created", {"id": "o-2", "total": 20}, key="o-2", headers={"tenant": "acme"}, type="OrderCreated"
            )
            assert tx.published == [message_id]

        # poll_interval is 30 s: only the commit's wake-up can have sent it this soon
        await eventually(lambda: len(received) == 1, "the committed message", timeout=20.0)
        (message,) = received
        assert message.id == message_id
        assert message.data == {"id": "o-2", "total": 20}
        assert message.key == "o-2"
        assert message.type == "OrderCreated"
        assert message.headers["tenant"] == "acme"
        assert await db.fetch("SELECT id, total FROM orders") == [("o-2", 20)]
        await outbox.flush()
        assert await outbox.pending() == 0
        # a later message arrived, in order, after the rolled back one would have: it was never sent
        async with outbox.transaction() as tx:
            last = tx.publish("order.created", {"id": "o-3"}, key="o-2")
        await eventually(lambda: len(received) == 2, "the next message")
        assert [m.id for m in received] == [message_id, last]
        assert [m.data["id"] for m in received] == ["o-2", "o-3"]


async def test_order_is_kept_across_many_rows_and_batches(database_url: str) -> None:
    received: list[str] = []

    async def handle(message: Message) -> None:
        received.append(message.id)

    async with (
        opened(database_url) as db,
        messaging.connect("memory://") as broker,
        Outbox(db, broker, source="orders", batch_size=7) as outbox,
    ):
        await broker.subscribe("order.updated", handle, group="audit", options=ONE_BY_ONE)
        published: list[str] = []
        for start in range(0, 120, 12):
            async with outbox.transaction() as tx:
                for n in range(start, start + 12):
                    published.append(tx.publish("order.updated", {"n": n}, key=f"o-{n % 3}"))
        await outbox.flush()
        await eventually(lambda: len(received) == len(published), "every message")
        assert received == published
        assert outbox.relayed == 120


async def test_sources_sharing_a_database_are_relayed_separately(database_url: str) -> None:
    orders_broker, billing_broker = RecordingBroker(), RecordingBroker()
    billing_broker.fail_after = 0  # billing's relay cannot send anything
    async with (
        opened(database_url) as db,
        Outbox(db, orders_broker, source="orders") as orders,
        Outbox(db, billing_broker, source="billing") as billing,
    ):
        async with orders.transaction() as tx:
            order_ids = [tx.publish("order.created", {"n": n}) for n in range(3)]
        async with billing.transaction() as tx:
            billing_ids = [tx.publish("invoice.created", {"n": n}) for n in range(2)]
        await orders.flush()
        await eventually(lambda: billing_broker.failures >= 1, "billing's relay tried")
        assert orders_broker.sent == order_ids
        assert billing_broker.sent == []
        assert await orders.pending() == 0
        assert await billing.pending() == 2
        # billing's rows wait for billing's relay: orders' relay never took them
        billing_broker.fail_after = None
        await billing.flush()
        assert billing_broker.sent == billing_ids
        assert orders_broker.sent == order_ids
    await orders_broker.aclose()
    await billing_broker.aclose()


async def test_data_that_is_not_json_fails_at_publish_and_rolls_back(database_url: str) -> None:
    broker = RecordingBroker()
    async with opened(database_url) as db, Outbox(db, broker, source="orders") as outbox:

        async def order_with_a_callback() -> None:
            async with outbox.transaction() as tx:
                await tx.execute("INSERT INTO orders (id, total) VALUES (?, ?)", "o-1", 10)
                tx.publish("order.created", {"id": "o-1", "callback": object()})

        with pytest.raises(MessagingError, match=r"cannot publish to 'order\.created' through the outbox") as bad:
            await order_with_a_callback()
        assert bad.value.hint is not None and "JSON" in bad.value.hint
        assert isinstance(bad.value.__cause__, TypeError)
        with pytest.raises(MessagingError, match="must be JSON"):
            async with outbox.transaction() as tx:
                tx.publish("order.created", b"\x00raw")
        with pytest.raises(ConfigurationError, match="invalid topic"):
            async with outbox.transaction() as tx:
                tx.publish("order created", {})
        with pytest.raises(ConfigurationError, match="Tenant"):
            async with outbox.transaction() as tx:
                tx.publish("order.created", {}, headers={"Tenant": "acme"})
        assert await db.fetch("SELECT id FROM orders") == []
        assert await outbox.pending() == 0
        # a transaction that is over refuses to publish
        async with outbox.transaction() as tx:
            pass
        with pytest.raises(ConfigurationError, match="over"):
            tx.publish("order.created", {})
    assert broker.attempts == 0
    await broker.aclose()


async def test_pending_counts_unrelayed_rows_and_flush_waits_or_times_out(database_url: str) -> None:
    broker = RecordingBroker()
    broker.fail_after = 0
    async with opened(database_url) as db, Outbox(db, broker, source="orders") as outbox:
        assert await outbox.pending() == 0
        await outbox.flush(timeout=5.0)  # nothing to wait for
        async with outbox.transaction() as tx:
            ids = [tx.publish("order.created", {"n": n}) for n in range(3)]
        assert await outbox.pending() == 3
        with pytest.raises(TimeoutExceeded, match="3 outbox message"):
            await outbox.flush(timeout=0.3)
        broker.fail_after = None
        await outbox.flush()
        assert await outbox.pending() == 0
        assert broker.sent == ids
    await broker.aclose()


async def test_the_outbox_must_be_started_and_aclose_leaves_no_task_and_keeps_its_resources(
    database_url: str,
) -> None:
    broker = RecordingBroker()
    async with opened(database_url) as db:
        outbox = Outbox(db, broker, source="orders")
        with pytest.raises(ConfigurationError, match="not started"):
            async with outbox.transaction():
                pass
        await outbox.start()
        await outbox.start()  # again: nothing more
        relays = [t for t in asyncio.all_tasks() if t.get_name() == "meshkit outbox relay orders"]
        assert len(relays) == 1
        await outbox.aclose()
        await outbox.aclose()
        assert relays[0].done()
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "meshkit outbox relay orders"]
        with pytest.raises(ConfigurationError, match="closed"):
            await outbox.start()
        # the database and the broker are the caller's: still open
        assert await db.fetchone("SELECT COUNT(*) FROM meshkit_outbox") == (0,)
        assert not broker.closed
        with pytest.raises(ConfigurationError, match="batch_size"):
            Outbox(db, broker, source="orders", batch_size=0)
    await broker.aclose()
