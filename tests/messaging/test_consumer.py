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
