"""The memory broker's dedup window: ids are dropped within it, forgotten after it, and the ids it keeps are only
those of the window (forgetting them is a trim of the oldest, not a rebuild of every id per publish)."""

from __future__ import annotations

import pytest

from meshkit.messaging import Broker
from meshkit.messaging.memory import MemoryBackend
from meshkit.testing import FakeClock

pytestmark = pytest.mark.anyio


async def test_ids_are_dropped_within_the_window_and_forgotten_after_it() -> None:
    clock = FakeClock()
    backend = MemoryBackend(dedup_window=600.0, clock=clock)
    async with Broker(backend) as broker:
        for n in range(3):
            await broker.publish("t", {"n": n}, id=f"m{n}")
        await broker.publish("t", {"n": 0}, id="m0")  # a re-send within the window: dropped
        clock.advance(300.0)
        await broker.publish("t", {"n": 3}, id="m3")
        seen = backend._topics["t"].seen
        assert list(seen) == ["m0", "m1", "m2", "m3"]
        clock.advance(301.0)  # m0..m2 are out of the window now, m3 is not
        await broker.publish("t", {"n": 0}, id="m0")  # accepted again
        await broker.publish("t", {"n": 3}, id="m3")  # still dropped
        assert list(seen) == ["m3", "m0"]
        log = backend._topics["t"].log
        assert [e.id for e in log] == ["m0", "m1", "m2", "m3", "m0"]
