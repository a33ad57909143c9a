"""Aggregates (state rebuilt from their events) and the repository that loads and saves them."""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar

from meshkit.errors import ConfigurationError
from meshkit.eventsourcing.events import Event, NewEvent, check_stream, encode
from meshkit.eventsourcing.store import EventStore

__all__ = ["Aggregate", "Repository"]

log = logging.getLogger("meshkit.eventsourcing")

A = TypeVar("A", bound="Aggregate")
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:]*")


class Aggregate(ABC):
    """A consistency boundary whose state is the fold of its events.

    Subclasses set their initial state in ``__init__(self, id)`` (calling ``super().__init__(id)``), change it
    only in :meth:`apply`, and make decisions in methods that check the state and :meth:`record` new events::

        class Account(Aggregate):
            stream_prefix = "account"          # streams "account-<id>"

            def __init__(self, id: str) -> None:
                super().__init__(id)
                self.balance = 0

            def withdraw(self, amount: int) -> None:
                if amount > self.balance:
                    raise InsufficientFunds(self.id, amount, self.balance)
                self.record("MoneyWithdrawn", {"amount": amount})

            def apply(self, event: Event) -> None:
                if event.type == "MoneyWithdrawn":
                    self.balance -= event.data["amount"]
                ...

    ``version`` is the number of the aggregate's events that are stored; ``pending`` the ones recorded since.
    """

    #: Streams are named ``f"{stream_prefix}-{id}"``; the default is the class name in lower case.
    stream_prefix: ClassVar[str] = ""
    #: The shape of :meth:`snapshot`'s state: raise it when that shape changes, and older snapshots are ignored.
    snapshot_version: ClassVar[int] = 1

    def __init__(self, id: str) -> None:
        if not id:
            raise ConfigurationError(f"an aggregate id is a non-empty str, not {id!r}")
        self.id = id
        self.version = 0
        self._pending: list[NewEvent] = []

    @classmethod
    def stream_name(cls, id: str) -> str:
        """The stream of the aggregate ``id``: ``f"{cls.stream_prefix}-{id}"``."""
        prefix = cls.stream_prefix or cls.__name__.lower()
        if not _PREFIX.fullmatch(prefix):
            raise ConfigurationError(
                f"bad stream_prefix {prefix!r} of {cls.__name__}: use letters, digits, _ . and : (no -)"
            )
        return check_stream(f"{prefix}-{id}")

    @property
    def stream(self) -> str:
        return self.stream_name(self.id)

    @property
    def pending(self) -> list[NewEvent]:
        """The events recorded since the aggregate was loaded or saved (a copy)."""
        return list(self._pending)

    @abstractmethod
    def apply(self, event: Event) -> None:
        """Change the state by one event (recorded now, or loaded). No decisions, no I/O: it must not fail on an
        event that was already stored. Every aggregate defines it (a class without it cannot be made)."""

    def record(
        self, event_type: str, data: dict[str, Any], metadata: dict[str, Any] | None = None, *, schema_version: int = 1
    ) -> NewEvent:
        """Record a new event: apply it to the state now, append it on the repository's next ``save``."""
        event = NewEvent(event_type, data, metadata or {}, schema_version)
        self.apply(event)
        self._pending.append(event)
        return event

    def snapshot(self) -> dict[str, Any]:
        """The state to keep in a snapshot: a JSON object. The default is the public attributes but ``id`` and
        ``version``; override it (and :meth:`restore`) when the state holds values JSON cannot (sets, Decimals)."""
        return {name: value for name, value in vars(self).items() if not name.startswith("_") and name not in _OWN}

    def restore(self, state: dict[str, Any]) -> None:
        """Set the state from a :meth:`snapshot` (on a new instance, before the later events are applied)."""
        for name, value in state.items():
            setattr(self, name, value)

    def _mark_saved(self, version: int) -> None:
        self.version = version
        self._pending.clear()


_OWN = frozenset({"id", "version"})


class Repository(Generic[A]):
    """Loads and saves aggregates of one class from ``store``::

        accounts = Repository(store, Account, snapshot_every=50)
        account = await accounts.load("42")      # version 0 when the stream does not exist yet
        account.deposit(10)
        await accounts.save(account)             # WrongExpectedVersion when another writer saved first

    ``snapshot_every``: after a save that crosses a multiple of it, the aggregate's :meth:`~Aggregate.snapshot` is
    stored; ``load`` starts from the latest snapshot (of the class's ``snapshot_version``) and applies only the
    later events. None: no snapshots.
    """

    def __init__(self, store: EventStore, aggregate: type[A], *, snapshot_every: int | None = None) -> None:
        if snapshot_every is not None and snapshot_every < 1:
            raise ConfigurationError(f"snapshot_every must be an int >= 1 or None, not {snapshot_every!r}")
        aggregate.stream_name("x")  # a bad stream_prefix fails here, not on the first load
        self.store = store
        self.aggregate = aggregate
        self.snapshot_every = snapshot_every

    async def load(self, id: str) -> A:
        """The aggregate ``id`` as its snapshot and events make it (a new one, version 0, if it has none)."""
        instance = self.aggregate(id)
        stream = instance.stream
        if self.snapshot_every is not None:
            snapshot = await self.store.load_snapshot(stream)
            if snapshot is not None and snapshot.schema_version == self.aggregate.snapshot_version:
                instance.restore(snapshot.state)
                instance.version = snapshot.version
        for event in await self.store.load(stream, after=instance.version):
            instance.apply(event)
            instance.version = event.version
        return instance

    async def save(self, instance: A) -> int:
        """Append the aggregate's pending events, expecting its stream at ``instance.version``; returns the new
        version. Nothing pending: nothing is written."""
        if not isinstance(instance, self.aggregate):
            raise ConfigurationError(f"this repository saves {self.aggregate.__name__}, not {type(instance).__name__}")
        pending = instance.pending
        if not pending:
            return instance.version
        stream = instance.stream
        before, after = instance.version, instance.version + len(pending)
        every = self.snapshot_every
        state: dict[str, Any] | None = None
        if every is not None and after // every > before // every:
            state = instance.snapshot()  # taken (and checked) before the append: a bad state fails the save whole
            encode(state, f"the snapshot of {stream!r}")
        version = await self.store.append(stream, pending, expected_version=before)
        instance._mark_saved(version)
        if state is not None:
            try:
                await self.store.save_snapshot(stream, version, state, schema_version=self.aggregate.snapshot_version)
            except Exception:  # the events are stored; a missing snapshot only makes loads longer
                log.warning(
                    "could not save the snapshot of %s at version %d",
                    stream,
                    version,
                    exc_info=True,
                    extra={"stream": stream, "version": version},
                )
        return version
