"""The plugins through the real gateway: the JWT attack corpus end to end, rate-limit bypass attempts, BFF calls
that depend on each other."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from meshkit.errors import ConfigurationError
from tests.gateway.jwt_corpus import (
    JwksServer,
    attack_tokens,
    corpus_options,
    good_token,
    jwks_document,
    make_keys,
    sendable,
)
from tests.gateway.servers import Answer, Seen, exchange, gateway, status_of, upstream

pytestmark = pytest.mark.anyio


async def test_every_token_of_the_attack_corpus_is_refused_and_none_reaches_the_upstream() -> None:
    keys = make_keys()
    jwks = await JwksServer(jwks_document(keys)).start()
    try:
        async with upstream() as up:
            options = json.dumps(corpus_options(jwks.url))
            config = f"""
listen: {{port: 0}}
routes:
  - name: api
    path: /api
    targets: ["{up.target}"]
    plugins:
      - jwt: {options}
"""
            async with gateway(config) as gw, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{gw.port}/api/orders"
                # the control: a good token passes, with the verified identity forwarded
                async with s.get(url, headers={"authorization": f"Bearer {good_token(keys)}"}) as r:
                    assert r.status == 200
                assert up.seen[-1].header("x-consumer-id") is not None
                up.seen.clear()
                corpus = [(d, a) for d, a in attack_tokens(keys) if sendable(a)]
                assert len(corpus) >= 40
                for description, authorization in corpus:
                    raw = (
                        b"GET /api/orders HTTP/1.1\r\nHost: shop\r\nX-Consumer-Id: admin\r\n"
                        b"Authorization: " + authorization.encode("latin-1") + b"\r\nConnection: close\r\n\r\n"
                    )
                    response = await exchange(gw.port, raw)
                    assert status_of(response) == 401, (description, response[:200])
                    token = authorization.split(" ", 1)[-1].encode("latin-1")
                    assert len(token) < 8 or token not in response  # the token is never echoed back
                assert up.seen == [], [s.path for s in up.seen]
    finally:
        await jwks.close()


async def test_rate_limit_bypass_attempts_share_the_intended_bucket() -> None:
    async with upstream() as up:
        config = f"""
listen: {{port: 0}}
trusted_proxies: ["10.0.0.0/8"]
routes:
  - name: orders
    path: /api/orders
    targets: ["{up.target}"]
    plugins:
      - rate_limit: {{limit: 5, window: 1h, key: [ip, route]}}
"""
        async with gateway(config) as gw:
            variants = [
                b"/api/orders",
                b"/api/orders/",
                b"/API/orders",  # another case is another path: no route, so no bypass either
                b"/api/%6Frders",
                b"/api//orders",
                b"/api/./orders",
                b"/api/x/../orders",
                b"/api/orders?x=1",
                b"/api/orders;x",
            ]
            codes = []
            for i in range(20):
                path = variants[i % len(variants)]
                # a spoofed X-Forwarded-For from an untrusted peer (127.0.0.1) changes nothing
                raw = b"GET %s HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.9.9.%d\r\nConnection: close\r\n\r\n" % (
                    path,
                    i,
                )
                codes.append(status_of(await exchange(gw.port, raw)))
            forwarded = [c for c in codes if c != 404]
            assert forwarded.count(200) == 5, codes
            assert set(forwarded) == {200, 429}
            assert len(up.seen) == 5
            # many connections at once: still one budget
            results = await asyncio.gather(
                *(
                    exchange(gw.port, b"GET /api/orders HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    for _ in range(30)
                )
            )
            assert {status_of(r) for r in results} == {429}
            assert len(up.seen) == 5


def shop(seen: Seen) -> Answer:
    parts = seen.path.strip("/").split("/")
    if parts[0] == "orders":
        body = {"id": parts[1], "shipment": f"s-{parts[1]}", "charge": f"c-{parts[1]}", "total": 10}
    elif parts[0] == "shipments":
        body = {"id": parts[1], "eta": "monday"}
    elif parts[0] == "charges":
        body = {"id": parts[1], "amount": 10}
    else:
        return Answer(404, b"{}")
    return Answer(200, json.dumps(body).encode(), [("content-type", "application/json")])


async def test_bff_calls_may_use_what_other_calls_returned() -> None:
    async with upstream(shop) as up:
        t = up.target
        config = f"""
listen: {{port: 0}}
bff:
  - name: mobile
    path: /bff/mobile/orders/{{id}}
    calls:
      order: {{targets: ["{t}"], path: "/orders/{{id}}", required: true}}
      shipment: {{targets: ["{t}"], path: "/shipments/{{order.shipment}}"}}
      charge: {{targets: ["{t}"], path: "/charges/{{order.charge}}"}}
    shape: {{id: order.id, eta: shipment.eta, paid: charge.amount}}
"""
        async with gateway(config) as gw, aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{gw.port}/bff/mobile/orders/7") as r:
                assert r.status == 200
                assert await r.json() == {"id": "7", "eta": "monday", "paid": 10}
            paths = sorted(x.path for x in up.seen)
            assert paths == ["/charges/c-7", "/orders/7", "/shipments/s-7"]


async def test_bff_call_cycles_and_unknown_references_are_config_errors() -> None:
    base = """
listen: {port: 0}
bff:
  - name: loop
    path: /bff/{id}
    calls:
      a: {targets: ["127.0.0.1:9"], path: "/a/{b.x}"}
      b: {targets: ["127.0.0.1:9"], path: "/b/{A}"}
"""
    with pytest.raises(ConfigurationError, match="in a cycle"):
        async with gateway(base.replace("{A}", "{a.y}")):
            pass
    with pytest.raises(ConfigurationError, match="'nope' is not another call"):
        async with gateway(base.replace("{A}", "{nope.y}")):
            pass
