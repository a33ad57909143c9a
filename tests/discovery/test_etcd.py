"""The etcd registry against a real etcd (Debian's etcd-server 3.4, started by the tests on free ports).

One server serves the module (every test uses a key prefix of its own); the restart tests start one of their own so
they can stop it, restart it, and wipe its data. scripts/install-etcd.sh installs etcd when it is missing; where it
cannot, these tests are skipped, except under CI, where they fail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Iterator

import pytest

from meshkit.discovery import HealthStatus, Instance, connect
from meshkit.discovery.base import LogEntry, Resync
from meshkit.discovery.etcd import EtcdRegistry, from_url
from meshkit.discovery.testing import SCENARIOS, Harness, Recorder, Scenario, run_scenario
from meshkit.errors import ConfigurationError, MissingDependency, Unavailable
from meshkit.testing import eventually
from tests.discovery.etcd_server import EtcdServer, require_etcd


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(require_etcd()) as server:
        yield server


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """A server of the test's own, to stop, restart and wipe."""
    with EtcdServer(require_etcd()) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}/"


def _open(server: EtcdServer, prefix: str) -> EtcdRegistry:
    registry = connect(server.url, prefix=prefix, retry_interval=0.1)
    assert isinstance(registry, EtcdRegistry)
    return registry


async def _ids(registry: EtcdRegistry, service: str) -> list[str]:
    return [i.id for i in await registry.list(service, healthy_only=False)]


async def _ids_once_up(registry: EtcdRegistry, service: str) -> list[str] | None:
    """The ids, or None while the registry cannot reach etcd (reconnecting)."""
    try:
        return await _ids(registry, service)
    except Unavailable:
        return None


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_conformance(scenario: Scenario, etcd: EtcdServer, prefix: str) -> None:
    harness = Harness(lambda: _open(etcd, prefix), ttl=1.0)
    assert await run_scenario(scenario, harness)


@pytest.mark.anyio
async def test_layout_is_one_key_per_instance_on_a_lease_of_its_own(etcd: EtcdServer, prefix: str) -> None:
    registry = _open(etcd, prefix)
    async with registry:
        instance = Instance("or/ders", "o 1", "10.0.0.1", 8001, metadata={"zone": "eu"})
        await registry.register(instance, ttl=30, keepalive=False)
        await registry.register(Instance("or/ders", "o-2", "10.0.0.2", 8002), ttl=1.2, keepalive=False)
        client = registry._connection()
        kv = await client.get(f"{prefix}or%2Fders/o%201".encode())  # names are percent-encoded: no stray '/'
        assert kv is not None
        fields = json.loads(kv.value)
        assert fields["h"] == "passing" and fields["t"] == 30 and json.loads(fields["d"])["metadata"] == {"zone": "eu"}
        info = await client.get_lease_info(kv.lease)
        assert info.grantedTTL == 30 and 0 < info.TTL <= 30
        assert [key.decode() for key in info.keys] == [f"{prefix}or%2Fders/o%201"]  # the key is the lease
        other = await client.get(f"{prefix}or%2Fders/o-2".encode())
        assert (await client.get_lease_info(other.lease)).grantedTTL == 2  # whole seconds, rounded up
        assert await client.get(f"{prefix}~epoch".encode()) is None  # written by the first watcher's snapshot
        _, cursor = await registry._snapshot("or/ders")
        epoch = await client.get(f"{prefix}~epoch".encode())
        assert cursor == f"{epoch.header.revision}:{epoch.value.decode()}"
        assert await registry.list("or") == []  # another service's keys never fall under this one's


@pytest.mark.anyio
async def test_re_registering_moves_the_key_to_a_new_lease_and_frees_the_old_one(etcd: EtcdServer, prefix: str) -> None:
    registry = _open(etcd, prefix)
    async with registry:
        first = await registry.register(Instance("svc", "a", "h", 1), ttl=30, keepalive=False)
        client = registry._connection()
        old = (await client.get(f"{prefix}svc/a".encode())).lease
        again = await registry.register(Instance("svc", "a", "h", 2), ttl=30, keepalive=False)
        new = (await client.get(f"{prefix}svc/a".encode())).lease
        assert new != old
        assert (await client.get_lease_info(old)).TTL == -1  # revoked
        assert again.instance.registered == first.instance.registered  # the same registration, updated
        assert [i.port for i in await registry.list("svc")] == [2]


@pytest.mark.anyio
async def test_a_lease_expires_when_its_heartbeats_stop(etcd: EtcdServer, prefix: str) -> None:
    registry, observer = _open(etcd, prefix), _open(etcd, prefix)
    async with registry, observer:
        recorder = Recorder(observer.watch("svc"))
        try:
            await recorder.started(Harness(lambda: registry))
            lease = await registry.register(Instance("svc", "a", "h", 1), ttl=1.0)
            await eventually(lambda: lease.renewals >= 6, "six heartbeats (two TTLs)")
            assert await _ids(observer, "svc") == ["a"]  # kept alive past its TTL
            await lease.stop()  # the process "dies": no more heartbeats, no deregistration
            await eventually(lambda: recorder.seen() == [("added", "a"), ("removed", "a")], "etcd to expire it")
            assert await _ids(observer, "svc") == []
            assert await registry.heartbeat("svc", "a") is False
        finally:
            await recorder.aclose()


@pytest.mark.anyio
async def test_a_watcher_resumes_from_its_cursor_without_loss_on_one_stream(etcd: EtcdServer, prefix: str) -> None:
    registry = _open(etcd, prefix)
    async with registry:
        _, cursor = await registry._snapshot("svc")
        expected: list[tuple[str, str]] = []
        for n in range(20):
            await registry.register(Instance("svc", f"i{n % 4}", "h", 1000 + n), ttl=30, keepalive=False)
            expected.append(("added" if n < 4 else "changed", f"i{n % 4}"))
            if n % 5 == 4:
                await registry.deregister("svc", f"i{n % 4}")
                expected.append(("removed", f"i{n % 4}"))
        seen: list[LogEntry] = []
        while len(seen) < len(expected):
            entries, cursor = await registry._changes("svc", cursor)
            seen.extend(entries)
        kinds = [(e.kind, e.id) for e in seen]
        # a re-registration after a removal is a new key (version 1): "added"; the rest follow the writes' order
        assert [i for _, i in kinds] == [i for _, i in expected]
        assert all(k == "removed" for (k, _), (x, _) in zip(kinds, expected, strict=True) if x == "removed")
        assert [e.instance.port for e in seen if e.instance is not None][-1] == 1019
        for n in range(3):  # later reads go on with the same etcd watch stream
            status = HealthStatus.CRITICAL if n % 2 == 0 else HealthStatus.PASSING
            assert await registry.set_status("svc", "i0", status) is True
            entries, cursor = await registry._changes("svc", cursor)
            assert [(e.kind, e.id) for e in entries] == [("changed", "i0")]
        assert registry.streams_opened == 1


@pytest.mark.anyio
async def test_a_compacted_history_makes_a_watcher_resync(etcd: EtcdServer, prefix: str) -> None:
    registry = _open(etcd, prefix)
    async with registry:
        await registry.register(Instance("svc", "a", "h", 1), ttl=30, keepalive=False)
        _, cursor = await registry._snapshot("svc")
        for port in range(2, 6):
            await registry.register(Instance("svc", "a", "h", port), ttl=30, keepalive=False)
        client = registry._connection()
        head = await client.get(f"{prefix}svc/a".encode())
        await client.compact(head.header.revision)
        with pytest.raises(Resync):
            await registry._changes("svc", cursor)
        async with registry.watch("svc") as changes:  # a watch reads a new snapshot and goes on
            first = await anext(changes)
            assert (first.kind, first.instance.port) == ("added", 5)


@pytest.mark.anyio
async def test_a_watch_closed_between_reads_leaves_no_stream_open(etcd: EtcdServer, prefix: str) -> None:
    registry = _open(etcd, prefix)
    await registry.register(Instance("svc", "a", "h", 1), ttl=30, keepalive=False)
    async with registry.watch("svc") as changes:
        await anext(changes)
        await registry.register(Instance("svc", "b", "h", 1), ttl=30, keepalive=False)
        await anext(changes)
    assert len(registry._streams) == 1  # parked, in case its watcher asks again
    await registry.aclose()
    assert registry._streams == set() and registry._parked == {}


@pytest.mark.anyio
async def test_an_etcd_restart_keeps_registrations_and_watches(
    own_etcd: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshkit.discovery.etcd")
    registry, observer = _open(own_etcd, prefix), _open(own_etcd, prefix)
    async with registry, observer:
        # etcd renews every lease for its TTL when it starts again; 5 s leaves the heartbeats time to reconnect
        lease = await registry.register(Instance("svc", "a", "h", 1), ttl=5.0)
        recorder = Recorder(observer.watch("svc"))
        try:
            await recorder.wait_for(1, Harness(lambda: observer))
            own_etcd.stop()
            with pytest.raises(Unavailable, match="etcd registry"):
                await observer.list("svc")
            own_etcd.spawn()
            await eventually(lambda: asyncio.to_thread(own_etcd.healthy), "etcd to come back")
            renewed = lease.renewals

            async def back() -> bool:
                return await _ids_once_up(observer, "svc") is not None

            await eventually(back, "the registry to reconnect by itself")
            assert await _ids(observer, "svc") == ["a"]  # etcd kept the lease (and renews it on restart)
            await registry.register(Instance("svc", "b", "h", 2), ttl=5.0)
            await eventually(lambda: len(recorder.changes) >= 2, "the watch to see a change after the restart")
            assert recorder.seen() == [("added", "a"), ("added", "b")]
            await eventually(lambda: lease.renewals > renewed, "the heartbeats to renew the lease again")
            assert observer.streams_opened >= 2  # the watch opened a new stream from its cursor
            assert lease.reregistrations == 0
            assert not [r for r in caplog.records if "history changed" in r.getMessage()]  # resumed, no resync
        finally:
            await recorder.aclose()


@pytest.mark.anyio
async def test_an_etcd_that_lost_its_data_gets_the_registrations_back(
    own_etcd: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshkit.discovery.etcd")
    registry, observer = _open(own_etcd, prefix), _open(own_etcd, prefix)
    async with registry, observer:
        lease = await registry.register(Instance("svc", "a", "h", 1), ttl=1.0)
        await registry.register(Instance("svc", "gone", "h", 9), ttl=60, keepalive=False)  # nobody renews this one
        for n in range(40):  # a history longer than the new server's will be when the watcher comes back
            await registry.set_status("svc", "gone", HealthStatus.CRITICAL if n % 2 else HealthStatus.PASSING)
        recorder = Recorder(observer.watch("svc"))
        try:
            await recorder.wait_for(2, Harness(lambda: observer))
            own_etcd.stop(kill=True)
            own_etcd.wipe()
            own_etcd.spawn()
            await eventually(lambda: asyncio.to_thread(own_etcd.healthy), "a new, empty etcd")
            await eventually(lambda: lease.reregistrations >= 1, "the lease to find itself lost and register again")

            async def only_a() -> bool:
                return await _ids_once_up(observer, "svc") == ["a"]

            await eventually(only_a, "the registration to come back (and only it)")
            await eventually(
                lambda: ("removed", "gone") in recorder.seen(), "the watch to drop what the data loss took"
            )
            await registry.register(Instance("svc", "c", "h", 3), ttl=60, keepalive=False)
            await eventually(lambda: ("added", "c") in recorder.seen(), "the watch to go on after the resync")
            assert [r for r in caplog.records if "history changed" in r.getMessage()]
            assert sorted(i.id for i in await observer.list("svc")) == ["a", "c"]
        finally:
            await recorder.aclose()


@pytest.mark.anyio
async def test_a_cursor_from_a_lost_history_resyncs_even_when_the_new_one_is_longer(
    own_etcd: EtcdServer, prefix: str
) -> None:
    registry = _open(own_etcd, prefix)
    async with registry:
        await registry.register(Instance("svc", "a", "h", 1), ttl=60, keepalive=False)
        _, cursor = await registry._snapshot("svc")
        own_etcd.stop(kill=True)
        own_etcd.wipe()
        own_etcd.spawn()
        await eventually(lambda: asyncio.to_thread(own_etcd.healthy), "a new, empty etcd")
        revision = int(cursor.partition(":")[0])
        for port in range(revision + 5):  # the new history passes the old cursor: revisions alone cannot tell
            await registry.register(Instance("svc", "b", "h", port), ttl=60, keepalive=False)
        _, fresh = await registry._snapshot("svc")
        assert int(fresh.partition(":")[0]) > revision
        with pytest.raises(Resync):  # the epoch token is another one
            await registry._changes("svc", cursor)
        with pytest.raises(Resync):
            await registry._changes("svc", "not-a-cursor")


def test_urls_and_options() -> None:
    registry = from_url("etcd://etcd.internal:23790?prefix=app/&timeout=2.5&retry_interval=1")
    assert (registry.host, registry.port, registry.prefix, registry.timeout, registry.retry_interval) == (
        "etcd.internal",
        23790,
        "app/",
        2.5,
        1.0,
    )
    assert from_url("etcd://localhost").port == 2379
    assert from_url("etcd://[::1]:2379/").host == "::1"
    assert from_url("etcd://h", prefix="kw/").prefix == "kw/"
    bad = {
        "etcd://localhost?nope=1": "unknown etcd registry option 'nope'",
        "etcd://localhost?timout=1": "unknown etcd registry option",
        "etcd://localhost?timeout=soon": "bad value 'soon' for etcd registry option 'timeout'",
        "etcd://localhost?timeout=0": "'timeout' must be positive",
        "etcd://localhost:http": "bad port",
        "etcd://localhost:99999": "bad port",
        "etcd://": "names no host",
        "etcd://h1:2379,h2:2379": "names several endpoints",
        "etcd://localhost/app": "has a path",
        "etcd://user:secret@localhost": "authentication is not supported",
        "redis://localhost": "not an etcd URL",
    }
    for url, message in bad.items():
        with pytest.raises(ConfigurationError, match=message) as caught:
            from_url(url)
        assert "secret" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="unknown etcd registry option 'timout'") as typo:
        from_url("etcd://localhost", timout=1)
    assert typo.value.hint == "did you mean 'timeout'?"
    assert "timeout" not in repr(from_url("etcd://localhost?timeout=3"))  # errors and logs show no query


@pytest.mark.anyio
async def test_an_unreachable_server_is_unavailable() -> None:
    async with connect("etcd://127.0.0.1:1", timeout=1) as registry:
        with pytest.raises(Unavailable, match=r"etcd registry at etcd://127\.0\.0\.1:1 failed to list instances"):
            await registry.list("orders")
        with pytest.raises(Unavailable, match="etcd registry"):
            await registry.register(Instance("orders", "o-1", "h", 1), ttl=5)
        async with registry.watch("orders") as changes:
            with pytest.raises(Unavailable, match="failed to read a snapshot"):
                await anext(changes)


@pytest.mark.anyio
async def test_a_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aetcd", None)  # import aetcd now raises ImportError
    async with connect("etcd://127.0.0.1:2379") as registry:
        with pytest.raises(MissingDependency, match=r"pip install 'meshkit\[etcd\]'"):
            await registry.list("orders")
