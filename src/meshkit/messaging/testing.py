"""The conformance suite every messaging backend passes.

Each scenario is ``async def scenario(open_broker) -> None`` where ``open_broker()`` returns a new, unopened
:class:`~meshkit.messaging.Broker` on the backend under test (for a shared-state backend, each call must reach the
same data: the same file, the same server). A scenario that needs a capability the backend lacks is skipped by
the runner (``requires``). Use it from pytest::

    @pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
    async def test_conformance(scenario):
        await run_scenario(scenario, lambda: connect("memory://"), shared=...)

Scenarios wait for conditions with generous deadlines, never for fixed sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from meshkit.errors import ConfigurationError, MessageTooLarge
from meshkit.messaging._consumer import SubscriptionOptions
from meshkit.messaging.broker import Broker, Outgoing
from meshkit.messaging.message import Envelope, Message
from meshkit.resilience import Constant, Retry
from meshkit.testing import DEADLINE, eventually

__all__ = ["SCENARIOS", "OpenBroker", "Scenario", "eventually", "requires", "run_scenario"]

OpenBroker = Callable[[], Broker]
Scenario = Callable[[OpenBroker], Awaitable[None]]

FAST = SubscriptionOptions(retry=Retry(attempts=5, backoff=Constant(0.01)), poll_interval=0.05, drain_timeout=10)


def requires(*capabilities: str) -> Callable[[Scenario], Scenario]:
    """Mark a scenario as needing backend capabilities (``replay``, ``dedup``, ``durable``, ``multi_process``)."""

    def mark(scenario: Scenario) -> Scenario:
        scenario.requires = capabilities  # type: ignore[attr-defined]
        return scenario

    return mark


class Sink:
    """A handler that records what it saw."""

    def __init__(self) -> None:
        self.seen: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.seen.append(message)

    def values(self) -> list[Any]:
        return [m.data for m in self.seen]


async def pubsub_100(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        sink = Sink()
        await broker.subscribe("conf.pubsub", sink, group="g", options=FAST)
        ids = [await broker.publish("conf.pubsub", {"n": i}) for i in range(100)]
        await eventually(lambda: len(sink.seen) >= 100, "100 messages")
        assert sorted(m.data["n"] for m in sink.seen) == list(range(100))
        assert {m.id for m in sink.seen} == set(ids)
        first = sink.seen[0]
        assert (first.type, first.source, first.datacontenttype) == ("conf.pubsub", "meshkit://app", "application/json")
        assert first.delivery_count == 1 and not first.redelivered


async def concurrent_5000(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        sinks = [Sink() for _ in range(50)]
        for sink in sinks:
            await broker.subscribe("conf.concurrent", sink, group="workers", options=FAST)

        async def publisher(p: int) -> None:
            for i in range(100):
                await broker.publish("conf.concurrent", {"p": p, "i": i})

        await asyncio.gather(*(publisher(p) for p in range(50)))

        def total() -> int:
            return sum(len(s.seen) for s in sinks)

        await eventually(lambda: total() >= 5000, "5000 messages")
        seen = Counter((m.data["p"], m.data["i"]) for s in sinks for m in s.seen)
        assert len(seen) == 5000, f"lost {5000 - len(seen)}"
        assert sum(1 for s in sinks if s.seen) > 1, "one member got everything: the group does not share"


async def topics_isolated(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        sinks = {t: Sink() for t in range(20)}
        for t, sink in sinks.items():
            await broker.subscribe(f"conf.iso.{t}", sink, group="g", options=FAST)
        await asyncio.gather(
            *(broker.publish_batch(f"conf.iso.{t}", [{"t": t, "i": i} for i in range(100)]) for t in range(20))
        )
        await eventually(lambda: all(len(s.seen) >= 100 for s in sinks.values()), "20 x 100 messages")
        for t, sink in sinks.items():
            assert len(sink.seen) == 100
            assert {m.data["t"] for m in sink.seen} == {t}


async def handler_errors_are_redelivered(open_broker: OpenBroker) -> None:
    """Fail the first 2 messages and every 5th on their first delivery: everything is still handled."""
    async with open_broker() as broker:
        handled: dict[int, Message] = {}

        async def flaky(message: Message) -> None:
            n = message.data["n"]
            if message.delivery_count == 1 and (n < 2 or n % 5 == 0):
                raise RuntimeError(f"failing {n} once")
            handled[n] = message

        await broker.subscribe("conf.errors", flaky, group="g", options=FAST)
        await broker.publish_batch("conf.errors", [{"n": n} for n in range(100)])
        await eventually(lambda: len(handled) == 100, "all 100 handled")
        again = sorted(n for n, m in handled.items() if m.redelivered)
        assert again == sorted({0, 1, *range(0, 100, 5)})
        assert all(handled[n].delivery_count == 2 for n in again)


async def cancelled_handlers_leave_their_message(open_broker: OpenBroker) -> None:
    """A handler cut off by shutdown does not ack: the message goes to the next member."""
    async with open_broker() as broker:
        started = asyncio.Event()

        async def hangs(message: Message) -> None:
            started.set()
            await asyncio.Event().wait()

        first = await broker.subscribe("conf.cancel", hangs, group="g", options=replace(FAST, drain_timeout=0.05))
        await broker.publish("conf.cancel", {"n": 1})
        await asyncio.wait_for(started.wait(), DEADLINE)
        await first.aclose()
        sink = Sink()
        await broker.subscribe("conf.cancel", sink, group="g", options=FAST)
        await eventually(lambda: len(sink.seen) == 1, "the message to come back")
        assert sink.values() == [{"n": 1}]


async def a_new_member_continues_after_one_leaves(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        first, second = Sink(), Sink()
        # the group exists before the batch, but nobody handles while it is published: a broker that confirms
        # each publish (RabbitMQ) is slower at publishing than a member at handling, and the first member would
        # otherwise finish all 5000 before it leaves
        await (await broker.subscribe("conf.continue", Sink(), group="g", options=FAST)).aclose()
        await broker.publish_batch("conf.continue", [{"n": n} for n in range(5000)])
        sub = await broker.subscribe("conf.continue", first, group="g", options=FAST)
        await eventually(lambda: len(first.seen) >= 1000, "the first member to get going")
        await sub.aclose()
        await broker.subscribe("conf.continue", second, group="g", options=FAST)
        await eventually(lambda: len({m.data["n"] for m in first.seen + second.seen}) == 5000, "all 5000")
        assert second.seen, "the second member got nothing"
        handled = Counter(m.data["n"] for m in first.seen + second.seen)
        twice = [n for n, c in handled.items() if c > 1]
        assert not twice, f"a graceful leave made {len(twice)} handled messages come back, e.g. {twice[:5]}"


async def closing_many_members_at_once(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        sinks = [Sink() for _ in range(10)]
        subs = [await broker.subscribe("conf.close", s, group="g", options=FAST) for s in sinks]
        await broker.publish_batch("conf.close", [{"n": n} for n in range(1000)])
        await eventually(lambda: sum(len(s.seen) for s in sinks) >= 100, "handling to start")
        await asyncio.gather(*(s.aclose() for s in subs))
        last = Sink()
        await broker.subscribe("conf.close", last, group="g", options=FAST)

        def everything() -> set[int]:
            return {m.data["n"] for s in [*sinks, last] for m in s.seen}

        await eventually(lambda: len(everything()) == 1000, "all 1000 after the concurrent close")
        handled = Counter(m.data["n"] for s in [*sinks, last] for m in s.seen)
        assert max(handled.values()) == 1, "a graceful close made handled messages come back"


async def per_key_order(open_broker: OpenBroker) -> None:
    """1000 messages over 16 keys, 8 handlers at once: each key's messages in publish order."""
    async with open_broker() as broker:
        order: dict[str, list[int]] = defaultdict(list)
        running = 0
        most = 0

        async def handler(message: Message) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0)  # let others interleave
            order[message.key or ""].append(message.data["seq"])
            running -= 1

        await broker.subscribe("conf.order", handler, group="g", options=replace(FAST, concurrency=8))
        await broker.publish_batch("conf.order", [Outgoing({"seq": i}, key=f"k{i % 16}") for i in range(1000)])
        await eventually(lambda: sum(map(len, order.values())) == 1000, "1000 messages")
        for key, seqs in order.items():
            assert seqs == sorted(seqs), f"key {key} out of order"
        assert most > 1, "handlers never ran in parallel across keys"


async def per_key_order_survives_failures(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        order: dict[str, list[int]] = defaultdict(list)

        async def handler(message: Message) -> None:
            if message.data["seq"] % 7 == 0 and message.delivery_count == 1:
                raise RuntimeError("once")
            order[message.key or ""].append(message.data["seq"])

        await broker.subscribe("conf.order2", handler, group="g", options=replace(FAST, concurrency=8))
        await broker.publish_batch("conf.order2", [Outgoing({"seq": i}, key=f"k{i % 4}") for i in range(200)])
        await eventually(lambda: sum(map(len, order.values())) == 200, "200 messages")
        for key, seqs in order.items():
            assert seqs == sorted(seqs), f"key {key} out of order after a redelivery"


async def groups_fan_out_members_compete(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        email, inventory_a, inventory_b = Sink(), Sink(), Sink()
        await broker.subscribe("conf.orders", email, group="email", options=FAST)
        await broker.subscribe("conf.orders", inventory_a, group="inventory", options=FAST)
        await broker.subscribe("conf.orders", inventory_b, group="inventory", options=FAST)
        await broker.publish_batch("conf.orders", [{"n": n} for n in range(200)])
        await eventually(lambda: len(email.seen) == 200, "every message for email")
        await eventually(lambda: len(inventory_a.seen) + len(inventory_b.seen) == 200, "inventory's share")
        a = {m.data["n"] for m in inventory_a.seen}
        b = {m.data["n"] for m in inventory_b.seen}
        assert not a & b, "two members of one group handled the same message"
        assert a | b == set(range(200))


@requires("replay")
async def new_groups_see_old_messages(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        await broker.publish_batch("conf.replay", [{"n": n} for n in range(50)])
        late, latest, from_offset = Sink(), Sink(), Sink()
        await broker.subscribe("conf.replay", late, group="late", options=FAST)
        await broker.subscribe("conf.replay", latest, group="latest", options=replace(FAST, start="latest"))
        await eventually(lambda: len(late.seen) == 50, "old messages for a new group")
        offset = sorted(m.offset for m in late.seen if m.offset is not None)[40]
        await broker.subscribe("conf.replay", from_offset, group="offset", options=replace(FAST, start=offset))
        await eventually(lambda: len(from_offset.seen) == 10, "messages from an offset")
        await broker.publish("conf.replay", {"n": 50})
        # at least once: a rebalance between delivery and commit (a slow machine) may deliver it again, so the check
        # is which messages came (old ones would arrive first), not how many times
        await eventually(lambda: len(latest.seen) >= 1, "the new message for a 'latest' group")
        assert {m.data["n"] for m in latest.seen} == {50}, f"a 'latest' group got {latest.values()}"


async def dead_letters_after_n_deliveries(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        attempts: Counter[int] = Counter()

        async def poison(message: Message) -> None:
            attempts[message.data["n"]] += 1
            if message.data["n"] == 3:
                raise ValueError("cannot handle 3")

        options = replace(FAST, retry=Retry(attempts=3, backoff=Constant(0.01)))
        await broker.subscribe("conf.dlq", poison, group="g", options=options)
        await broker.publish_batch("conf.dlq", [{"n": n} for n in range(5)])
        dlq = broker.dead_letters("conf.dlq")
        listed: list[Message] = []

        async def listed_one() -> bool:
            listed[:] = await dlq.list()
            return len(listed) == 1

        end = time.monotonic() + DEADLINE
        while not await listed_one():
            assert time.monotonic() < end, "nothing reached the dead letter topic"
            await asyncio.sleep(0.01)
        assert attempts[3] == 3
        dead = listed[0]
        assert dead.data == {"n": 3}
        assert dead.headers["dlqreason"] == "ValueError: cannot handle 3"
        headers = dead.headers
        assert (headers["dlqtopic"], headers["dlqgroup"], headers["dlqdeliveries"]) == ("conf.dlq", "g", "3")
        assert len(await dlq.list()) == 1, "listing must not consume"
        assert await dlq.replay() == 1
        await eventually(lambda: attempts[3] == 6, "the replayed message to be handled again")
        await eventually(lambda: len(attempts) == 5, "the others")
        listed.clear()
        while not await listed_one():
            assert time.monotonic() < end, "the replayed message did not come back to the dead letters"
            await asyncio.sleep(0.01)
        assert await dlq.discard([listed[0].id]) == 1
        assert await dlq.list() == []


async def undecodable_messages_go_to_the_dead_letters(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        sink = Sink()
        await broker.subscribe("conf.bad", sink, group="g", options=FAST)
        bad = Envelope(
            id="bad-1",
            source="elsewhere",
            type="x",
            time="2026-01-01T00:00:00+00:00",
            datacontenttype="application/json",
            data=b"{not json",
        )
        await broker._backend.append("conf.bad", [bad])
        await broker.publish("conf.bad", {"fine": True})
        await eventually(lambda: len(sink.seen) == 1, "the good message")
        dead: list[Message] = []
        end = time.monotonic() + DEADLINE
        while not dead:
            assert time.monotonic() < end, "the undecodable message never reached the dead letters"
            dead = await broker.dead_letters("conf.bad").list()
            await asyncio.sleep(0.01)
        assert dead[0].headers["dlqreason"].startswith("undecodable: data is not valid JSON")
        assert dead[0].headers["dlqid"] == "bad-1"


@requires("dedup")
async def duplicate_ids_are_stored_once(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:
        for _ in range(3):
            await broker.publish("conf.dedup", {"n": 1}, id="order-1-created")
        await broker.publish("conf.dedup", {"n": 2}, id="order-2-created")
        sink = Sink()
        await broker.subscribe("conf.dedup", sink, group="g", options=FAST)
        await eventually(lambda: len(sink.seen) >= 2, "two messages")
        await broker.publish("conf.dedup", {"n": 3})
        await eventually(lambda: len(sink.seen) >= 3, "the next one")
        assert sorted(m.data["n"] for m in sink.seen) == [1, 2, 3]


async def graceful_shutdown_finishes_what_it_started(open_broker: OpenBroker) -> None:
    started: set[int] = set()
    finished: set[int] = set()
    release = asyncio.Event()

    async def slow(message: Message) -> None:
        started.add(message.data["n"])
        await release.wait()
        finished.add(message.data["n"])

    broker = open_broker()
    async with broker:
        sub = await broker.subscribe("conf.drain", slow, group="g", options=replace(FAST, concurrency=4))
        await broker.publish_batch("conf.drain", [{"n": n} for n in range(20)])
        await eventually(lambda: len(started) == 4, "four handlers to start")
        closing = asyncio.ensure_future(sub.aclose())
        await asyncio.sleep(0)
        assert not closing.done(), "close did not wait for running handlers"
        release.set()
        await closing
        assert finished == started, "a started handler was cut off"
        rest = Sink()
        await broker.subscribe("conf.drain", rest, group="g", options=FAST)
        await eventually(lambda: len(started | {m.data["n"] for m in rest.seen}) == 20, "nothing lost")


async def bad_input_is_refused_clearly(open_broker: OpenBroker) -> None:
    async with open_broker() as broker:

        def not_async(message: Message) -> None:
            pass

        try:
            await broker.subscribe("conf.input", not_async, group="g")  # type: ignore[arg-type]
        except ConfigurationError as exc:
            assert "not async" in str(exc) and exc.hint and "async def" in exc.hint
        else:
            raise AssertionError("a sync handler was accepted")
        try:
            await broker.publish("conf.input", b"x" * 2_000_000)
        except MessageTooLarge as exc:
            assert exc.size > exc.limit
        else:
            raise AssertionError("an oversized message was accepted")
        for bad_headers in ({"Bad-Name": "x"}, {"data": "x"}):
            try:
                await broker.publish("conf.input", 1, headers=bad_headers)
            except ValueError as exc:
                assert "cannot be a CloudEvents extension" in str(exc)
            else:
                raise AssertionError(f"header {bad_headers} was accepted")
        try:
            await broker.publish("conf.input", object())
        except TypeError as exc:
            assert "cannot encode object as JSON" in str(exc)
        else:
            raise AssertionError("an unencodable value was accepted")


async def prefetched_messages_never_wait_for_a_poll(open_broker: OpenBroker) -> None:
    """Messages fetched ahead start as soon as a handler slot frees, even with nothing new to fetch."""
    async with open_broker() as broker:
        sink = Sink()
        slow_poll = replace(FAST, concurrency=2, prefetch=20, poll_interval=300.0)
        await broker.publish_batch("conf.prefetch", [{"n": n} for n in range(30)])
        await broker.subscribe("conf.prefetch", sink, group="g", options=slow_poll)
        await eventually(lambda: len(sink.seen) == 30, "every prefetched message, long before a 300 s poll ends")


async def closing_the_publisher_with_10000_in_flight(open_broker: OpenBroker) -> None:
    """Every publish either completes (and its message is kept) or is refused clearly; none is half-done."""
    broker = open_broker()
    await broker.__aenter__()
    tasks = [asyncio.ensure_future(broker.publish("conf.pubclose", {"n": n})) for n in range(10_000)]
    await asyncio.sleep(0)  # let some of them start
    await broker.aclose()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    ids = {o for o in outcomes if isinstance(o, str)}
    refused = [o for o in outcomes if isinstance(o, ConfigurationError)]
    odd = [o for o in outcomes if not isinstance(o, str | ConfigurationError)]
    assert not odd, f"publishes failed other than by a clear refusal: {odd[:3]}"
    assert len(ids) + len(refused) == 10_000
    assert ids, "nothing was published before the close"
    if not broker.capabilities.durable:
        return
    async with open_broker() as again:  # a durable backend kept every message whose publish returned
        sink = Sink()
        await again.subscribe("conf.pubclose", sink, group="g", options=FAST)
        # 10,000 confirmed deliveries take a while on a loaded machine: a generous deadline, not a speed bound
        await eventually(
            lambda: {m.id for m in sink.seen} >= ids, f"all {len(ids)} published messages after reopening", timeout=240
        )


SCENARIOS: list[Scenario] = [
    pubsub_100,
    concurrent_5000,
    topics_isolated,
    handler_errors_are_redelivered,
    cancelled_handlers_leave_their_message,
    a_new_member_continues_after_one_leaves,
    closing_many_members_at_once,
    per_key_order,
    per_key_order_survives_failures,
    groups_fan_out_members_compete,
    new_groups_see_old_messages,
    dead_letters_after_n_deliveries,
    undecodable_messages_go_to_the_dead_letters,
    duplicate_ids_are_stored_once,
    graceful_shutdown_finishes_what_it_started,
    bad_input_is_refused_clearly,
    prefetched_messages_never_wait_for_a_poll,
    closing_the_publisher_with_10000_in_flight,
]


async def run_scenario(scenario: Scenario, open_broker: OpenBroker) -> bool:
    """Run one scenario; returns False (without running it) if the backend lacks a capability it requires."""
    needs: tuple[str, ...] = getattr(scenario, "requires", ())
    probe = open_broker()
    capabilities = probe.capabilities
    await probe.aclose()
    if not all(getattr(capabilities, need) for need in needs):
        return False
    await scenario(open_broker)
    return True
