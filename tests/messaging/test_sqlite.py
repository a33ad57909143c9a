from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshkit.errors import ConfigurationError
from meshkit.messaging import Message, SubscriptionOptions, connect
from meshkit.messaging.testing import eventually


@pytest.mark.anyio
async def test_an_unreachable_path_names_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder" / "broker.db"
    async with connect(f"sqlite:///{missing}") as broker:
        with pytest.raises(ConfigurationError) as info:
            await broker.publish("t", 1)
    assert str(missing.parent) in str(info.value)
    assert info.value.hint is not None and "mkdir -p" in info.value.hint


@pytest.mark.anyio
async def test_members_of_a_group_share_the_work_fairly(tmp_path: Path) -> None:
    """Three members, each busy with its share: none is starved."""
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    counts = [0, 0, 0]

    def member(i: int) -> Callable[[Message], Awaitable[None]]:
        async def handle(message: Message) -> None:
            counts[i] += 1
            await asyncio.sleep(0.001)  # the work

        return handle

    options = SubscriptionOptions(concurrency=4, prefetch=4, poll_interval=0.05)
    brokers = [connect(url) for _ in range(3)]
    try:
        # every member joins before the work arrives: fairness is about sharing, not about who came first
        for i, broker in enumerate(brokers):
            await broker.subscribe("work", member(i), group="workers", options=options)
        async with connect(url) as producer:
            for start in range(0, 3000, 100):
                await producer.publish_batch("work", list(range(start, start + 100)))
        await eventually(lambda: sum(counts) >= 3000, "3000 handled")
    finally:
        for broker in brokers:
            await broker.aclose()
    assert sum(counts) == 3000
    assert min(counts) >= 300, f"a member was starved (under 10% of the work): {counts}"


@pytest.mark.anyio
async def test_a_new_group_can_start_at_a_time(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    async with connect(url) as broker:
        await broker.publish_batch("audit", [{"n": n} for n in range(3)])
        cut = datetime.now(UTC)
        await eventually(lambda: datetime.now(UTC) > cut, "the clock to move past the cut")
        await broker.publish_batch("audit", [{"n": n} for n in range(3, 5)])
        got: list[int] = []

        async def handle(message: Message) -> None:
            got.append(message.data["n"])

        await broker.subscribe("audit", handle, group="from-cut", options=SubscriptionOptions(start=cut))
        await eventually(lambda: len(got) >= 2, "the messages after the cut")
        assert sorted(got) == [3, 4]
