"""What a proxy's acquire/release tells outlier detection: a success after successes is skipped (nothing to reset),
and the ejections are exactly those of telling the detector every outcome."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from meshkit.client import ClientOptions, ServiceClient
from meshkit.discovery import Instance, Registry, connect
from meshkit.discovery.health import OutlierDetector, OutlierPolicy
from meshkit.testing import FakeClock, eventually

POLICY = OutlierPolicy(consecutive_errors=3, base_ejection=600, max_ejection=600, max_ejected_fraction=1.0)


@pytest.fixture
async def client() -> AsyncIterator[ServiceClient]:
    async with connect("memory://") as registry:
        await _register(registry)
        options = ClientOptions(retry=None, breaker=None, bulkhead=None, outlier=POLICY)
        async with ServiceClient("payments", registry, options=options, clock=FakeClock()) as c:
            await c.start(timeout=5.0)
            yield c


async def _register(registry: Registry) -> None:
    await registry.register(Instance(service="payments", id="a", host="127.0.0.1", port=1))


def _call(client: ServiceClient, status: int | None) -> None:
    instance = client.acquire()
    client.release(instance, status)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "statuses",
    [
        [200, 200, 503, 503, 200, 503, 503, 200, 503, None, 404, 503, 503, 503],
        [503, 503, 200, 200, 503, 503, 503],
        [None, 200, 503, 503, 200, 200, 200, 503, 503],
        [200] * 5 + [503, 502, 500],
        [503, 503, 502, 200, 503],
    ],
)
async def test_ejections_are_those_of_telling_the_detector_every_outcome(
    client: ServiceClient, statuses: list[int | None]
) -> None:
    reference = OutlierDetector(POLICY, clock=FakeClock())
    for status in statuses:
        if reference.is_ejected("a"):
            break
        reference.record("a", status)
        _call(client, status)
        assert client.outlier is not None
        assert client.outlier.is_ejected("a") == reference.is_ejected("a"), f"after {status} in {statuses}"


@pytest.mark.anyio
async def test_a_success_after_errors_resets_their_count(client: ServiceClient) -> None:
    assert client.outlier is not None
    for status in (503, 503, 200, 503, 503):
        _call(client, status)
    assert not client.outlier.is_ejected("a")  # 2 errors, a success, 2 errors: never 3 in a row
    _call(client, 200)
    _call(client, 200)  # a success after a success: nothing to tell the detector
    for _ in range(2):
        _call(client, None)
    assert not client.outlier.is_ejected("a")
    _call(client, 500)
    assert client.outlier.is_ejected("a")


@pytest.mark.anyio
async def test_an_abandoned_attempt_tells_the_detector_nothing(client: ServiceClient) -> None:
    assert client.outlier is not None
    for _ in range(5):
        instance = client.acquire()
        client.release(instance, None, counted=False)
    assert not client.outlier.is_ejected("a")
    assert dict(client.outstanding) == {}


@pytest.mark.anyio
async def test_listeners_hear_of_instance_breakers_made_and_dropped() -> None:
    async with connect("memory://") as registry:
        await _register(registry)
        async with ServiceClient("payments", registry, clock=FakeClock()) as client:  # the default breakers
            heard: list[set[str]] = []
            stop = client.on_instance_breaker(lambda: heard.append(set(client.instance_breakers())))
            await client.start(timeout=5.0)
            assert heard == [{"a"}], "made, and in instance_breakers when the listener hears of it"
            await registry.register(Instance(service="payments", id="b", host="127.0.0.1", port=2))
            await eventually(lambda: heard[-1] == {"a", "b"}, "b's breaker made")
            await registry.deregister("payments", "a")
            await eventually(lambda: heard[-1] == {"b"}, "a's breaker dropped")
            stop()
            await registry.deregister("payments", "b")
            await eventually(lambda: not client.instance_breakers(), "b dropped too")
            assert heard[-1] == {"b"}, "stopped: not told any more"


@pytest.mark.anyio
async def test_a_snapshot_of_many_instances_tells_the_listeners_once() -> None:
    async with connect("memory://") as registry:
        for n in range(6):
            await registry.register(Instance(service="payments", id=f"i{n}", host="127.0.0.1", port=1000 + n))
        async with ServiceClient("payments", registry, clock=FakeClock()) as client:
            heard: list[set[str]] = []
            client.on_instance_breaker(lambda: heard.append(set(client.instance_breakers())))
            await client.start(timeout=5.0)
            assert heard == [{f"i{n}" for n in range(6)}], "one notice for the whole snapshot, with every breaker"


@pytest.mark.anyio
async def test_a_failing_breaker_listener_is_logged_and_the_others_still_hear(caplog: pytest.LogCaptureFixture) -> None:
    async with connect("memory://") as registry:
        await _register(registry)
        async with ServiceClient("payments", registry, clock=FakeClock()) as client:
            heard: list[set[str]] = []

            def fails() -> None:
                raise RuntimeError("a listener's bug")

            client.on_instance_breaker(fails)
            client.on_instance_breaker(lambda: heard.append(set(client.instance_breakers())))
            with caplog.at_level(logging.ERROR, logger="meshkit.client"):
                await client.start(timeout=5.0)
            assert heard == [{"a"}], "the second listener heard despite the first"
            assert "a listener of payments's instance breakers failed" in caplog.text
            assert [i.id for i in client.rotation] == ["a"], "the client's view is whole"


@pytest.mark.anyio
async def test_stopping_one_of_two_subscriptions_of_a_function_keeps_the_other() -> None:
    async with connect("memory://") as registry:
        await _register(registry)
        async with ServiceClient("payments", registry, clock=FakeClock()) as client:
            heard: list[set[str]] = []

            def told() -> None:
                heard.append(set(client.instance_breakers()))

            stop_first = client.on_instance_breaker(told)
            client.on_instance_breaker(told)  # a second subscriber that happens to pass the same function
            stop_first()
            stop_first()  # a second call does nothing
            await client.start(timeout=5.0)
            assert heard == [{"a"}], "the second subscription is told of a's breaker, once"
