"""The gateway's forwarding engine against a real recording upstream, over real sockets."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest

from meshkit.discovery import Instance
from meshkit.discovery.memory import MemoryRegistry
from meshkit.gateway.server import _next_traceparent
from tests.gateway.servers import Answer, Seen, echo, exchange, gateway, status_of, statuses, upstream

pytestmark = pytest.mark.anyio


def routes(*blocks: str) -> str:
    return "listen: {port: 0}\nroutes:\n" + "\n".join(blocks)


def route(name: str, target: str, **extra: str) -> str:
    lines = [f"  - name: {name}", f'    targets: ["{target}"]']
    lines += [f"    {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


async def get(port: int, path: str, **kw: object) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}", **kw) as r:  # type: ignore[arg-type]
        return r.status, dict(r.headers), await r.read()


async def until_ok(port: int, path: str) -> None:
    """Ask until the answer is 200 (generous deadline; a breaker's wait or a registry watch is in between)."""
    async with asyncio.timeout(30):
        while (await get(port, path))[0] != 200:  # noqa: ASYNC110 - polling the gateway from outside is the point
            await asyncio.sleep(0.05)


async def test_prefix_route_rewrites_and_forwards_the_normalised_path() -> None:
    async with (
        upstream() as up,
        gateway(routes(route("orders", up.target, path="/api/orders", rewrite="/orders"))) as gw,
    ):
        for path, expected in [
            ("/api/orders/7?x=1&y=2", "/orders/7?x=1&y=2"),
            ("/api/orders", "/orders"),
            ("/api//orders/./8", "/orders/8"),
            ("/api/x/../orders/%39", "/orders/9"),
            ("/api/orders/a%2Fb", "/orders/a%2Fb"),  # an encoded slash stays encoded: it is not a separator
        ]:
            status, _, body = await get(gw.port, path)
            assert status == 200, path
            assert json.loads(body)["path"] == expected, path
        status, _, _ = await get(gw.port, "/api/ordersX")
        assert status == 404  # a prefix matches whole segments


async def test_exact_template_method_host_and_header_conditions() -> None:
    config = routes(
        route("v2", "{t}", template="/items/{id}", rewrite="/v2/items/{id}", headers='{x-version: "2"}'),
        route("item", "{t}", template="/items/{id}", methods="[GET]"),
        route("health", "{t}", exact="/healthz", hosts="[status.example]"),
    )
    async with upstream() as up, gateway(config.replace("{t}", up.target)) as gw:
        status, _, body = await get(gw.port, "/items/5", headers={"x-version": "2"})
        assert (status, json.loads(body)["path"]) == (200, "/v2/items/5")
        status, _, body = await get(gw.port, "/items/5")
        assert (status, json.loads(body)["path"]) == (200, "/items/5")
        async with aiohttp.ClientSession() as s, s.delete(f"http://127.0.0.1:{gw.port}/items/5") as r:
            assert r.status == 405
            assert (await r.json())["status"] == 405
        assert (await get(gw.port, "/healthz"))[0] == 404
        assert (await get(gw.port, "/healthz", headers={"host": "status.example"}))[0] == 200


async def test_hop_by_hop_headers_are_dropped_and_forwarding_headers_set() -> None:
    async with upstream() as up, gateway(routes(route("all", up.target, path="/"))) as gw:
        raw = (
            b"GET /x HTTP/1.1\r\nHost: shop.example\r\nX-Hop: 2\r\nConnection: keep-alive, x-secret\r\n"
            b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: basic abc\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Kept: yes\r\nTE: trailers\r\nConnection: X-Hop\r\n\r\n"
        )
        response = await exchange(gw.port, raw)
        assert status_of(response) == 200
        seen = up.seen[-1]
        names = {k for k, _ in seen.headers}
        # every Connection header counts, whether the field it names comes before or after it
        assert {"x-secret", "x-hop", "keep-alive", "proxy-authorization", "te", "connection"}.isdisjoint(names)
        assert seen.header("x-kept") == "yes"
        # the client is not a trusted proxy: its X-Forwarded-For is replaced by its address
        assert seen.all("x-forwarded-for") == ["127.0.0.1"]
        assert seen.header("x-forwarded-host") == "shop.example"
        assert seen.header("x-forwarded-proto") == "http"
        assert seen.header("host") == up.target  # not preserve_host


async def test_upstream_hop_by_hop_headers_are_dropped_from_the_response() -> None:
    def answer(seen: Seen) -> Answer:
        return Answer(
            200,
            b"ok",
            [("Connection", "X-Up-Secret"), ("X-Up-Secret", "1"), ("KEEP-ALIVE", "timeout=5"), ("X-Up", "kept")],
        )

    async with upstream(answer) as up, gateway(routes(route("all", up.target, path="/"))) as gw:
        for _ in range(2):  # the second answer's lines come from the gateway's cache of lines it has seen
            response = await exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            head = response.split(b"\r\n\r\n", 1)[0].lower()
            assert status_of(response) == 200
            assert b"x-up: kept" in head
            assert b"x-up-secret" not in head and b"keep-alive" not in head
            assert head.count(b"content-length: 2") == 1


async def test_many_distinct_header_names_and_lines_stay_correct_past_the_caches_cap() -> None:
    many = [(f"x-h{i}", str(i)) for i in range(1300)]

    def answer(seen: Seen) -> Answer:
        return Answer(200, b"ok", many)

    async with upstream(answer) as up, gateway(routes(route("all", up.target, path="/"))) as gw:
        request = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        request += b"".join(b"X-Q%d: %d\r\n" % (i, i) for i in range(1300)) + b"\r\n"
        response = await exchange(gw.port, request)
        assert status_of(response) == 200
        assert [v for k, v in up.seen[-1].headers if k.startswith("x-q")] == [str(i) for i in range(1300)]
        head = response.split(b"\r\n\r\n", 1)[0]
        assert all(b"\r\nx-h%d: %d\r\n" % (i, i) in head + b"\r\n" for i in range(1300))
        assert gw.server is not None
        assert len(gw.server.header_names) <= 1024
        assert len(gw.server.response_lines) <= 1024


async def test_traceparent_continues_the_callers_trace_or_starts_one() -> None:
    async with upstream() as up, gateway(routes(route("all", up.target, path="/"))) as gw:
        incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        await get(gw.port, "/a", headers={"traceparent": incoming})
        forwarded = up.seen[-1].header("traceparent")
        assert forwarded is not None
        assert forwarded.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
        assert forwarded.split("-")[2] != "b7ad6b7169203331"  # the gateway's hop is the new parent
        await get(gw.port, "/b")
        fresh = up.seen[-1].header("traceparent")
        assert fresh is not None and len(fresh.split("-")[1]) == 32
        await get(gw.port, "/c", headers={"traceparent": "garbage"})
        assert up.seen[-1].header("traceparent") != "garbage"


async def test_bodies_stream_both_ways_with_the_gateways_own_framing() -> None:
    def answer(seen: Seen) -> Answer:
        if seen.path == "/chunked":
            return Answer(200, b"hello world", chunked=True)
        return Answer(200, seen.body, [("x-len", str(len(seen.body)))])

    async with (
        upstream(answer) as up,
        gateway(routes(route("all", up.target, path="/"))) as gw,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(f"http://127.0.0.1:{gw.port}/echo", data=b"x" * 300_000) as r:
            assert (r.status, r.headers["x-len"], len(await r.read())) == (200, "300000", 300_000)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"abc" * 1000

        async with s.post(f"http://127.0.0.1:{gw.port}/echo", data=chunks()) as r:
            assert (r.status, await r.read()) == (200, b"abc" * 4000)
        assert up.seen[-1].header("transfer-encoding") == "chunked"
        async with s.get(f"http://127.0.0.1:{gw.port}/chunked") as r:
            assert await r.read() == b"hello world"
        async with s.head(f"http://127.0.0.1:{gw.port}/echo") as r:
            assert r.status == 200
        # the connection stays usable after a HEAD (its response had a length but no body)
        async with s.get(f"http://127.0.0.1:{gw.port}/after-head") as r:
            assert r.status == 200


async def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async with upstream() as up, gateway(routes(route("all", up.target, path="/"))) as gw:
        raw = b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5))
        response = await exchange(gw.port, raw, responses=5)
        assert statuses(response) == [200] * 5
        assert [s.path for s in up.seen] == [f"/p{i}" for i in range(5)]
        positions = [response.index(f'"path": "/p{i}"'.encode()) for i in range(5)]
        assert positions == sorted(positions)
        # the upstream connection was reused, not one per request
        assert up.connections == 1


async def test_an_unreachable_upstream_is_a_502_and_retries_go_to_another_instance() -> None:
    async with upstream() as up:
        dead = "127.0.0.1:1"
        config = routes(
            f'  - name: all\n    path: /\n    targets: ["{dead}", "{up.target}"]\n    balancer: round_robin'
        )
        async with gateway(config) as gw:
            for _ in range(6):
                # POST too: a refused connection means nothing was sent, so another instance may take it
                async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{gw.port}/x", data=b"1") as r:
                    assert r.status == 200
        async with gateway(routes(route("all", dead, path="/"))) as gw:
            status, _, body = await get(gw.port, "/x")
            assert status == 502
            assert json.loads(body)["message"].startswith("the upstream")


async def test_a_slow_upstream_gets_a_504() -> None:
    def slow(seen: Seen) -> Answer:
        return Answer(200, b"late", delay=5.0)

    async with (
        upstream(slow) as up,
        gateway(routes(route("all", up.target, path="/", timeout="300ms", retries="0"))) as gw,
    ):
        status, _, body = await get(gw.port, "/x")
        assert status == 504
        assert "did not answer within 0.3s" in json.loads(body)["message"]


async def test_the_breaker_opens_fails_fast_and_recovers_half_open() -> None:
    failing = {"on": True}

    def answer(seen: Seen) -> Answer:
        return Answer(500, b"boom") if failing["on"] else echo(seen)

    config = routes(
        route(
            "all",
            "{t}",
            path="/",
            retries="0",
            breaker="{failure_rate: 50, window: 4, minimum_calls: 4, wait: 500ms, half_open_calls: 1}",
        )
    )
    async with upstream(answer) as up, gateway(config.replace("{t}", up.target)) as gw:
        for _ in range(4):
            assert (await get(gw.port, "/x"))[0] == 500
        calls = len(up.seen)
        status, headers, body = await get(gw.port, "/x")
        assert status == 503
        assert "stopped calling it" in json.loads(body)["message"]
        assert "Retry-After" in headers
        assert len(up.seen) == calls  # failed fast: nothing reached the upstream
        failing["on"] = False
        await until_ok(gw.port, "/x")
        assert (await get(gw.port, "/x"))[0] == 200  # closed again after the probe


async def test_a_route_on_a_service_follows_the_registry() -> None:
    registry = MemoryRegistry()
    async with upstream() as a, upstream() as b:
        config = "listen: {port: 0}\nroutes:\n  - name: orders\n    path: /\n    service: orders\n"
        async with gateway(config, registry=registry) as gw:
            status, _, body = await get(gw.port, "/x")
            assert status == 503
            assert "no healthy instance" in json.loads(body)["message"]
            await registry.register(Instance("orders", "a", "127.0.0.1", a.port), ttl=30, keepalive=False)
            await until_ok(gw.port, "/x")
            await registry.register(Instance("orders", "b", "127.0.0.1", b.port), ttl=30, keepalive=False)
            async with asyncio.timeout(30):
                while not b.seen:
                    await get(gw.port, "/x")
            await registry.deregister("orders", "a")
            async with asyncio.timeout(30):
                while True:  # after the watch saw the deregistration, a gets nothing more
                    before = len(a.seen)
                    for _ in range(10):
                        assert (await get(gw.port, "/x"))[0] == 200
                    if len(a.seen) == before:
                        break
    await registry.aclose()


async def test_max_concurrent_sheds_load_with_503() -> None:
    def slow(seen: Seen) -> Answer:
        return Answer(200, b"ok", delay=0.5)

    config = "admin: {port: 0, token: t}\n" + routes(route("all", "{t}", path="/", max_concurrent="2"))
    async with upstream(slow) as up, gateway(config.replace("{t}", up.target)) as gw:
        results = await asyncio.gather(*(get(gw.port, f"/{i}") for i in range(6)))
        codes = sorted(r[0] for r in results)
        assert codes.count(200) == 2
        assert codes.count(503) == 4
        # the refusals are counted in the route's stats, which the admin API reports with the route
        assert gw.routes[0].stats == {"bulkhead_full": 4}
        assert gw.admin_port is not None
        status, _, body = await get(gw.admin_port, "/admin/routes", headers={"authorization": "Bearer t"})
        assert status == 200
        (listed,) = json.loads(body)["routes"]
        assert (listed["max_concurrent"], listed["in_flight"], listed["stats"]) == (2, 0, {"bulkhead_full": 4})


async def test_clients_that_leave_mid_exchange_do_not_open_the_breaker_or_eject_the_upstream() -> None:
    # an upstream that answers /ok at once, never answers /silent and starts /partial's body but never ends it
    arrived: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                arrived.append(path)
                if path == "/ok":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    continue
                if path == "/partial":
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\npartial\r\n")
                await reader.read()  # until the gateway gives up on this connection
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    servers = [await asyncio.start_server(serve, "127.0.0.1", 0) for _ in range(2)]
    targets = ", ".join(f'"127.0.0.1:{s.sockets[0].getsockname()[1]}"' for s in servers)
    config = routes(
        route(
            "all",
            "x",
            path="/",
            retries="0",
            balancer="round_robin",
            breaker="{failure_rate: 50, window: 4, minimum_calls: 4, wait: 1m, half_open_calls: 1}",
        ).replace('["x"]', f"[{targets}]")
    )
    try:
        async with gateway(config) as gw:

            async def leave(path: str) -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                async with asyncio.timeout(10):
                    if path == "/partial":
                        await reader.readuntil(b"partial")  # mid-response
                    else:
                        while path not in arrived:  # noqa: ASYNC110 - waiting for the upstream to have it
                            await asyncio.sleep(0.01)
                writer.close()
                await writer.wait_closed()

            count = len(arrived)
            await asyncio.gather(*(leave("/partial" if i % 2 else "/silent") for i in range(12)))
            assert len(arrived) == count + 12
            route_ = gw.routes[0]
            assert route_.upstream is not None and route_.breaker is not None
            async with asyncio.timeout(10):
                while route_.upstream.client.outstanding:  # noqa: ASYNC110 - the gateway sees the clients leave
                    await asyncio.sleep(0.01)
            metrics = route_.breaker.metrics()
            assert (str(metrics.state), metrics.failed_calls) == ("closed", 0)
            # 6 cancelled calls each: more than outlier detection's 5 errors in a row, yet both stay in rotation
            assert len(route_.upstream.client.rotation) == 2
            for _ in range(6):
                assert (await get(gw.port, "/ok"))[0] == 200
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


@pytest.mark.parametrize(
    ("balancer", "low", "high"),
    [
        ("round_robin", 0.15, 0.35),  # weights 1:3: a quarter of the requests to the light target
        ("random", 0.15, 0.35),
        # the load-aware balancers weigh the requests in flight: one at a time, the heavy target never looks busier
        ("p2c", 0.0, 0.0),
        ("least_outstanding", 0.0, 0.0),
    ],
)
async def test_static_targets_share_the_requests_by_their_weights(balancer: str, low: float, high: float) -> None:
    async with upstream() as light, upstream() as heavy:
        config = (
            "listen: {port: 0}\nroutes:\n  - name: all\n    path: /\n"
            f'    targets: ["{light.target}", {{address: "{heavy.target}", weight: 3}}]\n'
            f"    balancer: {balancer}\n"
        )
        async with gateway(config) as gw, aiohttp.ClientSession() as s:
            for i in range(400):
                async with s.get(f"http://127.0.0.1:{gw.port}/{i}") as r:
                    assert r.status == 200
        assert len(light.seen) + len(heavy.seen) == 400
        assert low <= len(light.seen) / 400 <= high, (len(light.seen), len(heavy.seen))


def test_new_trace_and_span_ids_are_well_formed_even_from_an_unlucky_draw() -> None:
    class Unlucky(random.Random):
        def getrandbits(self, k: int) -> int:
            return 0

    for incoming in (None, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"):
        version, trace, span, flags = _next_traceparent(incoming, Unlucky()).split("-")
        assert (version, len(trace), len(span)) == ("00", 32, 16)
        assert int(trace, 16) != 0 and int(span, 16) != 0
    version, trace, span, flags = _next_traceparent(None, random.Random(7)).split("-")
    assert flags == "01" and len(trace) == 32 and len(span) == 16
