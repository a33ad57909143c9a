"""The consumer runtime's own logic, on the memory backend with a channel made to fail."""

from __future__ import annotations

import logging

import pytest

from meshkit.messaging import Message, SubscriptionOptions, connect
from meshkit.messaging.base import Delivery, GroupChannel, StartFrom
from meshkit.messaging.testing import eventually


@pytest.mark.anyio
async def test_the_fetch_loop_outlives_a_broker_outage(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fetches that raise (a broker restarting) are logged once and retried; handling resumes when it answers."""
    failures = 4
    attempts = 0
    async with connect("memory://") as broker:
        backend = broker._backend
        real_group = backend.group

        async def flaky_group(topic: str, group: str, start: StartFrom) -> GroupChannel:
            channel = await real_group(topic, group, start)
            real_fetch = channel.fetch

            async def fetch(limit: int, wait: float) -> list[Delivery]:
                nonlocal attempts
                attempts += 1
                if attempts <= failures:
                    raise ConnectionError("broker restarting")
                return await real_fetch(limit, wait)

            monkeypatch.setattr(channel, "fetch", fetch)
            return channel

        monkeypatch.setattr(backend, "group", flaky_group)
        seen: list[int] = []

        async def handler(message: Message) -> None:
            seen.append(message.data["n"])

        with caplog.at_level(logging.INFO, logger="meshkit.messaging"):
            await broker.publish_batch("outage", [{"n": n} for n in range(10)])
            await broker.subscribe("outage", handler, group="g", options=SubscriptionOptions(poll_interval=0.01))
            await eventually(lambda: sorted(seen) == list(range(10)), "all 10 handled after the outage")
    assert attempts > failures
    warnings = [r for r in caplog.records if r.getMessage().startswith("could not fetch messages")]
    assert len(warnings) == 1, "one warning per outage, not one per failed attempt"
    assert any(f"after {failures} failed attempts" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_the_next_fetch_overlaps_handling_even_when_handlers_never_suspend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once half the fetched window is handled, the top-up fetch goes out while the rest is still being handled, so
    a remote broker prepares the next batch in parallel (handlers that never await must not starve the fetch loop)."""
    handled = 0
    fetches: list[tuple[int, int]] = []  # (handled when the fetch started, how many it asked for)
    async with connect("memory://") as broker:
        backend = broker._backend
        real_group = backend.group

        async def watched_group(topic: str, group: str, start: StartFrom) -> GroupChannel:
            channel = await real_group(topic, group, start)
            real_fetch = channel.fetch

            async def fetch(limit: int, wait: float) -> list[Delivery]:
                fetches.append((handled, limit))
                return await real_fetch(limit, wait)

            monkeypatch.setattr(channel, "fetch", fetch)
            return channel

        monkeypatch.setattr(backend, "group", watched_group)
        total = 2_000

        async def handler(message: Message) -> None:  # never suspends
            nonlocal handled
            handled += 1

        await broker.publish_batch("overlap", [{"n": n} for n in range(total)])
        options = SubscriptionOptions(concurrency=8, prefetch=92)  # a window of 100, top-ups of 50
        await broker.subscribe("overlap", handler, group="g", options=options)
        await eventually(lambda: handled == total, "all handled")
    first_window = fetches[0][1]
    assert first_window == 100
    # the second fetch is a top-up of half the window, sent when half the first batch was handled, not all of it
    assert fetches[1] == (50, 50), fetches[:4]
    topups = [start for start, _ in fetches[1:] if start < total]
    assert len(topups) >= total // 50 - 2, "a fetch every 50 messages, each while the previous batch was in hand"
