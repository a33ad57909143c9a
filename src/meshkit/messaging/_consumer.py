"""The consumer runtime shared by every backend: fetch, bounded concurrency, ack/nack, redelivery, dead letters.

One :class:`Subscription` is one member of a consumer group. Its fetch loop keeps at most ``concurrency +
prefetch`` deliveries fetched and unfinished (so nothing piles up in memory); ``concurrency`` worker tasks, owned by
the subscription, take them in order and settle each by the outcome:

- the handler returned: ack (acks are written in batches by a flusher task: whatever was handled while the
  previous batch was being written goes next, so a busy subscription writes few, large batches);
- it raised, or the message does not decode: nack with a delay from the subscription's ``Retry`` backoff, or, when
  ``Retry.attempts`` deliveries are used up (at once for a message that cannot decode), publish it to the dead
  letter topic with the reason in its headers, then ack;
- it was cancelled (the subscription is closing): release, so another member gets it at once.

``aclose()`` stops fetching, lets running handlers finish (up to ``drain_timeout``, then cancels them), releases
what was fetched but not started, and leaves the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from meshkit.errors import MessageDecodeError
from meshkit.messaging.base import Delivery, GroupChannel, StartFrom
from meshkit.messaging.message import Message
from meshkit.resilience import Exponential, Retry
from meshkit.tracing import extracted

if TYPE_CHECKING:
    from meshkit.messaging.broker import Broker

__all__ = ["Handler", "Subscription", "SubscriptionOptions"]

_UNTRACED = contextlib.nullcontext()  # reusable: it holds no state

log = logging.getLogger("meshkit.messaging")

_MAX_FETCH_BACKOFF = 2.0  # seconds between fetch attempts while the broker is unreachable

Handler = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """How one member consumes. ``retry.attempts`` is the most deliveries before the dead letter topic."""

    concurrency: int = 16
    prefetch: int = 16
    retry: Retry = field(default_factory=lambda: Retry(attempts=5, backoff=Exponential(0.1, cap=30.0)))
    start: StartFrom = "earliest"
    dead_letter_topic: str | None = None  # default: "<topic>.dlq"
    drain_timeout: float = 30.0
    poll_interval: float = 0.5

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.prefetch < 0:
            raise ValueError("concurrency must be >= 1 and prefetch >= 0")
        if self.retry.attempts is None:
            raise ValueError("a subscription's Retry needs attempts: the most deliveries before the dead letter topic")


class Subscription:
    """One member of a consumer group (see the module docstring)."""

    def __init__(
        self,
        broker: Broker,
        topic: str,
        group: str,
        handler: Handler,
        options: SubscriptionOptions,
        channel: GroupChannel,
    ) -> None:
        self.topic = topic
        self.group = group
        self._broker = broker
        self._handler = handler
        self._options = options
        self._channel = channel
        # Fetched, not started (None: a worker's signal to stop). Not an asyncio.Queue: its put wakes one waiting
        # worker per message, and when handlers do not suspend the first woken worker handles the whole batch while
        # the others wake to an empty queue. Here a worker that takes a message wakes one more only if messages
        # remain and no woken worker is yet to run, so concurrency still grows as handlers suspend.
        self._ready: deque[Delivery | None] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for a message
        self._waking = 0  # workers woken that have not taken a message yet
        self._busy = 0  # workers handling a message
        self._fetch_failures = 0  # fetches failed in a row (the broker unreachable)
        self._capacity = options.concurrency + options.prefetch  # fetched and not finished, at most
        self._refill = max(1, self._capacity // 2)  # top up in batches: a fetch per message costs a round trip each
        self._progress = asyncio.Event()  # the last fetched message was taken, or there is room for a top-up
        self._watching = False  # the fetch loop waits for progress: the first worker to make some sets the event
        self._fetch_due = False  # progress was signalled and the fetch loop has not run since: workers yield to it
        self._workers: list[asyncio.Task[None]] = []
        self._rng = random.Random()
        self._acks: list[Delivery] = []  # handled, waiting for the flusher: acks are written in batches
        self._ack_wanted = asyncio.Event()
        self._acks_closing = False  # set by aclose: write what is left, then stop
        self._ack_task: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self.handled = 0
        self.failed = 0
        self.dead_lettered = 0

    def start(self) -> None:
        name = f"{self.topic}-{self.group}"
        self._loop_task = asyncio.create_task(self._fetch_loop(), name=f"meshkit-fetch-{name}")
        self._ack_task = asyncio.create_task(self._flush_acks(), name=f"meshkit-acks-{name}")
        self._workers = [
            asyncio.create_task(self._worker(), name=f"meshkit-worker-{name}-{i}")
            for i in range(self._options.concurrency)
        ]

    async def _flush_acks(self) -> None:
        """Write acks in batches: whatever was handled while the previous batch was being written goes next.

        It is never cancelled: a cancelled write could drop acks that the member's leaving would then turn into
        redeliveries of handled messages. ``aclose`` asks it to finish instead.
        """
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            batch, self._acks = self._acks, []
            if batch:
                try:
                    await self._channel.ack(batch)
                except Exception:
                    log.exception(
                        "could not ack a batch; its messages will be delivered again",
                        extra={"topic": self.topic, "group": self.group, "count": len(batch)},
                    )
            if self._acks_closing and not self._acks:
                return

    async def _fetch_loop(self) -> None:
        """Keep at most ``concurrency + prefetch`` deliveries fetched and not finished."""
        opts = self._options
        ready = self._ready
        capacity, refill = self._capacity, self._refill
        while True:
            self._fetch_due = False  # the loop runs: workers need not yield to it any more
            room = capacity - self._busy - len(ready)
            if room > 0 and not ready:  # nothing waiting: block for new messages
                ready.extend(await self._fetch(room, opts.poll_interval))
                self._wake()
                continue
            # Fetched messages wait for a worker (or we are full). Clear *before* topping up, so that a worker
            # taking or finishing a message during the fetch is not missed; then wait for such progress.
            self._progress.clear()
            self._watching = True
            if room >= refill:
                got = await self._fetch(room, 0.0)
                if got:
                    ready.extend(got)
                    self._wake()
                    continue
            await self._progress.wait()

    def _wake(self) -> None:
        """Wake one idle worker if messages wait and no woken worker is yet to take one."""
        if self._waking or not self._ready:
            return
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._waking += 1
                return

    async def _fetch(self, room: int, wait: float) -> list[Delivery]:
        """One fetch; a failing backend (a broker restarting, a dropped connection) is logged and retried.

        The loop must outlive a broker outage: if it died, the subscription would look alive and handle nothing.
        Retries back off from the poll interval to ``_MAX_FETCH_BACKOFF`` and log once per outage.
        """
        try:
            got = await self._channel.fetch(room, wait)
        except asyncio.CancelledError:
            raise
        except Exception:
            if not self._fetch_failures:
                log.warning(
                    "could not fetch messages; retrying until the broker answers",
                    exc_info=True,
                    extra={"topic": self.topic, "group": self.group},
                )
            self._fetch_failures += 1
            delay = min(_MAX_FETCH_BACKOFF, max(0.05, self._options.poll_interval) * 2 ** min(self._fetch_failures, 8))
            await asyncio.sleep(delay)
            return []
        if self._fetch_failures:
            log.info(
                "fetching messages again after %d failed attempts",
                self._fetch_failures,
                extra={"topic": self.topic, "group": self.group},
            )
            self._fetch_failures = 0
        return got

    async def _worker(self) -> None:
        """Take fetched messages and settle each by its handler's outcome (the hot path: no coroutine of ours per
        message; failures go to _failed and _dead_letter)."""
        ready = self._ready
        loop = asyncio.get_running_loop()
        decode = self._broker._decode
        handler = self._handler
        capacity, refill = self._capacity, self._refill
        while True:
            if self._fetch_due:
                # There is room for a top-up: let the fetch loop send it now, so the broker prepares the next batch
                # while this one is handled. Handlers that never suspend would otherwise keep the event loop until
                # the batch is done (every worker woken before the fetch loop runs first), and fetching and
                # handling would take turns instead of overlapping.
                await asyncio.sleep(0)
            if not ready:
                waiter = loop.create_future()
                self._idle.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():  # woken, then cancelled before it ran
                        self._waking -= 1
                    raise
                self._waking -= 1
                continue
            delivery = ready.popleft()
            if delivery is None:  # closing
                return
            if ready:
                if not self._waking:
                    self._wake()  # another worker takes the next one if this handler suspends
            elif self._watching:  # the fetch loop may be waiting for the last one to be taken
                self._watching = False
                self._progress.set()
            self._busy += 1
            try:
                try:
                    message = decode(delivery)
                except MessageDecodeError as exc:
                    await self._dead_letter(delivery, f"undecodable: {exc}")
                    continue
                # the handler, and the log lines of its failure, run in the trace the message carries
                with extracted(message.headers) if "traceparent" in message.headers else _UNTRACED:
                    try:
                        await handler(message)
                    except asyncio.CancelledError:
                        await asyncio.shield(self._channel.release([delivery]))
                        raise
                    except Exception as exc:
                        await self._failed(delivery, exc)
                        continue
                acks = self._acks
                acks.append(delivery)
                if len(acks) == 1:  # the first since the flusher took a batch: wake it (later ones find it awake)
                    self._ack_wanted.set()
                self.handled += 1
            except asyncio.CancelledError:
                raise
            except Exception:  # the handler's own errors are settled above: this is the backend failing
                log.exception(
                    "could not settle a delivery; it will be delivered again",
                    extra={"topic": self.topic, "group": self.group},
                )
            finally:
                self._busy -= 1
                if self._watching and (not ready or capacity - self._busy - len(ready) >= refill):
                    self._watching = False
                    self._progress.set()
                    self._fetch_due = bool(ready)

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        """The handler raised: deliver again after a backoff, or dead-letter after the last attempt."""
        retry = self._options.retry
        assert retry.attempts is not None
        self.failed += 1
        reason = f"{type(exc).__name__}: {exc}"
        if delivery.attempt >= retry.attempts:
            await self._dead_letter(delivery, reason)
            return
        delay = retry.backoff.delay(delivery.attempt, 0.0, self._rng)
        log.info(
            "handler failed; message will be delivered again",
            extra={
                "topic": self.topic,
                "group": self.group,
                "id": delivery.envelope.id,
                "attempt": delivery.attempt,
                "delay": delay,
                "error": reason,
            },
        )
        await self._channel.nack(delivery, delay)

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        topic = self._options.dead_letter_topic or f"{self.topic}.dlq"
        extensions = {
            **delivery.envelope.extensions,
            "dlqreason": reason[:1000],
            "dlqtopic": self.topic,
            "dlqgroup": self.group,
            "dlqdeliveries": str(delivery.attempt),
            "dlqid": delivery.envelope.id,
        }
        await self._broker._append(topic, [replace(delivery.envelope, extensions=extensions)], dedup=False)
        await self._channel.ack([delivery])
        self.dead_lettered += 1
        log.warning(
            "message moved to the dead letter topic",
            extra={
                "topic": self.topic,
                "group": self.group,
                "id": delivery.envelope.id,
                "dlq": topic,
                "reason": reason,
            },
        )

    async def aclose(self) -> None:
        """Stop fetching, finish running handlers (cancel them after ``drain_timeout``), leave the group."""
        if self._closed:
            return
        self._closed = True
        if self._loop_task is not None:  # stop fetching
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        unstarted = [item for item in self._ready if item is not None]  # fetched but not started: give them back
        self._ready.clear()
        if unstarted:
            await self._channel.release(unstarted)
        for _ in self._workers:  # each worker stops after the message it is handling
            self._ready.append(None)
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._waking += 1
        if self._workers:
            _, late = await asyncio.wait(self._workers, timeout=self._options.drain_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._ack_task is not None:  # the last acks are written before this member leaves the group
            self._acks_closing = True
            self._ack_wanted.set()
            await self._ack_task
        await self._channel.aclose()

    def __repr__(self) -> str:
        return f"Subscription(topic={self.topic!r}, group={self.group!r}, handled={self.handled})"
