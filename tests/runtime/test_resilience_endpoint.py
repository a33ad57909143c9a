"""``/_meshkit/resilience``: two real services over HTTP (uvicorn on loopback ports, the HTTP transport), and what a
caller's report says about its clients once a downstream fails: the breaker opening, its transitions with their
times, calls refused while it is open, and a full bulkhead's refusals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fastapi.responses import JSONResponse

from meshkit import Service
from meshkit.client import ClientOptions
from meshkit.client.options import is_server_error
from meshkit.discovery import Instance
from meshkit.errors import BulkheadFull, CircuitOpen
from meshkit.resilience import BreakerState, Bulkhead, CircuitBreaker
from meshkit.runtime.metrics import PolicyLog, instance_key
from meshkit.runtime.service import RESILIENCE_PATH
from meshkit.testing import FakeClock, eventually
from tests.helpers import served_over_http

pytestmark = pytest.mark.anyio


def small_breaker(name: str, clock: Any) -> CircuitBreaker:
    """Opens once 4 calls are in and half of them failed; lets one probe through 0.3 s later."""
    return CircuitBreaker(
        name=name,
        window_size=4,
        minimum_calls=4,
        wait_in_open=0.3,
        half_open_calls=1,
        failure_result=is_server_error,
        clock=clock,
    )


OPTIONS = ClientOptions(retry=None, breaker=small_breaker, bulkhead=1, bulkhead_wait=0.0, outlier=None, timeout=10.0)


class Shop:
    """``shop`` calls ``stock`` (which fails while ``failing``) and ``prices`` (whose ``/slow`` waits for
    ``release``), each through its own client."""

    def __init__(self) -> None:
        self.failing = True
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.stock = Service("stock")
        self.prices = Service("prices")
        self.shop = Service("shop")
        self.to_stock = self.shop.client("stock", options=OPTIONS)
        self.to_prices = self.shop.client("prices", options=OPTIONS)

        @self.stock.http.get("/stock")
        async def stock() -> JSONResponse:
            return JSONResponse({"ok": not self.failing}, status_code=500 if self.failing else 200)

        @self.prices.http.get("/slow")
        async def slow() -> dict[str, bool]:
            self.entered.set()
            await self.release.wait()
            return {"ok": True}


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Shop, str]]:
    shop = Shop()
    async with served_over_http(tmp_path, shop.stock, shop.prices, shop.shop) as (served, _):
        try:
            yield shop, served[-1].url
        finally:
            shop.release.set()  # before the servers drain: a call still waiting in /slow returns


async def report_of(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(url + RESILIENCE_PATH) as response:
        assert response.status == 200 and response.content_type == "application/json"
        body = await response.json()
    assert isinstance(body, dict)
    return body


def row(rows: list[dict[str, Any]], client: str) -> dict[str, Any]:
    """The row of ``client``'s breaker for the whole service (or of its bulkhead), not those of its instances."""
    found = [r for r in rows if r["client"] == client and r["kind"] != "client instance"]
    assert len(found) == 1, rows
    return found[0]


async def test_the_report_shows_a_breaker_opening_with_its_transitions_after_a_downstream_fails(
    running: tuple[Shop, str],
) -> None:
    shop, url = running
    report = await report_of(url)
    assert report["service"] == "shop" and report["instance"] == shop.shop.instance.id  # type: ignore[union-attr]
    stock = row(report["breakers"], "stock")
    assert (stock["state"], stock["kind"], stock["downstream"]) == ("closed", "client", "stock")
    assert stock["transitions"] == []
    assert stock["service"] == "shop" and stock["instance"] == report["instance"]

    before = time.time()
    for _ in range(4):  # real calls over HTTP, each answered 500
        assert (await shop.to_stock.get("/stock")).status == 500
    after = time.time()
    stock = row((await report_of(url))["breakers"], "stock")
    assert (stock["state"], stock["calls"], stock["failed"], stock["failure_rate"]) == ("open", 4, 4, 100.0)
    assert [(t["from"], t["to"]) for t in stock["transitions"]] == [("closed", "open")]
    assert before - 1 <= stock["transitions"][0]["time"] <= after + 1, "a transition's time is Unix seconds"
    assert stock["transitions"][0]["failure_rate"] == 100.0
    assert stock["not_permitted"] == 0 and stock["last_rejected"] is None

    with pytest.raises(CircuitOpen):  # refused without a call: counted, and its time kept
        await shop.to_stock.get("/stock")
    stock = row((await report_of(url))["breakers"], "stock")
    assert stock["not_permitted"] == 1 and stock["last_rejected"] is not None
    assert row((await report_of(url))["breakers"], "prices")["state"] == "closed", "one breaker per downstream"

    # the wait is over: reading the state half-opens it, and one good probe closes it
    shop.failing = False

    async def half_open() -> bool:
        return bool(row((await report_of(url))["breakers"], "stock")["state"] == "half_open")

    await eventually(half_open, "the breaker to half-open after wait_in_open", timeout=30)
    assert (await shop.to_stock.get("/stock")).status == 200
    stock = row((await report_of(url))["breakers"], "stock")
    assert stock["state"] == "closed"
    assert [(t["from"], t["to"]) for t in stock["transitions"]] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    times = [t["time"] for t in stock["transitions"]]
    assert times == sorted(times)


async def test_the_report_counts_the_calls_a_full_bulkhead_refused(running: tuple[Shop, str]) -> None:
    shop, url = running
    prices = row((await report_of(url))["rejections"], "prices")
    assert (prices["kind"], prices["count"], prices["last"], prices["limit"]) == ("bulkhead_full", 0, None, 1)

    first = asyncio.create_task(shop.to_prices.get("/slow"))  # takes the only slot and waits in prices
    await eventually(shop.entered.is_set, "the first call to reach prices")
    busy = row((await report_of(url))["rejections"], "prices")
    assert busy["in_flight"] == 1
    with pytest.raises(BulkheadFull):
        await shop.to_prices.get("/slow")
    shop.release.set()
    assert (await first).status == 200

    prices = row((await report_of(url))["rejections"], "prices")
    assert (prices["count"], prices["in_flight"], prices["policy"]) == (1, 0, "prices bulkhead")
    assert prices["last"] is not None and prices["service"] == "shop"
    assert row((await report_of(url))["rejections"], "stock")["count"] == 0


async def test_the_policy_log_keeps_the_last_transitions_per_key_in_unix_time_and_counts_rejections() -> None:
    clock = FakeClock(start=100.0, wall_start=1_800_000_000.0)
    breaker = CircuitBreaker(name="b", window_size=2, minimum_calls=2, wait_in_open=5.0, half_open_calls=1, clock=clock)
    bulkhead = Bulkhead(1, name="pool", clock=clock)
    log = PolicyLog(history=3)
    stop = log.watch("k", breaker)
    log.watch("pool", bulkhead)

    def fail() -> None:
        raise ValueError("down")

    for cycle in range(3):  # closed -> open, then (after the wait) half_open -> open twice
        for _ in range(2 if cycle == 0 else 1):
            with pytest.raises(ValueError, match="down"):
                breaker.call(fail)
        with pytest.raises(CircuitOpen):
            breaker.call(fail)
        clock.advance(5.0)
    kept = log.transitions("k")
    assert len(kept) == 3, "only the last `history` of the 5 are kept"
    assert [(t["from"], t["to"]) for t in kept] == [("half_open", "open"), ("open", "half_open"), ("half_open", "open")]
    assert [t["time"] for t in kept] == [1_800_000_005.0, 1_800_000_010.0, 1_800_000_010.0], "Unix seconds"
    assert log.rejected("k") == {"circuit_open": (3, 1_800_000_010.0)}
    assert log.last_rejected("k", "circuit_open") == 1_800_000_010.0
    assert log.last_rejected("k", "bulkhead_full") is None

    release = asyncio.Event()  # a full bulkhead refuses: counted under its own key
    held = asyncio.ensure_future(bulkhead.acall(release.wait))
    await eventually(lambda: bulkhead.metrics().in_flight == 1, "the first call to take the slot")
    with pytest.raises(BulkheadFull):
        await bulkhead.acall(release.wait)
    release.set()
    await held
    assert log.rejected("pool") == {"bulkhead_full": (1, 1_800_000_015.0)}

    stop()
    with pytest.raises(ValueError, match="down"):
        breaker.call(fail)  # OPEN -> HALF_OPEN -> OPEN again, no longer recorded
    assert log.transitions("k") == kept
    log.retain({"pool"})
    assert log.transitions("k") == [] and log.rejected("k") == {}
    with pytest.raises(ValueError, match="history"):
        PolicyLog(history=0)


def breaker_per_instance(name: str, clock: Any) -> CircuitBreaker:
    """``small_breaker`` for each instance (``stock@host:port``); the whole service's never opens here."""
    if "@" in name:
        return small_breaker(name, clock)
    return CircuitBreaker(name=name, window_size=1000, minimum_calls=1000, failure_result=is_server_error, clock=clock)


@pytest.fixture
async def two_stocks(tmp_path: Path) -> AsyncIterator[tuple[Service, Service, Any, str]]:
    """``shop`` calling two instances of ``stock``: the first always answers 500, the second 200."""
    bad, good, shop = Service("stock"), Service("stock"), Service("shop")
    options = ClientOptions(retry=None, breaker=breaker_per_instance, outlier=None, bulkhead=None, timeout=10.0)
    to_stock = shop.client("stock", options=options)

    @bad.http.get("/stock")
    async def broken() -> JSONResponse:
        return JSONResponse({"ok": False}, status_code=500)

    @good.http.get("/stock")
    async def fine() -> dict[str, bool]:
        return {"ok": True}

    async with served_over_http(tmp_path, bad, good, shop) as (served, _):
        yield bad, good, to_stock, served[-1].url


def instance_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["downstream_instance"]: r for r in rows if r["kind"] == "client instance"}


async def test_the_report_shows_the_breaker_of_each_instance_and_its_transitions(
    two_stocks: tuple[Service, Service, Any, str],
) -> None:
    bad, good, to_stock, url = two_stocks
    assert bad.instance is not None and good.instance is not None
    await to_stock.get("/stock")  # the client learns the instances (and makes their breakers) on its first call
    report = await report_of(url)
    rows = instance_rows(report["breakers"])
    assert set(rows) == {bad.instance.id, good.instance.id}
    for instance in (bad.instance, good.instance):
        row = rows[instance.id]
        assert (row["name"], row["client"], row["downstream"]) == ("stock", "stock", "stock")
        assert row["downstream_address"] == instance.address
        assert row["policy"] == f"stock@{instance.address}"
        assert row["service"] == "shop" and row["instance"] == report["instance"], "where the client lives"
        assert set(row) >= {"state", "failure_rate", "calls", "failed", "not_permitted", "last_rejected"}

    before = time.time()
    for _ in range(40):  # until the failing instance's breaker opens (4 calls there, all failed)
        if instance_rows((await report_of(url))["breakers"])[bad.instance.id]["state"] == "open":
            break
        await to_stock.get("/stock")
    after = time.time()
    report = await report_of(url)
    rows = instance_rows(report["breakers"])
    opened, closed = rows[bad.instance.id], rows[good.instance.id]
    assert (opened["state"], opened["failed"], opened["failure_rate"]) == ("open", 4, 100.0)
    assert [(t["from"], t["to"]) for t in opened["transitions"]] == [("closed", "open")]
    assert before - 1 <= opened["transitions"][0]["time"] <= after + 1
    assert (closed["state"], closed["failed"], closed["transitions"]) == ("closed", 0, [])
    (service_wide,) = [r for r in report["breakers"] if r["kind"] == "client"]
    assert service_wide["state"] == "closed" and service_wide["transitions"] == [], "one instance down is not all"

    for _ in range(3):  # the open instance is out of rotation: the calls go to the other one
        assert (await to_stock.get("/stock")).status == 200


async def test_an_instance_breaker_that_opens_before_any_report_has_its_transition(
    two_stocks: tuple[Service, Service, Any, str],
) -> None:
    bad, _, to_stock, url = two_stocks
    assert bad.instance is not None
    for _ in range(40):  # no report read meanwhile: the breaker is made and opens unseen by any reader
        breakers = to_stock.client.instance_breakers()
        if bad.instance.id in breakers and breakers[bad.instance.id][1].state is BreakerState.OPEN:
            break
        await to_stock.get("/stock")
    else:
        raise AssertionError("the failing instance's breaker never opened")
    opened = instance_rows((await report_of(url))["breakers"])[bad.instance.id]
    assert [(t["from"], t["to"]) for t in opened["transitions"]] == [("closed", "open")]


async def test_a_log_follows_the_breakers_a_group_gains_and_loses() -> None:
    clock = FakeClock(start=100.0, wall_start=1_800_000_000.0)

    def tripping(name: str) -> CircuitBreaker:
        return CircuitBreaker(
            name=name, window_size=1, minimum_calls=1, wait_in_open=5.0, half_open_calls=1, clock=clock
        )

    class Group:
        def __init__(self) -> None:
            self.breakers: dict[str, tuple[Instance, CircuitBreaker]] = {}
            self.told: list[Callable[[], None]] = []

        def instance_breakers(self) -> dict[str, tuple[Instance, CircuitBreaker]]:
            return dict(self.breakers)

        def on_instance_breaker(self, told: Callable[[], None]) -> Callable[[], None]:
            self.told.append(told)
            return lambda: self.told.remove(told)

        def add(self, iid: str, port: int) -> CircuitBreaker:
            breaker = tripping(f"stock@127.0.0.1:{port}")
            self.breakers[iid] = (Instance("stock", iid, "127.0.0.1", port), breaker)
            self.tell()
            return breaker

        def remove(self, iid: str) -> None:
            del self.breakers[iid]
            self.tell()

        def tell(self) -> None:
            for told in self.told:
                told()

    def fail() -> None:
        raise ValueError("down")

    def trip(breaker: CircuitBreaker) -> None:
        with pytest.raises(ValueError, match="down"):
            breaker.call(fail)

    group = Group()
    first = group.add("a", 1)
    log = PolicyLog()
    stop = log.watch("g", group)
    trip(first)
    assert [(t["from"], t["to"]) for t in log.transitions(instance_key("g", "a"))] == [("closed", "open")]

    second = group.add("b", 2)  # the group tells the log: b's breaker is listened to from its first call
    trip(second)
    clock.advance(5.0)
    trip(second)  # open -> half_open -> open
    assert [(t["from"], t["to"]) for t in log.transitions(instance_key("g", "b"))] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
    ]
    log.retain({"g"})
    assert log.transitions(instance_key("g", "a")), "a group's breakers are kept while it is watched"

    moved = group.add("a", 3)  # a moved: a new breaker, its old record is forgotten
    assert log.transitions(instance_key("g", "a")) == []
    trip(moved)
    assert len(log.transitions(instance_key("g", "a"))) == 1
    trip(first)  # the old breaker of a: no longer listened to
    assert len(log.transitions(instance_key("g", "a"))) == 1

    group.remove("b")  # b left
    assert log.transitions(instance_key("g", "b")) == []

    stop()
    assert group.told == [], "stopped: the group no longer tells the log"
    clock.advance(5.0)
    trip(moved)
    assert len(log.transitions(instance_key("g", "a"))) == 1, "stopped: nothing more is recorded"
    log.retain(set())
    assert log.transitions(instance_key("g", "a")) == []
