"""What a messaging backend implements: a few primitives. The consumer runtime and the public ``Broker`` are shared.

A backend stores :class:`~meshkit.messaging.message.Envelope` values per topic and hands them to consumer groups:

- ``append(topic, envelopes)``: store, in order (dropping ids seen within the dedup window if it can).
- ``group(topic, group, start)`` → a :class:`GroupChannel`: one member's view of a consumer group. Members of one
  group compete for messages; every group gets every message.
- ``lag(topic, group)`` → a :class:`Lag`: how far a group is behind, read from the broker's own state (what it
  cannot tell is ``None``); :class:`GroupNotFound` for a group (or topic) that does not exist.

A :class:`GroupChannel` must keep these promises, which the conformance suite (``meshkit.messaging.testing``) checks:

1. at-least-once: a fetched message is delivered again (to some member) until it is acked or dead-lettered;
2. per-key order: a group never has two deliveries of one key in flight, and a nacked message keeps its key until
   it is acked, so messages of one key are handled in publish order;
3. ``nack(delivery, delay)`` makes the message available again after ``delay`` seconds with ``attempt + 1``;
4. ``release(deliveries)`` gives back deliveries that were fetched but never handled, at once and without counting
   an attempt.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from meshkit.errors import MeshkitError
from meshkit.messaging.message import Envelope

__all__ = ["Backend", "Capabilities", "Delivery", "GroupChannel", "GroupNotFound", "Lag", "StartFrom"]

#: Where a new consumer group starts: the oldest message kept, only messages published from now on, an offset,
#: or a time. Backends without a log support only ``"earliest"`` for groups that exist before publishing.
StartFrom = Literal["earliest", "latest"] | int | datetime


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do, so tests and users know what to expect."""

    replay: bool  # keeps a log: a new group can start from the beginning, an offset or a time
    dedup: bool  # drops a republished id within the dedup window
    durable: bool  # survives the process
    multi_process: bool  # several processes can share it


@dataclass(frozen=True, slots=True)
class Lag:
    """How far a consumer group is behind on a topic, as the broker sees it now.

    ``waiting``: messages the group has still to take: published and not yet handed to any member, plus those
    handed back for a redelivery (nacked, released, or whose member died) that no member holds yet.
    ``in_flight``: messages a member holds: handed out and not yet acked.
    ``total``: every message the group has not finished, ``waiting + in_flight`` when both are known; a backend
    that knows only the sum (Kafka: end offset minus committed offset) gives ``total`` alone.
    ``None`` means the broker cannot tell (docs/messaging.md says which backend knows what); never a guess.
    """

    waiting: int | None
    in_flight: int | None
    total: int | None = None

    def __post_init__(self) -> None:
        for name in ("waiting", "in_flight", "total"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Lag.{name} cannot be negative: {value}")
        if self.waiting is not None and self.in_flight is not None:
            known = self.waiting + self.in_flight
            if self.total is None:
                object.__setattr__(self, "total", known)  # frozen: set once, here
            elif self.total != known:
                raise ValueError(f"Lag.total {self.total} is not waiting + in_flight ({known})")


class GroupNotFound(MeshkitError, LookupError):
    """No consumer group ``group`` on ``topic`` (or no such topic): it has never been joined, or it was deleted.

    Also a builtin ``LookupError``. A group exists once a member has joined it (``broker.subscribe``); on Kafka, once
    it has a member or has committed on the topic (a Kafka group keeps nothing else).
    """

    def __init__(self, topic: str, group: str, *, detail: str = "") -> None:
        super().__init__(
            f"no consumer group {group!r} on topic {topic!r}" + (f" ({detail})" if detail else ""),
            hint=f"subscribe a member first: broker.subscribe({topic!r}, handler, group={group!r})",
        )
        self.topic = topic
        self.group = group


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of one message to one member of a group."""

    topic: str
    group: str
    envelope: Envelope
    offset: int
    attempt: int  # 1 for the first delivery


class _DeliverySlots:
    __slots__ = ("attempt", "envelope", "group", "offset", "topic")
    topic: str
    group: str
    envelope: Envelope
    offset: int
    attempt: int


def make_delivery(topic: str, group: str, envelope: Envelope, offset: int, attempt: int) -> Delivery:
    """``Delivery(topic, group, envelope, offset, attempt)``, built faster for the hot path (see
    :func:`meshkit.messaging.message.make_envelope`: same trick, same result)."""
    d = _DeliverySlots()
    d.topic = topic
    d.group = group
    d.envelope = envelope
    d.offset = offset
    d.attempt = attempt
    d.__class__ = Delivery  # type: ignore[assignment]  # same slots: allowed
    return d  # type: ignore[return-value]  # it is a Delivery now


class GroupChannel(abc.ABC):
    """One member's view of a consumer group (see the module docstring for its promises)."""

    @abc.abstractmethod
    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        """Up to ``limit`` deliveries; waits up to ``wait`` seconds for the first one. Empty means none came."""

    @abc.abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Done with these: never deliver them to this group again."""

    @abc.abstractmethod
    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Handling failed: deliver again after ``delay`` seconds."""

    @abc.abstractmethod
    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Fetched but never handled: available again at once, no attempt counted."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Leave the group; whatever this member still holds becomes available to the others."""


class Backend(abc.ABC):
    capabilities: Capabilities

    @abc.abstractmethod
    async def append(self, topic: str, envelopes: Sequence[Envelope]) -> None:
        """Store ``envelopes`` on ``topic`` in order."""

    @abc.abstractmethod
    async def group(self, topic: str, group: str, start: StartFrom) -> GroupChannel:
        """Join ``group`` on ``topic`` (creating it at ``start`` if it is new)."""

    @abc.abstractmethod
    async def lag(self, topic: str, group: str) -> Lag:
        """How far ``group`` is behind on ``topic``; :class:`GroupNotFound` if there is no such group (or topic).

        Reads the broker's state: it creates no topic and no group and joins nothing (it may open the backend's
        connection, and with it what every call sets up first, such as a NATS stream or RabbitMQ's exchanges).
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release every resource."""
