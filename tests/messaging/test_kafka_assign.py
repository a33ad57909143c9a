"""The Kafka backend's assignment callback, with a stand-in consumer (no broker): new partitions are paused while
the group's start is set, and an error on the way must not leave them paused (aiokafka logs a failing assignment
callback and goes on: paused, the group would stall silently)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import aiokafka.errors as kafka_errors  # type: ignore[import-untyped]
import pytest
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]

from meshkit.messaging.kafka import _KafkaChannel

log = logging.getLogger(__name__)


class _Consumer:
    """The calls on_assigned makes, with a broker that fails every offset lookup (a broker going away)."""

    def __init__(self) -> None:
        self.paused: set[TopicPartition] = set()

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass

    async def committed(self, tp: TopicPartition) -> int | None:
        return None

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        raise kafka_errors.KafkaConnectionError("broker gone")

    async def offsets_for_times(self, times: dict[TopicPartition, int]) -> dict[TopicPartition, Any]:
        raise kafka_errors.KafkaConnectionError("broker gone")

    async def seek_to_end(self, *tps: TopicPartition) -> bool:
        # aiokafka's seek_to_end ends with coordinator.check_errors(), which raises a pending KafkaError
        raise kafka_errors.KafkaConnectionError("broker gone")


@pytest.mark.anyio
async def test_a_failing_start_lookup_does_not_leave_partitions_paused() -> None:
    backend: Any = SimpleNamespace(_errors=kafka_errors, options=SimpleNamespace(revoke_timeout=1.0))
    channel = _KafkaChannel(backend, "t", "p.t", "g", "p.g", 2, "latest")
    consumer = _Consumer()
    channel._consumer = consumer
    tps = [TopicPartition("p.t", 0), TopicPartition("p.t", 1)]
    try:  # what aiokafka's coordinator does with the listener's exception
        await channel.on_assigned(set(tps))
    except Exception:
        log.exception("listener failed on partition assignment (aiokafka logs this and goes on)")
    assert not consumer.paused, f"partitions left paused until the next rebalance: {sorted(consumer.paused)}"
    assert channel._joined, "the member counts as joined: fetch does not wait for a join that happened"
    assert all(part.min_timestamp is not None for part in channel._parts.values()), (
        "records stamped before a 'latest' start are skipped even where the seek failed"
    )
