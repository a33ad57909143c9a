"""ServiceClient against real HTTP servers and real registries: resolution, retries, errors, tracing, lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from meshkit._core.clock import Clock
from meshkit.client import ClientOptions, HttpTransport, Request, Response, ServiceClient
from meshkit.client.options import is_server_error
from meshkit.discovery import HealthStatus, Instance, Registry, connect
from meshkit.discovery.health import OutlierPolicy
from meshkit.errors import CircuitOpen, ConfigurationError, HTTPStatusError, TimeoutExceeded, Unavailable
from meshkit.resilience import CircuitBreaker, Constant, Retry
from meshkit.testing import FakeClock, eventually
from meshkit.tracing import extracted
from tests.client.servers import Backend, backends, register
from tests.servers import free_port

#: no waiting between attempts, so the tests measure behaviour, not backoff
FAST = ClientOptions(retry=Retry(attempts=3, backoff=Constant(0.0)))


class First:
    """A balancer that always takes the first instance (by id): makes "where did the retry go" deterministic."""

    def choose(self, instances: Sequence[Instance], outstanding: Mapping[str, int]) -> Instance:
        return instances[0]


FIRST = ClientOptions(balancer=First(), retry=Retry(attempts=3, backoff=Constant(0.0)), breaker=None, outlier=None)


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    async with connect("memory://") as reg:
        yield reg


@pytest.mark.anyio
async def test_a_get_reaches_the_registered_instance(registry: Registry) -> None:
    async with Backend("p-1") as server:
        await register(registry, "payments", server)
        async with ServiceClient("payments", registry) as client:
            response = await client.get("/charges/7", params={"expand": ["card", "refunds"], "live": True})
    assert response.status == 200
    assert response.instance == server.instance("payments")
    assert response.json() == {
        "instance": "p-1",
        "n": 1,
        "method": "GET",
        "path": "/charges/7",
        "query": "expand=card&expand=refunds&live=true",
        "body": "",
    }
    assert response.headers["Content-Type"].startswith("application/json")
    assert server.hits == 1


@pytest.mark.anyio
async def test_a_post_sends_json_and_headers(registry: Registry) -> None:
    async with Backend("p-1") as server:
        await register(registry, "payments", server)
        async with ServiceClient("payments", registry) as client:
            response = await client.post("/charges?v=2", json={"cents": 1250}, headers={"X-Tenant": "acme"})
    assert response.json()["body"] == '{"cents":1250}'
    assert response.json()["query"] == "v=2"
    seen = server.seen[0]
    assert (seen.method, seen.path) == ("POST", "/charges")
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Tenant"] == "acme"


@pytest.mark.anyio
async def test_every_request_carries_the_callers_traceparent(registry: Registry) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with Backend("p-1") as server:
        await register(registry, "payments", server)
        async with ServiceClient("payments", registry) as client:
            with extracted({"traceparent": traceparent, "tracestate": "acme=1"}):
                await client.get("/a")
                await client.post("/b", json={})
            await client.get("/outside")
    assert [s.headers.get("traceparent") for s in server.seen] == [traceparent, traceparent, None]
    assert server.seen[0].headers.get("tracestate") == "acme=1"


@pytest.mark.anyio
async def test_a_callers_own_traceparent_wins(registry: Registry) -> None:
    mine = "00-11111111111111111111111111111111-2222222222222222-01"
    async with Backend("p-1") as server:
        await register(registry, "payments", server)
        async with ServiceClient("payments", registry) as client:
            with extracted({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}):
                await client.get("/a", headers=[("TraceParent", mine)])
    assert server.seen[0].headers["traceparent"] == mine


@pytest.mark.anyio
async def test_a_retry_goes_to_another_instance(registry: Registry) -> None:
    async with backends("a", "b") as (bad, good):
        bad.mode = "fail"
        await register(registry, "payments", bad, good)
        async with ServiceClient("payments", registry, options=FIRST) as client:
            responses = [await client.get(f"/r/{n}") for n in range(10)]
    # every call tried "a" first (the balancer says so), and its retry went to "b", not to "a" again
    assert [(r.status, r.instance.id if r.instance else None) for r in responses] == [(200, "b")] * 10
    assert (bad.hits, good.hits) == (10, 10)


@pytest.mark.anyio
async def test_the_last_5xx_is_returned_when_every_attempt_fails(registry: Registry) -> None:
    async with backends("a", "b", mode="fail") as servers:
        await register(registry, "payments", *servers)
        async with ServiceClient("payments", registry, options=FIRST) as client:
            response = await client.get("/x")
    assert response.status == 503
    assert sum(s.hits for s in servers) == 3  # 3 attempts: a, b, then one of them again
    with pytest.raises(HTTPStatusError) as info:
        response.raise_for_status()
    assert info.value.status == 503
    assert info.value.response is response
    assert "GET /x answered 503 (server error) (payments at 127.0.0.1:" in str(info.value)


@pytest.mark.anyio
async def test_a_post_is_not_retried_after_it_was_sent(registry: Registry) -> None:
    async with backends("a", "b") as (bad, good):
        bad.mode = "fail"
        await register(registry, "payments", bad, good)
        async with ServiceClient("payments", registry, options=FIRST) as client:
            response = await client.post("/charges", json={"cents": 5})
            assert (response.status, bad.hits, good.hits) == (503, 1, 0)
            patched = await client.patch("/charges/1", json={"cents": 6})
            assert (patched.status, bad.hits, good.hits) == (503, 2, 0)

            marked = await client.post("/charges", json={"cents": 5}, idempotent=True)
            assert (marked.status, marked.instance and marked.instance.id) == (200, "b")
            keyed = await client.post("/charges", json={"cents": 5}, headers={"Idempotency-Key": "k-1"})
            assert (keyed.status, keyed.instance and keyed.instance.id) == (200, "b")
            put = await client.put("/charges/1", json={"cents": 7})
            assert (put.status, put.instance and put.instance.id) == (200, "b")
    assert [s.method for s in bad.seen] == ["POST", "PATCH", "POST", "POST", "PUT"]
    assert [s.method for s in good.seen] == ["POST", "POST", "PUT"]


@pytest.mark.anyio
async def test_a_post_whose_connection_dropped_is_not_retried(registry: Registry) -> None:
    async with backends("a", "b") as (bad, good):
        bad.mode = "drop"
        await register(registry, "payments", bad, good)
        async with ServiceClient("payments", registry, options=FIRST) as client:
            with pytest.raises(Unavailable, match=r"POST /charges to payments at 127\.0\.0\.1:\d+ \(instance a\)"):
                await client.post("/charges", json={"cents": 5})
    assert (bad.hits, good.hits) == (1, 0)


@pytest.mark.anyio
async def test_a_post_is_retried_when_nothing_was_sent(registry: Registry) -> None:
    async with Backend("b") as good:
        await registry.register(Instance("payments", "a", "127.0.0.1", free_port()), ttl=600, keepalive=False)
        await register(registry, "payments", good)
        async with ServiceClient("payments", registry, options=FIRST) as client:
            response = await client.post("/charges", json={"cents": 5})
    assert (response.status, response.instance and response.instance.id) == (200, "b")
    assert [s.method for s in good.seen] == ["POST"]


@pytest.mark.anyio
async def test_no_instance_is_a_clear_error(registry: Registry) -> None:
    async with ServiceClient("payments", registry) as client:
        with pytest.raises(Unavailable) as info:
            await client.get("/x")
    assert str(info.value) == "no healthy instance of 'payments' in the registry"
    assert info.value.hint is not None
    assert "start an instance of 'payments'" in info.value.hint


@pytest.mark.anyio
async def test_registered_but_unhealthy_instances_are_named_in_the_hint(registry: Registry) -> None:
    await registry.register(Instance("payments", "p-1", "127.0.0.1", 1, status=HealthStatus.CRITICAL), ttl=600)
    async with ServiceClient("payments", registry) as client:
        with pytest.raises(Unavailable, match="no healthy instance of 'payments'") as info:
            await client.get("/x")
    assert info.value.hint is not None
    assert "1 instance(s) of 'payments' are registered but none is passing" in info.value.hint


@pytest.mark.anyio
async def test_an_unreachable_instance_is_named(registry: Registry) -> None:
    port = free_port()
    await registry.register(Instance("payments", "p-1", "127.0.0.1", port), ttl=600, keepalive=False)
    async with ServiceClient("payments", registry, options=FAST) as client:
        with pytest.raises(Unavailable) as info:
            await client.get("/x")
    message = str(info.value)
    assert f"cannot connect to payments at 127.0.0.1:{port} (instance p-1)" in message
    assert info.value.request_sent is False


@pytest.mark.anyio
async def test_a_slow_instance_times_out(registry: Registry) -> None:
    async with Backend("p-1", "hang") as server:
        await register(registry, "payments", server)
        options = ClientOptions(retry=Retry(attempts=2, backoff=Constant(0.0)), timeout=30)
        async with ServiceClient("payments", registry, options=options) as client:
            with pytest.raises(TimeoutExceeded) as info:
                await client.get("/slow", timeout=0.2)
            assert info.value.timeout == 0.2
            assert f"call to payments at 127.0.0.1:{server.port} took longer than 0.2s" in str(info.value)
            assert server.hits == 2  # the timeout is per attempt, and a GET is retried
            with pytest.raises(TimeoutExceeded):
                await client.post("/slow", timeout=0.2)
            assert server.hits == 3  # a POST that timed out may have been done: not retried


@pytest.mark.anyio
async def test_raise_for_status_passes_success_and_raises_client_errors(registry: Registry) -> None:
    async with backends("a", mode="fail") as (server,):
        server.status = 404
        await register(registry, "payments", server)
        async with ServiceClient("payments", registry) as client:
            missing = await client.get("/charges/404")
    assert missing.status == 404
    assert missing.json() == {"instance": "a", "n": 1}  # 4xx is an answer: not retried
    with pytest.raises(HTTPStatusError, match=r"GET /charges/404 answered 404 \(client error\)") as info:
        missing.raise_for_status()
    assert (info.value.status, info.value.response) == (404, missing)
    ok = Response(200, missing.headers, b"{}")
    assert ok.raise_for_status() is ok


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.anyio
async def test_registry_changes_reach_the_rotation(backend: str, tmp_path: Path) -> None:
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'registry.db'}"
    async with connect(url) as registry, backends("a", "b") as (a, b):
        await register(registry, "orders", a)
        async with ServiceClient("orders", registry, options=FAST) as client:
            assert [i.id for i in await client.instances()] == ["a"]
            assert (await client.get("/x")).instance == a.instance("orders")

            await register(registry, "orders", b)  # a new instance joins

            async def b_gets_traffic() -> bool:
                await client.get("/x")
                return b.hits > 0

            await eventually(b_gets_traffic, "the new instance to get calls")

            await registry.deregister("orders", "a")  # an instance leaves
            await eventually(lambda: _ids(client) == {"b"}, "the rotation to lose the deregistered instance")
            before = a.hits
            answered = {(await client.get("/x")).instance.id for _ in range(20)}  # type: ignore[union-attr]
            assert answered == {"b"}
            assert a.hits == before

            await registry.set_status("orders", "b", HealthStatus.CRITICAL)  # a health check fails it
            await eventually(lambda: _ids(client) == set(), "the critical instance to leave the rotation")
            with pytest.raises(Unavailable, match="no healthy instance of 'orders'"):
                await client.get("/x")


def _ids(client: ServiceClient) -> set[str]:
    """The ids in rotation, read without waiting (the client is started)."""
    return {i.id for i in client.rotation}


@pytest.mark.anyio
async def test_the_first_call_sees_every_registered_instance(registry: Registry) -> None:
    for n in range(5):
        await registry.register(Instance("orders", f"o-{n}", "127.0.0.1", 9000 + n), ttl=600, keepalive=False)
    client = ServiceClient("orders", registry)
    try:
        assert [i.id for i in await client.instances()] == [f"o-{n}" for n in range(5)]
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_a_failing_instance_is_ejected_by_outlier_detection(registry: Registry) -> None:
    async with backends("a", "b") as (bad, good):
        bad.mode = "fail"
        await register(registry, "payments", bad, good)
        options = ClientOptions(
            balancer=First(),
            retry=Retry(attempts=2, backoff=Constant(0.0)),
            breaker=None,
            outlier=OutlierPolicy(consecutive_errors=3, base_ejection=600, max_ejection=600),
        )
        async with ServiceClient("payments", registry, options=options) as client:
            for _ in range(3):
                assert (await client.get("/x")).status == 200
            assert bad.hits == 3
            assert _ids(client) == {"b"}
            for _ in range(10):
                assert (await client.get("/x")).status == 200
            assert bad.hits == 3  # ejected: no more traffic
            assert client.outlier is not None
            assert client.outlier.is_ejected("a")


@pytest.mark.anyio
async def test_an_open_instance_breaker_takes_it_out_of_rotation(registry: Registry) -> None:
    async with backends("a", "b") as (bad, good):
        bad.mode = "fail"
        await register(registry, "payments", bad, good)

        def breaker(name: str, clock: object) -> CircuitBreaker:
            return CircuitBreaker(
                name=name, window_size=4, minimum_calls=4, wait_in_open=600, failure_result=lambda r: r.status >= 500
            )

        options = ClientOptions(balancer=First(), retry=Retry(attempts=2, backoff=Constant(0.0)), breaker=breaker,
                                outlier=None)  # fmt: skip
        async with ServiceClient("payments", registry, options=options) as client:
            for _ in range(4):
                assert (await client.get("/x")).status == 200
            assert _ids(client) == {"b"}
            for _ in range(10):
                await client.get("/x")
            assert bad.hits == 4
            assert client.breaker is not None
            assert client.breaker.state == "closed"  # the service is fine: retries rescued every call


@pytest.mark.anyio
async def test_a_closed_client_refuses_calls_and_leaves_no_task(registry: Registry) -> None:
    async with Backend("a") as server:
        await register(registry, "payments", server)
        before = asyncio.all_tasks()
        client = ServiceClient("payments", registry)
        await client.get("/x")
        assert "meshkit-client-payments" in {t.get_name() for t in asyncio.all_tasks() - before}  # the watch
        await client.aclose()
        await client.aclose()  # idempotent
        # the server's handler of the kept-alive connection ends once the client closed it
        await eventually(lambda: asyncio.all_tasks() == before, "every task started by the call to end")
        with pytest.raises(ConfigurationError, match="closed"):
            await client.get("/x")


@pytest.mark.anyio
async def test_a_shared_transport_stays_open_for_its_owner(registry: Registry) -> None:
    transport = HttpTransport()
    try:
        async with Backend("a") as server:
            await register(registry, "payments", server)
            async with ServiceClient("payments", registry, transport=transport) as client:
                await client.get("/x")
            async with ServiceClient("payments", registry, transport=transport) as client:
                assert (await client.get("/x")).status == 200  # the first client did not close it
    finally:
        await transport.aclose()
    with pytest.raises(ConfigurationError, match="closed"):
        await transport.send(server.instance("payments"), Request("GET", "/"), None)


@pytest.mark.anyio
async def test_bad_arguments_are_refused(registry: Registry) -> None:
    with pytest.raises(ConfigurationError, match="unknown balancer"):
        ClientOptions(balancer="fastest")
    with pytest.raises(ConfigurationError, match="timeout"):
        ClientOptions(timeout=0)
    async with ServiceClient("payments", registry) as client:
        with pytest.raises(ConfigurationError, match="not both"):
            await client.post("/x", json={}, content=b"x")
        with pytest.raises(ConfigurationError, match="timeout must be positive"):
            await client.get("/x", timeout=-1)


@pytest.mark.anyio
async def test_an_open_instance_circuit_does_not_hold_the_call(registry: Registry) -> None:
    # One instance, its circuit open for 10 minutes: the retry must not wait for the instance's retry_after (the
    # next attempt is meant for another instance), so the call fails fast with CircuitOpen.
    clock = FakeClock(auto_advance=True)

    def breaker(name: str, clock: Clock) -> CircuitBreaker:
        return CircuitBreaker(
            name=name, window_size=2, minimum_calls=2, wait_in_open=600, failure_result=is_server_error, clock=clock
        )

    options = ClientOptions(retry=Retry(attempts=3, backoff=Constant(0.0)), breaker=breaker, outlier=None)
    async with Backend("a", "fail") as bad:
        await register(registry, "payments", bad)
        async with ServiceClient("payments", registry, options=options, clock=clock) as client:
            with pytest.raises(CircuitOpen):
                await client.get("/x")
            assert bad.hits == 2  # the third attempt was refused by the open circuit
            assert clock.sleeps == []  # zero waits between attempts, and none for the circuit
            with pytest.raises(CircuitOpen):
                await client.get("/x")
            assert bad.hits == 2
            assert clock.sleeps == []
