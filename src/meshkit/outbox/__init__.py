"""The transactional outbox and inbox: a service's database writes and the messages about them commit together.

::

    outbox = Outbox(database, broker, source="orders", tracer=tracer)
    await outbox.start()                                  # creates its tables, starts the relay
    async with outbox.transaction() as tx:                # one database transaction
        await tx.execute("INSERT INTO orders (id, total) VALUES (?, ?)", order_id, total)
        tx.publish("order.created", {"id": order_id}, key=order_id)   # sync: kept, inserted as the block ends
    # committed: the relay is woken and publishes; rolled back: nothing is published

    async with outbox.receive(message, consumer="email") as tx:    # an idempotent handler
        if tx.duplicate:
            return                                        # this consumer already handled this message id
        await tx.execute("INSERT INTO emails (order_id) VALUES (?)", message.data["id"])

    await outbox.aclose()                                 # stops the relay; the database and broker stay open

Why: writing a row and then publishing (or the reverse) is a dual write; a crash between the two loses the
message or publishes one about a write that never happened. Here ``tx.publish`` inserts the message into the
``meshkit_outbox`` table inside the business transaction, and a relay task sends committed rows to the broker
afterwards.

The relay (one task per :class:`Outbox`; several processes may run one each on the same database):

- claims the first ``batch_size`` rows of its ``source`` (in insert order) in one short transaction, setting
  ``claimed_by``/``claimed_until`` (the lease). Claims of a source are taken one at a time (a lock row per
  source), and no relay claims while another holds a live claim on the same source, so in normal operation one
  relay at a time sends a source's messages, in order;
- publishes each row with its stored id as the broker's message id, with no database transaction open, then
  deletes the rows it sent. A failed publish is logged, the claims are released and the relay retries from the
  same row after an exponential backoff: nothing is skipped, nothing is lost;
- renews its lease while it works through a batch; rows claimed by a relay that died are taken again once their
  lease expires.

Delivery is at least once: a relay that dies after publishing and before deleting sends the row again with the
same id, which brokers with dedup drop, and which :meth:`Outbox.receive` (the inbox) drops for consumers on any
broker. Each relayed message is published inside a producer span ``outbox relay <topic>`` whose parent is the
trace context current at ``tx.publish``; the broker carries that span's context to the consumers.
docs/outbox.md has the details.
"""

from meshkit.outbox._outbox import Outbox
from meshkit.outbox._transaction import InboxTransaction, OutboxTransaction

__all__ = ["InboxTransaction", "Outbox", "OutboxTransaction"]
