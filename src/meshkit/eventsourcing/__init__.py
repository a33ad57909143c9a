"""Event sourcing: state as an append-only stream of events, with optimistic concurrency, snapshots and upcasting.

::

    store = EventStore(database, tracer=tracer)
    await store.migrate()
    accounts = Repository(store, Account, snapshot_every=50)
    account = await accounts.load("42")
    account.withdraw(30)                      # a decision: records MoneyWithdrawn, or raises a domain error
    await accounts.save(account)              # WrongExpectedVersion if another writer saved first

The store's events have a version in their stream and a gap-free position in the database's global log, which
:mod:`meshkit.projections` reads to build read models. docs/eventsourcing.md has the details.
"""

from meshkit.eventsourcing.aggregate import Aggregate, Repository
from meshkit.eventsourcing.events import Event, NewEvent, RecordedEvent, Snapshot
from meshkit.eventsourcing.store import AppendCallback, EventStore, Upcaster

__all__ = [
    "Aggregate",
    "AppendCallback",
    "Event",
    "EventStore",
    "NewEvent",
    "RecordedEvent",
    "Repository",
    "Snapshot",
    "Upcaster",
]
