"""The dashboard's JSON API over real sources: a trace store, a memory registry, a memory:// broker, a log buffer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI

from meshkit.dashboard import DashboardApp, LogBuffer, ServiceInfo
from meshkit.discovery import HealthStatus, Instance
from meshkit.discovery.memory import MemoryRegistry
from meshkit.errors import Unavailable
from meshkit.messaging import Broker, Message, SubscriptionOptions, connect
from meshkit.resilience import Constant, Retry
from meshkit.testing import FakeClock, eventually
from meshkit.tracing.collector import SpanEvent, SpanLink, SpanRecord, TraceStore

from .asgi import call, get_json, post_json, serving
from .conftest import BASE, sid, span, tid

WALL = 1_800_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall_start=WALL)


@pytest.fixture
async def registry(clock: FakeClock) -> AsyncIterator[MemoryRegistry]:
    r = MemoryRegistry(clock=clock)
    yield r
    await r.aclose()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with connect("memory://") as b:
        yield b


async def register(registry: MemoryRegistry, service: str, iid: str, port: int, **more: Any) -> None:
    await registry.register(Instance(service, iid, "127.0.0.1", port, **more), ttl=3600, keepalive=False)


def shop_trace() -> list[SpanRecord]:
    """gateway -> orders (HTTP) -> order.created -> email (message, failing)."""
    return [
        span(1, 1, None, "gateway", "GET /orders", 0, 50, kind="server"),
        span(1, 2, 1, "gateway", "GET orders", 1, 45, kind="client"),
        span(1, 3, 2, "orders", "GET /orders", 2, 44, kind="server", attributes={"http.route": "/orders"}),
        span(1, 4, 3, "orders", "order.created publish", 10, 12, kind="producer"),
        span(
            1,
            5,
            4,
            "email",
            "order.created process",
            13,
            60,
            kind="consumer",
            status_code="error",
            status_message="mail server down",
            events=[SpanEvent("exception", BASE + 59_000_000, {"exception.type": "RuntimeError"})],
            links=[SpanLink(tid(9), sid(99), {"messaging.system": "memory"})],
        ),
    ]


# -- services ------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_services_lists_instances_health_uptime_restarts_and_subscriptions(
    store: TraceStore, registry: MemoryRegistry, clock: FakeClock
) -> None:
    await store.add(shop_trace())
    await register(registry, "orders", "orders-1", 8001, version="1.2", tags=("blue",))
    await register(registry, "orders", "orders-2", 8002, version="1.2", status=HealthStatus.CRITICAL)
    infos = {
        "orders": ServiceInfo("orders", restarts=2, started_at=WALL - 100),
        "email": ServiceInfo("email", subscriptions=[("order.created", "email")], openapi_url=None),
    }
    dashboard = DashboardApp(store, registry=registry, services=lambda: infos, clock=clock)
    clock.advance(30)
    data = await get_json(dashboard, "/api/services")
    by_name = {s["name"]: s for s in data["services"]}
    assert sorted(by_name) == ["email", "gateway", "orders"]  # gateway is only known from its spans
    orders = by_name["orders"]
    assert orders["managed"] and orders["restarts"] == 2 and orders["uptime_s"] == pytest.approx(130)
    assert orders["healthy"] == 1 and orders["openapi"] is True
    first, second = sorted(orders["instances"], key=lambda i: i["id"])
    assert first["address"] == "127.0.0.1:8001" and first["status"] == "passing" and first["healthy"] is True
    assert first["version"] == "1.2" and first["tags"] == ["blue"]
    assert first["uptime_s"] == pytest.approx(30)
    assert second["status"] == "critical" and second["healthy"] is False
    email = by_name["email"]
    assert email["subscriptions"] == [{"topic": "order.created", "group": "email"}]
    assert email["instances"] == [] and email["openapi"] is False and email["uptime_s"] is None
    assert by_name["gateway"]["managed"] is False
    await dashboard.aclose()


@pytest.mark.anyio
async def test_endpoints_come_from_the_instances_openapi_document_and_are_cached(
    store: TraceStore, registry: MemoryRegistry, clock: FakeClock
) -> None:
    api = FastAPI()

    @api.get("/orders", summary="List orders")
    async def list_orders() -> list[int]:
        return []

    @api.post("/orders", summary="Place an order")
    async def place_order() -> dict[str, int]:
        return {}

    infos = {
        "orders": ServiceInfo("orders"),
        "email": ServiceInfo("email", openapi_url=None),
        "stock": ServiceInfo("stock"),
    }
    dashboard = DashboardApp(store, registry=registry, services=lambda: infos, clock=clock, openapi_ttl=10)
    try:
        async with serving(api) as url:
            port = int(url.rsplit(":", 1)[1])
            await register(registry, "orders", "orders-down", 9, status=HealthStatus.CRITICAL)  # tried last
            await register(registry, "orders", "orders-1", port)
            data = await get_json(dashboard, "/api/services/orders/endpoints")
            assert data["source"] == f"{url}/openapi.json"
            assert [(e["method"], e["path"], e["summary"]) for e in data["endpoints"]] == [
                ("GET", "/orders", "List orders"),
                ("POST", "/orders", "Place an order"),
            ]
            # an absolute URL is read as it is, without the registry
            infos["catalog"] = ServiceInfo("catalog", openapi_url=f"{url}/openapi.json")
            catalog = await get_json(dashboard, "/api/services/catalog/endpoints")
            assert catalog["source"] == f"{url}/openapi.json" and len(catalog["endpoints"]) == 2
        # the server is gone: the cached endpoints answer until the cache expires
        assert (await get_json(dashboard, "/api/services/orders/endpoints"))["endpoints"] == data["endpoints"]
        clock.advance(11)
        gone = await get_json(dashboard, "/api/services/orders/endpoints", expect=503)
        assert gone["error"] == "unavailable" and "openapi.json" in gone["message"]
        assert await get_json(dashboard, "/api/services/email/endpoints") == {
            "service": "email",
            "endpoints": [],
            "source": None,
        }
        none = await get_json(dashboard, "/api/services/stock/endpoints", expect=503)
        assert "no registered instance" in none["message"]
        missing = await get_json(dashboard, "/api/services/nobody/endpoints", expect=404)
        assert missing["error"] == "not_found"
    finally:
        await dashboard.aclose()


# -- traces --------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_trace_search_filters_by_service_operation_status_duration_and_limit(store: TraceStore) -> None:
    await store.add(
        [
            span(1, 1, None, "orders", "GET /orders", 0, 50),
            span(2, 1, None, "orders", "POST /orders", 100, 300, status_code="error"),
            span(3, 1, None, "email", "send", 400, 405),
        ]
    )
    dashboard = DashboardApp(store)

    async def ids(**params: str | int) -> list[str]:
        reply = await call(dashboard, "GET", "/api/traces", params=dict(params))
        assert reply.status == 200, reply.body
        return [t["trace_id"] for t in reply.json()["traces"]]

    assert await ids() == [tid(3), tid(2), tid(1)]  # newest first
    assert await ids(service="email") == [tid(3)]
    assert await ids(service="orders", operation="GET /orders") == [tid(1)]
    assert await ids(status="error") == [tid(2)]
    assert await ids(errors="1") == [tid(2)]
    assert await ids(min_duration_ms=100) == [tid(2)]
    assert await ids(min_duration_ms=5) == [tid(3), tid(2), tid(1)]
    assert await ids(limit=1) == [tid(3)]
    summary = (await get_json(dashboard, "/api/traces", service="email"))["traces"][0]
    assert summary == {
        "trace_id": tid(3),
        "root_service": "email",
        "root_name": "send",
        "start_ns": BASE + 400_000_000,
        "duration_ns": 5_000_000,
        "span_count": 1,
        "error_count": 0,
        "services": ["email"],
    }
    for params in ({"status": "bad"}, {"limit": "0"}, {"limit": "x"}, {"min_duration_ms": "-1"}):
        error = await get_json(dashboard, "/api/traces", expect=400, **params)
        assert error["error"] == "bad_request" and error["message"]
    operations = await get_json(dashboard, "/api/operations")
    assert operations == {"services": {"email": ["send"], "orders": ["GET /orders", "POST /orders"]}}


@pytest.mark.anyio
async def test_a_trace_comes_in_tree_order_with_depth_offsets_and_the_critical_path(store: TraceStore) -> None:
    await store.add(shop_trace())
    dashboard = DashboardApp(store)
    data = await get_json(dashboard, f"/api/traces/{tid(1)}")
    assert (data["trace_id"], data["span_count"], data["error_count"]) == (tid(1), 5, 1)
    assert data["duration_ns"] == 60_000_000 and data["max_depth"] == 4
    assert data["services"] == ["email", "gateway", "orders"]
    assert data["critical_path"] == [sid(1), sid(2), sid(3), sid(4), sid(5)]
    rows = data["spans"]
    assert [(r["span_id"], r["depth"], r["descendants"]) for r in rows] == [
        (sid(1), 0, 4),
        (sid(2), 1, 3),
        (sid(3), 2, 2),
        (sid(4), 3, 1),
        (sid(5), 4, 0),
    ]
    consumer = rows[4]
    assert consumer["offset_ns"] == 13_000_000 and consumer["duration_ns"] == 47_000_000
    assert consumer["kind"] == "consumer" and consumer["status_code"] == "error"
    assert consumer["status_message"] == "mail server down" and consumer["critical"] is True
    assert consumer["events"][0]["name"] == "exception"
    assert consumer["links"] == [{"trace_id": tid(9), "span_id": sid(99), "attributes": {"messaging.system": "memory"}}]
    assert rows[2]["attributes"] == {"http.route": "/orders"}

    assert (await get_json(dashboard, f"/api/traces/{tid(2)}", expect=404))["error"] == "not_found"
    assert (await get_json(dashboard, "/api/traces/not-hex", expect=400))["error"] == "bad_request"
    assert (await get_json(dashboard, f"/api/traces/{'0' * 32}", expect=400))["error"] == "bad_request"
    assert (await get_json(dashboard, f"/api/traces/{tid(1).upper()}"))["span_count"] == 5


@pytest.mark.anyio
async def test_a_trace_of_2500_spans_comes_whole_and_consistent(store: TraceStore) -> None:
    rnd = random.Random(8)
    spans = [span(7, 1, None, "batch", "run", 0, 10_000)]
    bounds = {1: (0.0, 10_000.0)}
    for n in range(2, 2501):
        parent = rnd.choice(list(bounds)[-40:])
        low, high = bounds[parent]
        start = rnd.uniform(low, high)
        end = rnd.uniform(start, high)
        bounds[n] = (start, end)
        service = rnd.choice(["batch", "db", "cache"])
        spans.append(
            span(7, n, parent, service, f"op {n}", start, end, status_code=rnd.choice(["unset"] * 30 + ["error"]))
        )
    await store.add(spans)
    data = await get_json(DashboardApp(store), f"/api/traces/{tid(7)}")
    rows = data["spans"]
    assert len(rows) == data["span_count"] == 2500
    position = {r["span_id"]: i for i, r in enumerate(rows)}
    for i, r in enumerate(rows):
        if r["parent_span_id"] is None:
            assert r["depth"] == 0
            continue
        parent = rows[position[r["parent_span_id"]]]
        assert position[r["parent_span_id"]] < i and r["depth"] == parent["depth"] + 1
        # a subtree is contiguous: the span lies inside its parent's block of rows
        assert i <= position[parent["span_id"]] + parent["descendants"]
    path = data["critical_path"]
    assert path[0] == sid(1)
    for parent_id, child_id in itertools.pairwise(path):
        child = rows[position[child_id]]
        siblings = [r for r in rows if r["parent_span_id"] == parent_id]
        assert child["parent_span_id"] == parent_id
        assert child["end_ns"] == max(r["end_ns"] for r in siblings)
    assert not any(r["parent_span_id"] == path[-1] for r in rows)  # it ends at a leaf
    assert sum(r["critical"] for r in rows) == len(path)
    assert data["error_count"] == sum(r["status_code"] == "error" for r in rows) > 0


# -- topology ------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_topology_edges_are_solid_calls_and_dashed_messages(
    store: TraceStore, registry: MemoryRegistry, clock: FakeClock
) -> None:
    await store.add(shop_trace())
    await register(registry, "orders", "orders-1", 8001)
    infos = {"orders": ServiceInfo("orders"), "idle": ServiceInfo("idle")}
    dashboard = DashboardApp(store, registry=registry, services=lambda: infos, clock=clock, topology_ttl=5)
    data = await get_json(dashboard, "/api/topology")
    edges = {(e["source"], e["target"]): e for e in data["edges"]}
    assert edges["gateway", "orders"]["kind"] == "sync"
    assert edges["orders", "email"]["kind"] == "async"
    assert (edges["orders", "email"]["calls"], edges["orders", "email"]["errors"]) == (1, 1)
    assert len(edges) == 2 and data["sampled_traces"] == 1
    nodes = {n["name"]: n for n in data["nodes"]}
    assert sorted(nodes) == ["email", "gateway", "idle", "orders"]
    assert nodes["orders"]["managed"] and (nodes["orders"]["instances"], nodes["orders"]["healthy"]) == (1, 1)
    assert nodes["gateway"]["managed"] is False and "instances" not in nodes["gateway"]
    assert nodes["idle"]["instances"] == 0

    # a new call shows after the cache expires
    await store.add(
        [span(2, 1, None, "orders", "job", 100, 110, kind="client"), span(2, 2, 1, "stock", "job", 101, 109)]
    )
    assert len((await get_json(dashboard, "/api/topology"))["edges"]) == 2
    clock.advance(6)
    edges = {(e["source"], e["target"]): e for e in (await get_json(dashboard, "/api/topology"))["edges"]}
    assert edges["orders", "stock"]["kind"] == "sync" and len(edges) == 3


@pytest.mark.anyio
async def test_topology_over_a_window_counts_only_its_calls_and_gives_rates(store: TraceStore) -> None:
    clock = FakeClock(wall_start=BASE / 1e9 + 1000)  # now: 1,000 s after BASE

    def request(trace: int, at_ms: float, error: bool = False) -> list[SpanRecord]:
        status = {"status_code": "error"} if error else {}
        return [
            span(trace, 1, None, "gateway", "GET orders", at_ms, at_ms + 10, kind="client"),
            span(trace, 2, 1, "orders", "GET /orders", at_ms + 1, at_ms + 9, kind="server", **status),
        ]

    # one call 1,000 s ago, then three in the last 5 minutes (one failed)
    await store.add(request(1, 0) + request(2, 800_000) + request(3, 850_000, error=True) + request(4, 900_000))
    dashboard = DashboardApp(store, clock=clock)
    everything = await get_json(dashboard, "/api/topology")
    (edge,) = everything["edges"]
    assert (edge["calls"], edge["errors"], edge["calls_per_s"]) == (4, 1, None)
    assert everything["window_s"] is None and edge["error_rate"] == 25.0

    recent = await get_json(dashboard, "/api/topology", since_s=300)
    (edge,) = recent["edges"]
    assert (edge["calls"], edge["errors"]) == (3, 1)
    assert edge["calls_per_s"] == pytest.approx(3 / 300) and edge["error_rate"] == pytest.approx(100 / 3)
    orders = next(n for n in recent["nodes"] if n["name"] == "orders")
    assert orders["calls_in_per_s"] == pytest.approx(3 / 300) and recent["window_s"] == 300

    assert (await get_json(dashboard, "/api/topology", since_s=60))["edges"] == [], "nothing in the last minute"
    assert (await get_json(dashboard, "/api/topology", expect=400, since_s=-5))["error"] == "bad_request"


# -- resilience ----------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_resilience_shows_what_the_breaker_source_returns(store: TraceStore) -> None:
    empty = {"available": False, "breakers": [], "rejections": [], "errors": []}
    assert await get_json(DashboardApp(store), "/api/resilience") == empty

    async def breakers() -> list[dict[str, Any]]:  # a plain list: breakers only
        return [
            {"name": "orders", "kind": "route", "state": "open", "failure_rate": 75.0, "calls": 8, "not_permitted": 3},
            {"name": "payments", "kind": "client", "state": "closed", "failure_rate": float("nan"), "calls": 0},
        ]

    data = await get_json(DashboardApp(store, resilience=breakers), "/api/resilience")
    assert data["available"] is True and data["rejections"] == [] and data["errors"] == []
    assert data["breakers"][0] == {
        "name": "orders",
        "kind": "route",
        "state": "open",
        "failure_rate": 75.0,
        "calls": 8,
        "not_permitted": 3,
    }
    assert data["breakers"][1]["failure_rate"] is None  # JSON has no NaN


@pytest.mark.anyio
async def test_resilience_shows_breakers_transitions_rejections_and_instances_that_did_not_report(
    store: TraceStore,
) -> None:
    transition = {"time": WALL, "from": "closed", "to": "open", "failure_rate": 100.0, "slow_call_rate": 0.0}
    breaker = {"name": "payments", "kind": "client", "service": "orders", "state": "open", "transitions": [transition]}
    bulkhead = {"policy": "payments bulkhead", "kind": "bulkhead_full", "service": "orders", "count": 2, "last": WALL}
    limit = {"policy": "rate_limit", "kind": "rate_limited", "service": "gateway", "route": None, "count": 5}
    silent = {"service": "shipping", "instance": "shipping-1", "address": "127.0.0.1:9", "error": "timed out"}

    async def source() -> dict[str, Any]:
        return {"breakers": [breaker], "rejections": [bulkhead, limit], "errors": [silent]}

    data = await get_json(DashboardApp(store, resilience=source), "/api/resilience")
    assert data == {"available": True, "breakers": [breaker], "rejections": [bulkhead, limit], "errors": [silent]}

    async def failing() -> dict[str, Any]:
        raise Unavailable("the registry cannot be read")

    reply = await call(DashboardApp(store, resilience=failing), "GET", "/api/resilience")
    assert reply.status == 503 and reply.json()["error"] == "unavailable"


# -- messaging -----------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_messaging_shows_how_far_each_group_is_behind(store: TraceStore, broker: Broker) -> None:
    release = asyncio.Event()

    async def slow(message: Message) -> None:
        await release.wait()

    await broker.subscribe("invoice.due", slow, group="billing", options=SubscriptionOptions(poll_interval=0.02))
    for n in range(5):
        await broker.publish("invoice.due", {"n": n})
    infos = {"billing": ServiceInfo("billing", subscriptions=[("invoice.due", "billing")])}
    dashboard = DashboardApp(store, broker=broker, services=lambda: infos)

    async def lag() -> dict[str, Any]:
        data = await get_json(dashboard, "/api/messaging")
        (group,) = data["topics"][0]["groups"]
        return dict(group["lag"])

    async def behind() -> bool:
        got = await lag()
        return bool(got["total"] == 5 and got["in_flight"] >= 1)

    await eventually(behind, "five messages waiting or in flight for billing")
    release.set()

    async def caught_up() -> bool:
        return (await lag()) == {"waiting": 0, "in_flight": 0, "total": 0}

    await eventually(caught_up, "billing to catch up")


@pytest.mark.anyio
async def test_messaging_asks_the_lag_of_up_to_8_groups_at_once_and_keeps_each_groups_error(
    store: TraceStore, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(message: Message) -> None:
        raise AssertionError("no message is published")

    for group in ("g0", "g1", "g2"):  # known to the broker; the others are not, and "down" cannot be asked
        await broker.subscribe("a", never, group=group, options=SubscriptionOptions(poll_interval=0.05))
    groups = [("a", f"g{n}") for n in range(6)] + [("b", f"g{n}") for n in range(6, 11)] + [("b", "down")]
    infos = {f"s{n:02}": ServiceInfo(f"s{n:02}", subscriptions=[pair]) for n, pair in enumerate(groups)}
    real = broker.lag
    asking = peak = 0
    enough = asyncio.Event()  # set once 8 questions are in flight together (or one waited 10 s for that)

    async def lag(topic: str, group: str) -> Any:
        nonlocal asking, peak
        asking += 1
        peak = max(peak, asking)
        try:
            if asking >= 8:
                enough.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await enough.wait()
            enough.set()
            if group == "down":
                raise Unavailable("the broker is down")
            return await real(topic, group)
        finally:
            asking -= 1

    monkeypatch.setattr(broker, "lag", lag)
    dashboard = DashboardApp(store, broker=broker, services=lambda: infos)
    data = await get_json(dashboard, "/api/messaging")
    assert peak == 8, "eight at once, never more"
    got = {(t["topic"], g["group"]): (g["lag"], g.get("lag_error")) for t in data["topics"] for g in t["groups"]}
    caught_up = {"waiting": 0, "in_flight": 0, "total": 0}
    unknown = "the broker does not know this group yet"
    assert got == {
        **{("a", g): (caught_up, None) for g in ("g0", "g1", "g2")},
        **{pair: (None, unknown) for pair in groups if pair[1] not in ("g0", "g1", "g2", "down")},
        ("b", "down"): (None, "the broker is down"),
    }
    assert [g["service"] for g in data["topics"][1]["groups"]] == [f"s{n:02}" for n in range(6, 12)], "in order"


@pytest.mark.anyio
async def test_messaging_lists_topics_groups_and_the_dead_letters_a_failing_handler_left(
    store: TraceStore, broker: Broker
) -> None:
    async def always_fails(message: Message) -> None:
        raise RuntimeError("mail server down")

    options = SubscriptionOptions(retry=Retry(attempts=2, backoff=Constant(0.01)), poll_interval=0.02)
    await broker.subscribe("order.created", always_fails, group="email", options=options)
    traceparent = f"00-{tid(1)}-{sid(4)}-01"
    await broker.publish("order.created", {"order": 42}, headers={"traceparent": traceparent})
    infos = {
        "email": ServiceInfo("email", subscriptions=[("order.created", "email")]),
        "analytics": ServiceInfo("analytics", subscriptions=[("order.created", "analytics"), ("page.viewed", "a")]),
    }
    dashboard = DashboardApp(store, broker=broker, services=lambda: infos)

    async def one_dead_letter() -> bool:
        data = await get_json(dashboard, "/api/messaging")
        return bool(data["topics"][0]["dlq"] == 1)

    await eventually(one_dead_letter, "the message to reach the dead letters")
    data = await get_json(dashboard, "/api/messaging")
    assert data["broker"] is True
    unknown = {"lag": None, "lag_error": "the broker does not know this group yet"}
    caught_up = {"lag": {"waiting": 0, "in_flight": 0, "total": 0}}
    assert data["topics"] == [
        {
            "topic": "order.created",
            "groups": [
                {"group": "analytics", "service": "analytics", **unknown},  # a service the broker never saw join
                {"group": "email", "service": "email", **caught_up},  # the letter left for the dead letters
            ],
            "dlq": 1,
            "dlq_truncated": False,
        },
        {
            "topic": "page.viewed",
            "groups": [{"group": "a", "service": "analytics", **unknown}],
            "dlq": 0,
            "dlq_truncated": False,
        },
    ]
    listing = await get_json(dashboard, "/api/messaging/order.created/dlq")
    (letter,) = listing["messages"]
    assert letter["reason"] == "RuntimeError: mail server down"
    assert (letter["group"], letter["deliveries"], letter["data"]) == ("email", 2, {"order": 42})
    assert letter["original_id"] and letter["original_id"] != letter["id"]
    assert letter["trace_id"] == tid(1)
    assert listing["truncated"] is False
    assert (await get_json(dashboard, "/api/messaging/unknown/dlq", expect=404))["error"] == "not_found"
    assert len(await broker.dead_letters("order.created").list()) == 1, "listing must not consume"


@pytest.mark.anyio
async def test_replay_and_discard_refuse_without_confirm_and_are_audited(
    store: TraceStore, broker: Broker, clock: FakeClock
) -> None:
    headers = {"dlqreason": "ValueError: no", "dlqgroup": "payments", "dlqdeliveries": "5"}
    for n in range(3):
        await broker.publish("payment.done.dlq", {"n": n}, headers=headers | {"dlqid": f"orig-{n}"})
    infos = {"payments": ServiceInfo("payments", subscriptions=[("payment.done", "payments")])}
    dashboard = DashboardApp(store, broker=broker, services=lambda: infos, clock=clock)
    letters = (await get_json(dashboard, "/api/messaging/payment.done/dlq"))["messages"]
    ids = [m["id"] for m in letters]
    assert [m["data"] for m in letters] == [{"n": 0}, {"n": 1}, {"n": 2}]
    replay = "/api/messaging/payment.done/dlq/replay"

    refused = [
        (await post_json(dashboard, replay, {"ids": ids[:1]}), 400, "confirmation_required"),
        (await post_json(dashboard, replay, {"ids": ids[:1], "confirm": "yes"}), 400, "confirmation_required"),
        (await post_json(dashboard, replay, {"confirm": True}), 400, "bad_request"),
        (await post_json(dashboard, replay, {"ids": [], "confirm": True}), 400, "bad_request"),
        (await post_json(dashboard, replay, {"ids": [1], "confirm": True}), 400, "bad_request"),
        (await post_json(dashboard, replay, ["not", "an", "object"]), 400, "bad_request"),
        (await post_json(dashboard, replay, {"ids": ids, "confirm": True}, content_type="text/plain"), 415, None),
        (await call(dashboard, "POST", replay, body=b"{", headers=[("content-type", "application/json")]), 400, None),
        (await post_json(dashboard, "/api/messaging/nope/dlq/replay", {"ids": ids, "confirm": True}), 404, None),
    ]
    for reply, status, error in refused:
        assert reply.status == status, reply.body
        if error:
            assert reply.json()["error"] == error
    assert len(await broker.dead_letters("payment.done").list()) == 3, "a refused request must change nothing"
    assert (await get_json(dashboard, "/api/audit")) == {"entries": []}

    seen: list[Any] = []

    async def sink(message: Message) -> None:
        seen.append(message.data)

    await broker.subscribe("payment.done", sink, group="check")
    reply = await post_json(dashboard, replay, {"ids": [ids[0]], "confirm": True})
    assert reply.status == 200
    assert reply.json() == {"action": "replay", "topic": "payment.done", "requested": 1, "count": 1}
    await eventually(lambda: seen == [{"n": 0}], "the replayed message on its topic")

    clock.advance(5)
    reply = await post_json(
        dashboard, "/api/messaging/payment.done/dlq/discard", {"ids": [ids[1], "no-such-id"], "confirm": True}
    )
    assert reply.json() == {"action": "discard", "topic": "payment.done", "requested": 2, "count": 1}
    left = (await get_json(dashboard, "/api/messaging/payment.done/dlq"))["messages"]
    assert [m["id"] for m in left] == [ids[2]]

    audit = (await get_json(dashboard, "/api/audit"))["entries"]
    assert audit == [
        {
            "time": WALL + 5,
            "action": "discard",
            "topic": "payment.done",
            "ids": [ids[1], "no-such-id"],
            "requested": 2,
            "count": 1,
            "error": None,
            "client": "127.0.0.1",
        },
        {
            "time": WALL,
            "action": "replay",
            "topic": "payment.done",
            "ids": [ids[0]],
            "requested": 1,
            "count": 1,
            "error": None,
            "client": "127.0.0.1",
        },
    ]
    assert [e.action for e in dashboard.audit] == ["replay", "discard"]


@pytest.mark.anyio
async def test_without_a_broker_topics_show_no_dead_letters_and_actions_are_refused(store: TraceStore) -> None:
    infos = {"email": ServiceInfo("email", subscriptions=[("order.created", "email")])}
    dashboard = DashboardApp(store, services=lambda: infos)
    data = await get_json(dashboard, "/api/messaging")
    assert data["broker"] is False and data["topics"][0]["dlq"] is None
    assert (await get_json(dashboard, "/api/messaging/order.created/dlq", expect=404))["error"] == "no_broker"
    reply = await post_json(dashboard, "/api/messaging/order.created/dlq/discard", {"ids": ["x"], "confirm": True})
    assert reply.status == 404 and reply.json()["error"] == "no_broker"


# -- logs ----------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_logs_api_filters_and_tails_with_a_cursor(store: TraceStore) -> None:
    assert (await get_json(DashboardApp(store), "/api/logs"))["available"] is False
    logs = LogBuffer()
    logs.append("orders", "info", "order placed", trace_id=tid(1))
    logs.append("email", "error", "SMTP refused")
    dashboard = DashboardApp(store, logs=logs)
    data = await get_json(dashboard, "/api/logs")
    assert [r["message"] for r in data["records"]] == ["order placed", "SMTP refused"]
    assert data["cursor"] == 2 and data["services"] == ["email", "orders"] and data["truncated"] is False
    assert data["records"][0]["level"] == "INFO" and data["records"][0]["trace_id"] == tid(1)
    assert [r["message"] for r in (await get_json(dashboard, "/api/logs", level="error"))["records"]] == [
        "SMTP refused"
    ]
    assert len((await get_json(dashboard, "/api/logs", service="orders"))["records"]) == 1
    assert len((await get_json(dashboard, "/api/logs", trace_id=tid(1)))["records"]) == 1
    assert len((await get_json(dashboard, "/api/logs", q="smtp"))["records"]) == 1
    assert (await get_json(dashboard, "/api/logs", since=2))["records"] == []
    logs.append("orders", "warning", "slow")
    tail = await get_json(dashboard, "/api/logs", since=2)
    assert [r["message"] for r in tail["records"]] == ["slow"] and tail["cursor"] == 3
    assert (await get_json(dashboard, "/api/logs", limit=1))["truncated"] is True
    for params in ({"level": "loud"}, {"since": "-1"}, {"limit": "0"}):
        assert (await get_json(dashboard, "/api/logs", expect=400, **params))["error"] == "bad_request"


# -- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unknown_paths_and_methods_answer_json_errors(store: TraceStore) -> None:
    dashboard = DashboardApp(store)
    missing = await call(dashboard, "GET", "/api/nothing")
    assert missing.status == 404 and missing.json()["error"] == "not_found"
    wrong = await call(dashboard, "POST", "/api/services")
    assert wrong.status == 405 and wrong.json()["error"] == "method_not_allowed"
    assert "GET" in wrong.headers.get("allow", "")
    wrong = await call(dashboard, "GET", "/api/messaging/t/dlq/replay")
    assert wrong.status == 405


@pytest.mark.anyio
async def test_a_source_that_fails_answers_503_or_500_as_json(
    store: TraceStore, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, ServiceInfo]:
        raise KeyError("runner state")

    failing = DashboardApp(store, services=broken)
    with caplog.at_level(logging.ERROR, logger="meshkit.dashboard._app"):
        reply = await call(failing, "GET", "/api/services")
    assert reply.status == 500 and reply.json()["error"] == "internal"
    assert "KeyError" not in reply.text  # no internals leak to the page; the log has them
    assert any(r.exc_info for r in caplog.records)

    closed = await TraceStore.open(":memory:")
    await closed.aclose()
    reply = await call(DashboardApp(closed), "GET", "/api/traces")
    assert reply.status == 503 and reply.json()["error"] == "unavailable"


@pytest.mark.anyio
async def test_info_says_which_sources_the_runner_gave(store: TraceStore, broker: Broker) -> None:
    data = await get_json(DashboardApp(store, broker=broker, title="shop"), "/api/info")
    assert data["title"] == "shop"
    assert data["features"] == {
        "registry": False,
        "services": False,
        "broker": True,
        "resilience": False,
        "logs": False,
        "data": False,
    }
    assert json.dumps(data)  # plain JSON


@pytest.mark.anyio
async def test_oversized_or_overlong_requests_are_refused(store: TraceStore, broker: Broker) -> None:
    infos = {"payments": ServiceInfo("payments", subscriptions=[("payment.done", "payments")])}
    dashboard = DashboardApp(store, broker=broker, services=lambda: infos, dlq_limit=10)
    path = "/api/messaging/payment.done/dlq/replay"
    huge = await post_json(dashboard, path, {"ids": ["x" * 300_000], "confirm": True})
    assert huge.status == 413 and huge.json()["error"] == "too_large"
    too_many = await post_json(dashboard, path, {"ids": [f"id-{n}" for n in range(11)], "confirm": True})
    assert too_many.status == 400 and "at most 10" in too_many.json()["message"]
    assert (await get_json(dashboard, "/api/messaging/payment.done/dlq", expect=400, limit=11))["error"]
    assert (await get_json(dashboard, "/api/audit"))["entries"] == []
