"""The memory registry against a naive reference model, driven by hypothesis on a fake clock.

After every step: ``list`` shows exactly the model's live instances, and replaying the change log from the start
through a watcher's view (what ``watch`` does) gives the same instances: no change is lost, duplicated or reordered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from meshkit.discovery import HealthStatus, Instance
from meshkit.discovery.base import _apply
from meshkit.discovery.memory import MemoryRegistry
from meshkit.testing import FakeClock

T = TypeVar("T")

IDS = st.sampled_from(["a", "b", "c"])
STATUSES = st.sampled_from(list(HealthStatus))


class RegistryModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.registry = MemoryRegistry(clock=self.clock)
        # id -> (port, status, when the lease ends, ttl)
        self.model: dict[str, tuple[int, HealthStatus, float, float]] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def live(self) -> dict[str, tuple[int, HealthStatus, float, float]]:
        now = self.clock.now()
        self.model = {k: v for k, v in self.model.items() if v[2] > now}
        return self.model

    @rule(iid=IDS, port=st.integers(1, 3), ttl=st.sampled_from([1.0, 5.0]), status=STATUSES)
    def register(self, iid: str, port: int, ttl: float, status: HealthStatus) -> None:
        instance = Instance("svc", iid, "127.0.0.1", port, status=status)
        self.run(self.registry.register(instance, ttl=ttl, keepalive=False))
        self.live()[iid] = (port, status, self.clock.now() + ttl, ttl)

    @rule(iid=IDS)
    def deregister(self, iid: str) -> None:
        removed = self.run(self.registry.deregister("svc", iid))
        assert removed == (self.live().pop(iid, None) is not None)

    @rule(iid=IDS)
    def heartbeat(self, iid: str) -> None:
        renewed = self.run(self.registry.heartbeat("svc", iid))
        held = self.live().get(iid)
        assert renewed == (held is not None)
        if held is not None:
            self.model[iid] = (held[0], held[1], self.clock.now() + held[3], held[3])

    @rule(iid=IDS, status=STATUSES)
    def set_status(self, iid: str, status: HealthStatus) -> None:
        found = self.run(self.registry.set_status("svc", iid, status))
        held = self.live().get(iid)
        assert found == (held is not None)
        if held is not None:
            self.model[iid] = (held[0], status, held[2], held[3])

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 6.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def list_matches_the_model(self) -> None:
        listed = self.run(self.registry.list("svc", healthy_only=False))
        expected = sorted((k, v[0], v[1]) for k, v in self.live().items())
        assert [(i.id, i.port, i.status) for i in listed] == expected
        healthy = self.run(self.registry.list("svc"))
        assert [i.id for i in healthy] == [k for k, _, s in expected if s is HealthStatus.PASSING]

    @invariant()
    def replaying_the_log_gives_the_same_view(self) -> None:
        self.run(self.registry.list("svc"))  # reaps, as every read does
        view: dict[str, Instance] = {}
        for _, entry in self.registry._services["svc"].log if "svc" in self.registry._services else []:
            _apply(view, entry)
        assert sorted((i.id, i.port, i.status) for i in view.values()) == sorted(
            (k, v[0], v[1]) for k, v in self.live().items()
        )

    def teardown(self) -> None:
        self.run(self.registry.aclose())
        self.loop.close()


RegistryModel.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_registry_against_the_model = RegistryModel.TestCase
