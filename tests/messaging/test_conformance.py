"""The conformance suite (meshkit.messaging.testing) against every backend built so far."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkit.messaging import Broker, connect
from meshkit.messaging.testing import SCENARIOS, OpenBroker, Scenario, run_scenario

BACKENDS = ["memory", "sqlite"]


def opener(backend: str, folder: Path) -> OpenBroker:
    """A function that opens brokers on one backend; for SQLite, every broker it opens shares one new file."""
    if backend == "memory":
        return lambda: connect("memory://")
    files = itertools.count()
    path = folder / f"broker-{next(files)}.db"
    return lambda: connect(f"sqlite:///{path}")


@pytest.mark.anyio
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_conformance(backend: str, scenario: Scenario, tmp_path: Path) -> None:
    ran = await run_scenario(scenario, opener(backend, tmp_path))
    if not ran:
        pytest.skip(f"{backend} lacks a capability {scenario.__name__} needs")


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.skipif(not os.environ.get("MESHKIT_SOAK"), reason="stress mode: MESHKIT_SOAK=1 (make soak)")
@pytest.mark.parametrize("backend", BACKENDS)
async def test_conformance_stress_ten_in_parallel(backend: str, tmp_path: Path) -> None:
    for scenario in SCENARIOS:
        folders = [tmp_path / f"{scenario.__name__}-{i}" for i in range(10)]
        for folder in folders:
            folder.mkdir()
        openers: list[Callable[[], Broker]] = [opener(backend, folder) for folder in folders]
        await asyncio.gather(*(run_scenario(scenario, o) for o in openers))
