"""The runner's resilience source for the dashboard, over real servers: a gateway's route breakers, BFF clients and
rate limits (requests over real sockets), and the services' ``/_meshkit/resilience`` reports, read in-process
(monolith mode) or fetched over HTTP from the instances the registry lists (processes mode)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fastapi.responses import JSONResponse

from meshkit import Service
from meshkit.client import ClientOptions
from meshkit.dashboard import DashboardApp
from meshkit.discovery import Instance, Registry
from meshkit.errors import CircuitOpen
from meshkit.gateway import Gateway, parse_config
from meshkit.runner.observe import GatewayPolicies, resilience_source
from meshkit.tracing.collector import TraceStore
from tests.gateway.servers import Answer, Seen, gateway, upstream
from tests.helpers import served_over_http
from tests.servers import free_port

from .asgi import get_json

pytestmark = pytest.mark.anyio


def failing(seen: Seen) -> Answer:
    return Answer(500, b"down")


def fine(seen: Seen) -> Answer:
    return Answer(200, b'{"ok": true}', [("content-type", "application/json")])


def gateway_config(bad: str, good: str, *, bff: bool = True) -> str:
    text = f"""
listen: {{port: 0}}
admin: {{port: 0, token: s3cret}}
plugins:
  - rate_limit: {{limit: 1000, window: 1s, key: []}}
routes:
  - name: flaky
    path: /flaky
    targets: ["{bad}"]
    retries: 0
    breaker: {{window: 4, minimum_calls: 4, wait: 1m}}
  - name: limited
    path: /limited
    targets: ["{good}"]
    breaker: false
    plugins:
      - rate_limit: {{limit: 1, window: 1m, key: []}}
  - name: busy
    path: /busy
    targets: ["{good}"]
    breaker: false
    max_concurrent: 1
"""
    if bff:
        text += f"""
bff:
  - name: summary
    path: /bff/summary
    calls:
      order: {{targets: ["{good}"], path: /orders/1}}
"""
    return text


async def get(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as response:
        await response.read()
        return response.status


def by(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


async def test_the_gateway_rows_show_route_breakers_with_transitions_bff_clients_and_rate_limits() -> None:
    async with (
        upstream(failing) as bad,
        upstream(fine) as good,
        gateway(gateway_config(bad.target, good.target)) as gw,
        aiohttp.ClientSession() as http,
    ):
        policies = GatewayPolicies(gw)  # listens from here on
        try:
            base = f"http://127.0.0.1:{gw.port}"
            breakers, rejections = policies.rows()
            flaky = by(breakers, name="flaky")
            assert (flaky["kind"], flaky["service"], flaky["state"], flaky["transitions"]) == (
                "route",
                "gateway",
                "closed",
                [],
            )
            assert [b["name"] for b in breakers if b["kind"] == "route"] == ["flaky"], "limited has no breaker"
            order = by(breakers, kind="bff client")
            assert (order["route"], order["name"], order["downstream"]) == ("summary", "order", order["downstream"])

            assert [await get(http, f"{base}/flaky") for _ in range(4)] == [500] * 4
            assert await get(http, f"{base}/flaky") == 503  # the circuit is open: refused
            assert [await get(http, f"{base}/limited") for _ in range(2)] == [200, 429]
            assert await get(http, f"{base}/bff/summary") == 200

            breakers, rejections = policies.rows()
            flaky = by(breakers, name="flaky")
            assert (flaky["state"], flaky["calls"], flaky["failed"], flaky["not_permitted"]) == ("open", 4, 4, 1)
            assert [(t["from"], t["to"]) for t in flaky["transitions"]] == [("closed", "open")]
            assert flaky["last_rejected"] is not None
            route_limit = by(rejections, policy="rate_limit", route="limited")
            assert (route_limit["kind"], route_limit["count"], route_limit["allowed"]) == ("rate_limited", 1, 1)
            every_route = by(rejections, policy="rate_limit", route=None)
            assert (every_route["count"], every_route["allowed"]) == (0, 8)  # 4 + 1 + 2 + 1 requests
            bulkhead = by(rejections, kind="bulkhead_full", route="summary")
            assert (bulkhead["service"], bulkhead["route"], bulkhead["client"]) == ("gateway", "summary", "order")

            # the same figures as the admin API's plugin stats
            assert gw.admin_port is not None
            headers = {"authorization": "Bearer s3cret"}
            async with http.get(f"http://127.0.0.1:{gw.admin_port}/admin/stats", headers=headers) as response:
                stats = (await response.json())["plugins"]
            limited = sorted(s["limited"] for s in stats.values())
            assert limited == sorted(r["count"] for r in rejections if r["kind"] == "rate_limited") == [0, 1]

            # a route's max_concurrent refusals: one request held in flight (its body never ends), the next refused
            busy = by(rejections, kind="bulkhead_full", route="busy")
            assert (busy["count"], busy["limit"], busy["in_flight"]) == (0, 1, 0)
            _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"POST /busy HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
            try:
                async with asyncio.timeout(10):
                    while by(policies.rows()[1], route="busy")["in_flight"] != 1:  # noqa: ASYNC110 - the gateway's
                        await asyncio.sleep(0.01)
                assert await get(http, f"{base}/busy") == 503
            finally:
                writer.close()
                await writer.wait_closed()
            busy = by(policies.rows()[1], kind="bulkhead_full", route="busy")
            assert (busy["service"], busy["policy"], busy["count"]) == ("gateway", "route busy max_concurrent", 1)

        finally:
            policies.close()
        assert not any(r.breaker.events for r in gw.routes if r.breaker is not None), "close() stops listening"


async def test_after_a_reload_the_new_route_breakers_are_watched_and_the_history_kept() -> None:
    config = parse_config(gateway_config("127.0.0.1:9", "127.0.0.1:9", bff=False))
    async with upstream(failing) as bad, gateway(gateway_config(bad.target, bad.target, bff=False)) as gw:
        policies = GatewayPolicies(gw)
        try:
            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{gw.port}"
                assert [await get(http, f"{base}/flaky") for _ in range(4)] == [500] * 4
                old = next(r.breaker for r in gw.routes if r.breaker is not None)
                assert await gw.reload(parse_config(gateway_config(bad.target, bad.target, bff=False)))
                flaky = by(policies.rows()[0], name="flaky")
                assert flaky["state"] == "closed", "a new breaker"
                assert not old.events, "the old one is no longer listened to"
                assert [await get(http, f"{base}/flaky") for _ in range(4)] == [500] * 4
            flaky = by(policies.rows()[0], name="flaky")
            assert flaky["state"] == "open"
            assert [(t["from"], t["to"]) for t in flaky["transitions"]] == [("closed", "open")] * 2
            assert await gw.reload(config)  # same route names, other targets
            assert len(by(policies.rows()[0], name="flaky")["transitions"]) == 2
        finally:
            policies.close()


class _Caller:
    """``shop`` calls ``stock``, which always fails; its breaker opens after 10 calls (the default)."""

    def __init__(self) -> None:
        self.stock = Service("stock")
        self.shop = Service("shop")
        self.to_stock = self.shop.client("stock", options=ClientOptions(retry=None, outlier=None))

        @self.stock.http.get("/stock")
        async def stock() -> JSONResponse:
            return JSONResponse({"ok": False}, status_code=500)


@pytest.fixture
async def caller(tmp_path: Path) -> AsyncIterator[tuple[_Caller, Registry]]:
    system = _Caller()
    async with served_over_http(tmp_path, system.stock, system.shop) as (_, registry):
        yield system, registry


async def test_reports_fetched_over_http_match_those_read_in_process_and_a_silent_instance_is_an_error_row(
    caller: tuple[_Caller, Registry], store: TraceStore
) -> None:
    system, registry = caller
    for _ in range(10):
        assert (await system.to_stock.get("/stock")).status == 500
    with pytest.raises(CircuitOpen):
        await system.to_stock.get("/stock")
    ghost = Instance("shop", "shop-ghost", "127.0.0.1", free_port())  # registered, but nobody listens
    await registry.register(ghost, ttl=3600, keepalive=False)

    async with (
        resilience_source(None, registry=registry, names=["shop", "stock"]) as fetched,
        resilience_source(None, services=[system.shop, system.stock]) as local,
    ):
        remote, here = await fetched(), await local()
        dashboard = await get_json(DashboardApp(store, resilience=fetched), "/api/resilience")
    assert remote["breakers"] == here["breakers"], "one report, however it is read"
    assert remote["rejections"] == here["rejections"]
    (row,) = [b for b in remote["breakers"] if b["kind"] == "client"]
    assert (row["service"], row["instance"], row["name"], row["state"]) == (
        "shop",
        system.shop.instance.id,  # type: ignore[union-attr]
        "stock",
        "open",
    )
    (one,) = [b for b in remote["breakers"] if b["kind"] == "client instance"]  # stock's only instance
    stock = system.stock.instance
    assert stock is not None
    assert (one["name"], one["downstream_instance"], one["downstream_address"]) == ("stock", stock.id, stock.address)
    assert one["state"] == "open" and one["instance"] == row["instance"]
    assert [(t["from"], t["to"]) for t in row["transitions"]] == [("closed", "open")] and row["not_permitted"] == 1
    (silent,) = remote["errors"]
    assert (silent["service"], silent["instance"], silent["address"]) == ("shop", "shop-ghost", ghost.address)
    assert silent["error"] and here["errors"] == []
    assert dashboard["available"] is True and dashboard["errors"] == json.loads(json.dumps(remote["errors"]))
    assert [(b["name"], b["kind"]) for b in dashboard["breakers"]] == [
        ("stock", "client"),
        ("stock", "client instance"),
    ]


async def test_without_a_gateway_or_services_the_source_is_empty(store: TraceStore) -> None:
    async with resilience_source(None) as source:
        assert await source() == {"breakers": [], "rejections": [], "errors": []}
        data = await get_json(DashboardApp(store, resilience=source), "/api/resilience")
    assert data == {"available": True, "breakers": [], "rejections": [], "errors": []}


async def test_a_gateway_closed_with_the_source_leaves_no_listener(tmp_path: Path) -> None:
    async with upstream(failing) as bad, upstream(fine) as good:
        gw = Gateway(parse_config(gateway_config(bad.target, good.target)))
        await gw.start()
        try:
            async with resilience_source(gw) as source:
                breakers = (await source())["breakers"]
                assert {b["kind"] for b in breakers} == {"route", "bff client"}
                assert all(r.breaker.events for r in gw.routes if r.breaker is not None)
            assert not any(r.breaker.events for r in gw.routes if r.breaker is not None)
        finally:
            await gw.aclose(grace=1.0)
