"""The relay under competition and failure: two relays of one source send every row once, in order; a broker
outage loses nothing and keeps order; rows held by a relay that hung are taken over once its lease expires."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from meshkit.messaging import Message, memory, sqlite
from meshkit.outbox import Outbox
from meshkit.testing import eventually
from tests.outbox.support import RecordingBroker, opened

pytestmark = pytest.mark.anyio


async def test_two_relays_of_one_source_send_every_row_once_and_in_order(database_url: str) -> None:
    sent: list[str] = []  # both brokers record into one list: the order the rows left the database in
    first, second = RecordingBroker(sent), RecordingBroker(sent)
    # two processes' worth: separate connections, separate brokers, one database
    async with (
        opened(database_url) as db_a,
        opened(database_url) as db_b,
        Outbox(db_a, first, source="orders", batch_size=5, poll_interval=0.05) as a,
        Outbox(db_b, second, source="orders", batch_size=5, poll_interval=0.05) as b,
    ):
        published: list[str] = []
        for round_ in range(20):
            outbox = a if round_ % 2 else b
            async with outbox.transaction() as tx:
                published += [tx.publish("order.created", {"round": round_, "n": n}) for n in range(6)]
        await a.flush()
        await b.flush()
        assert sent == published  # each once, in order
        assert first.sent is second.sent
        assert a.relayed + b.relayed == 120
    await first.aclose()
    await second.aclose()


async def test_a_broker_outage_loses_nothing_and_keeps_order(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = RecordingBroker()
    broker.fail_after = 4  # the broker goes away after four messages
    caplog.set_level(logging.WARNING, logger="meshkit.outbox")
    async with opened(database_url) as db, Outbox(db, broker, source="orders", batch_size=3) as outbox:
        async with outbox.transaction() as tx:
            published = [tx.publish("order.created", {"n": n}, key=f"o-{n % 2}") for n in range(10)]
        await eventually(lambda: broker.failures >= 3, "three failed attempts")
        assert broker.sent == published[:4]
        assert await outbox.pending() == 6
        # the failing row is the fifth: the relay keeps retrying it, and notes why
        row = await db.fetchone("SELECT attempts, last_error FROM meshkit_outbox WHERE id = ?", published[4])
        assert row is not None and row[0] >= 1 and "broker is down" in row[1]
        later = await db.fetchone("SELECT attempts FROM meshkit_outbox WHERE id = ?", published[5])
        assert later == (0,)  # never tried past the failing row
        failure = next(r for r in caplog.records if r.name == "meshkit.outbox")
        assert failure.levelno == logging.WARNING
        assert failure.__dict__["outbox_source"] == "orders"
        assert failure.__dict__["message_id"] == published[4]
        assert "Unavailable" in failure.__dict__["error"]
        broker.fail_after = None  # back
        await outbox.flush()
        assert broker.sent == published
    await broker.aclose()


async def test_rows_of_a_relay_that_hung_are_taken_over_when_its_lease_expires(database_url: str) -> None:
    stuck, healthy = RecordingBroker(), RecordingBroker()
    stuck.hang = True  # publishes never return: a relay process that froze (or died) holding its claim
    async with opened(database_url) as db_a, opened(database_url) as db_b:
        a = Outbox(db_a, stuck, source="orders", lease=1.0, poll_interval=0.05)
        await a.start()
        async with a.transaction() as tx:
            published = [tx.publish("order.created", {"n": n}) for n in range(5)]
        await eventually(lambda: stuck.attempts >= 1, "the first relay took the rows")
        claims = await db_a.fetch("SELECT DISTINCT claimed_by, claimed_until FROM meshkit_outbox")
        assert len(claims) == 1
        ((_, claimed_until),) = claims

        b = Outbox(db_b, healthy, source="orders", lease=1.0, poll_interval=0.05)
        await b.start()
        await eventually(lambda: len(healthy.sent) == 5, "the second relay sent the rows")
        assert healthy.sent == published
        # not before the hung relay's lease ran out
        assert healthy.sent_at[0] >= claimed_until
        assert await b.pending() == 0
        assert b.relayed == 5
        assert stuck.sent == []
        await a.aclose(timeout=0.1)  # cancels the hung publish
        await b.aclose()
    await stuck.aclose()
    await healthy.aclose()


@pytest.mark.parametrize("broker_kind", ["memory", "sqlite"])
async def test_a_message_sent_again_keeps_its_id_and_the_broker_drops_the_copy(
    database_url: str, tmp_path: Path, broker_kind: str
) -> None:
    backend = memory.from_url("memory://") if broker_kind == "memory" else sqlite.from_url(f"sqlite:///{tmp_path}/b.db")
    broker = RecordingBroker(backend=backend)
    broker.lose_replies = 1  # the first message is stored, and the relay is told it failed
    received: list[Message] = []

    async def collect(message: Message) -> None:
        received.append(message)

    async with opened(database_url) as db, Outbox(db, broker, source="orders") as outbox:
        await broker.subscribe("order.created", collect, group="email")
        async with outbox.transaction() as tx:
            first = tx.publish("order.created", {"id": "o-1"})
        await outbox.flush()
        assert broker.sent == [first, first]  # sent twice, with one id
        async with outbox.transaction() as tx:
            second = tx.publish("order.created", {"id": "o-2"})
        await eventually(lambda: any(m.id == second for m in received), "the next message")
        assert sorted(m.id for m in received) == sorted([first, second])  # the copy was dropped
    await broker.aclose()
