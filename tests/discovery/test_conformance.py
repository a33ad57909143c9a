"""The registry conformance suite (meshkit.discovery.testing) against memory (on a fake clock) and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshkit.discovery import connect
from meshkit.discovery.testing import SCENARIOS, Harness, Scenario, run_scenario
from meshkit.testing import FakeClock


def harness(backend: str, folder: Path) -> Harness:
    if backend == "memory":
        clock = FakeClock()
        return Harness(lambda: connect("memory://", clock=clock), clock=clock, ttl=10.0)
    path = folder / "registry.db"
    return Harness(lambda: connect(f"sqlite:///{path}", poll_interval=0.02), ttl=1.0)


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_conformance(backend: str, scenario: Scenario, tmp_path: Path) -> None:
    ran = await run_scenario(scenario, harness(backend, tmp_path))
    if not ran:
        pytest.skip(f"{backend} lacks a capability {scenario.__name__} needs")
