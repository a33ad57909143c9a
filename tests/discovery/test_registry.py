"""The registry's own logic: URLs, values, the watcher's view, SQLite specifics and the public surface."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import meshkit.discovery
from meshkit.discovery import Change, HealthStatus, Instance, connect
from meshkit.discovery.base import LogEntry, Resync, _apply, _diff
from meshkit.discovery.memory import MemoryRegistry
from meshkit.discovery.sqlite import SqliteRegistry
from meshkit.errors import ConfigurationError, MeshkitError
from meshkit.testing import FakeClock

MODULES = [
    "meshkit.discovery",
    "meshkit.discovery.base",
    "meshkit.discovery.memory",
    "meshkit.discovery.sqlite",
    "meshkit.discovery.redis",
    "meshkit.discovery.health",
    "meshkit.discovery.testing",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_are_importable_sorted_and_unique(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    assert exported == sorted(exported, key=lambda n: (n.startswith("_"), n.upper() != n, n))
    assert [n for n in exported if not hasattr(module, n)] == []


def test_importing_discovery_does_no_work() -> None:
    code = (
        "import logging, threading, sys\n"
        "before = threading.active_count()\n"
        "import meshkit.discovery, meshkit.discovery.health, meshkit.discovery.sqlite, meshkit.discovery.redis\n"
        "assert threading.active_count() == before, 'import started a thread'\n"
        "heavy = [m for m in ('aiohttp', 'redis') if m in sys.modules]\n"
        "assert not heavy, f'import pulled in {heavy}'\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


def test_connect_dispatches_by_scheme(tmp_path: Path) -> None:
    assert isinstance(connect("memory://"), MemoryRegistry)
    registry = connect(f"sqlite:///{tmp_path / 'r.db'}?poll_interval=0.5")
    assert isinstance(registry, SqliteRegistry)
    assert registry.path == tmp_path / "r.db" and registry.poll_interval == 0.5
    with pytest.raises(ConfigurationError, match="unknown registry URL scheme 'consul'") as info:
        connect("consul://localhost")
    assert info.value.hint is not None and "sqlite:///" in info.value.hint
    for bad in ("memory://x", "memory://?a=1"):
        with pytest.raises(ConfigurationError, match="not a memory registry URL"):
            connect(bad)
    with pytest.raises(ConfigurationError, match="unknown memory registry option"):
        connect("memory://", colour="red")
    with pytest.raises(ConfigurationError, match="not a SQLite registry URL"):
        connect("sqlite://host/x.db")
    with pytest.raises(ConfigurationError, match="unknown SQLite registry option 'nope'"):
        connect("sqlite:///x.db?nope=1")
    with pytest.raises(ConfigurationError, match="unknown SQLite registry option"):
        connect("sqlite:///x.db", nope=1)
    with pytest.raises(ConfigurationError, match="bad value"):
        connect("sqlite:///x.db?retention=forever")


def test_instances_are_values() -> None:
    a = Instance("orders", "o-1", "::1", 8000, metadata={"zone": "a"}, tags=["x"])  # type: ignore[arg-type]
    assert a.tags == ("x",) and a.address == "[::1]:8000" and a.healthy
    same = Instance("orders", "o-1", "::1", 8000, metadata={"zone": "a"}, tags=("x",), registered=5.0)
    assert a == same and hash(a) == hash(same)  # times are not part of what an instance is
    assert Instance.from_stored(a.descriptor(), "critical", 1.0, 2.0) == Instance(
        "orders", "o-1", "::1", 8000, metadata={"zone": "a"}, tags=("x",), status=HealthStatus.CRITICAL
    )
    with pytest.raises(ConfigurationError):
        Instance("", "o-1", "h", 1)
    with pytest.raises(ConfigurationError):
        Instance("orders", "o-1", "h", 70000)
    with pytest.raises(ValueError, match="sick"):
        Instance("orders", "o-1", "h", 1, status="sick")  # type: ignore[arg-type]


def test_the_watcher_view_ignores_what_it_cannot_know() -> None:
    view: dict[str, Instance] = {}
    a = Instance("s", "a", "h", 1)
    assert _apply(view, LogEntry("removed", "a", None)) is None  # removed before the watcher saw it
    assert _apply(view, LogEntry("added", "a", a)) == Change("added", a)
    assert _apply(view, LogEntry("changed", "a", a)) is None  # nothing it can see changed
    moved = Instance("s", "a", "h", 2)
    assert _apply(view, LogEntry("added", "a", moved)) == Change("changed", moved)
    b = Instance("s", "b", "h", 1, registered=1.0)
    assert _diff(view, [b]) == [Change("removed", moved), Change("added", b)]


@pytest.mark.anyio
async def test_a_closed_registry_refuses_work() -> None:
    registry = connect("memory://")
    await registry.aclose()
    with pytest.raises(ConfigurationError, match="closed"):
        await registry.list("s")
    with pytest.raises(ConfigurationError, match="closed"):
        registry.watch("s")
    with pytest.raises(ConfigurationError, match="ttl must be positive"):
        await connect("memory://").register(Instance("s", "a", "h", 1), ttl=0)


@pytest.mark.anyio
async def test_memory_watchers_resync_when_the_log_was_trimmed() -> None:
    clock = FakeClock()
    async with MemoryRegistry(retention=2, clock=clock) as registry:
        _, cursor = await registry._snapshot("s")
        for port in range(1, 6):
            await registry.register(Instance("s", "a", "h", port), ttl=60, keepalive=False)
        with pytest.raises(Resync):
            await registry._changes("s", cursor)


@pytest.mark.anyio
async def test_sqlite_watchers_resync_when_the_log_was_trimmed(tmp_path: Path) -> None:
    async with SqliteRegistry(tmp_path / "r.db", retention=-1.0) as registry:  # every change is old at once
        _, cursor = await registry._snapshot("s")
        for port in range(1, 3):
            await registry.register(Instance("s", "a", "h", port), ttl=60, keepalive=False)
        for port in range(3, 200):  # the log is trimmed every hundredth write
            await registry.register(Instance("s", "a", "h", port), ttl=60, keepalive=False)
        with pytest.raises(Resync):
            await registry._changes("s", cursor)
        async with registry.watch("s") as changes:  # a new watcher starts from a snapshot and is not affected
            first = await anext(changes)
            assert (first.kind, first.instance.port) == ("added", 199)


@pytest.mark.anyio
async def test_sqlite_needs_an_existing_folder(tmp_path: Path) -> None:
    async with connect(f"sqlite:///{tmp_path / 'missing' / 'r.db'}") as registry:
        with pytest.raises(ConfigurationError, match="does not exist") as info:
            await registry.list("s")
        assert info.value.hint is not None and "mkdir" in info.value.hint


@pytest.mark.anyio
async def test_a_failing_heartbeat_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()

    class Flaky(MemoryRegistry):
        failures = 1

        async def _touch(self, service: str, instance_id: str) -> bool:
            if self.failures:
                self.failures -= 1
                raise MeshkitError("the backend is down")
            return await super()._touch(service, instance_id)

    async with Flaky(clock=clock) as registry:
        lease = await registry.register(Instance("s", "a", "h", 1), ttl=3.0)
        for _ in range(2):
            await clock.wait_for_sleepers(1)
            clock.advance(1.0)
        await clock.wait_for_sleepers(1)
        assert lease.renewals == 1
        assert "heartbeat of s/a failed: the backend is down" in caplog.text
        assert [i.id for i in await registry.list("s")] == ["a"]


def test_the_package_docstring_names_every_backend() -> None:
    doc = meshkit.discovery.__doc__ or ""
    for scheme in ("memory://", "sqlite:///", "redis://"):
        assert scheme in doc
