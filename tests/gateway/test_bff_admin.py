"""BFF aggregation routes, the admin API, TLS termination (with client certificates), over real sockets."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshkit.gateway import ProxyRequest, Reply, parse_config
from meshkit.gateway.bff import Aggregation
from tests.gateway.servers import Answer, Seen, gateway, upstream

pytestmark = pytest.mark.anyio


def orders(seen: Seen) -> Answer:
    if seen.path == "/orders/404":
        return Answer(404, b'{"error": "no such order"}')
    oid = seen.path.rsplit("/", 1)[1]
    body = {"id": oid, "status": "paid", "total": 42, "internal": "secret", "auth": seen.header("authorization")}
    return Answer(200, json.dumps(body).encode(), [("content-type", "application/json")])


def shipping(seen: Seen) -> Answer:
    return Answer(200, json.dumps({"eta": "2026-12-01", "carrier": "dhl"}).encode())


def broken(seen: Seen) -> Answer:
    return Answer(500, b"down")


def bff_config(orders_target: str, shipping_target: str, *, on_error: str = "degrade", extra: str = "") -> str:
    return f"""
listen: {{port: 0}}
admin: {{port: 0, token: s3cret}}
bff:
  - name: mobile-order
    path: /bff/mobile/orders/{{id}}
    on_error: {on_error}
    calls:
      order: {{targets: ["{orders_target}"], path: "/orders/{{id}}", required: true}}
      shipment: {{targets: ["{shipping_target}"], path: "/shipments/{{id}}"}}
    shape: {{id: order.id, status: order.status, eta: shipment.eta}}
  - name: web-order
    path: /bff/web/orders/{{id}}
    calls:
      order: {{targets: ["{orders_target}"], path: "/orders/{{id}}"}}
      shipment: {{targets: ["{shipping_target}"], path: "/shipments/{{id}}"}}
{extra}
"""


async def fetch(url: str, **kw: object) -> tuple[int, object]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:  # type: ignore[arg-type]
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def test_a_bff_route_calls_in_parallel_and_shapes_per_client_type() -> None:
    async with upstream(orders) as o, upstream(shipping) as sh, gateway(bff_config(o.target, sh.target)) as gw:
        status, body = await fetch(
            f"http://127.0.0.1:{gw.port}/bff/mobile/orders/7", headers={"authorization": "Bearer t"}
        )
        assert status == 200
        assert body == {"id": "7", "status": "paid", "eta": "2026-12-01"}  # the mobile shape: three fields
        assert o.seen[-1].header("authorization") == "Bearer t"  # forwarded to the calls
        assert o.seen[-1].header("traceparent") is not None
        status, body = await fetch(f"http://127.0.0.1:{gw.port}/bff/web/orders/7")
        assert status == 200
        assert isinstance(body, dict)
        assert body["order"]["total"] == 42 and body["shipment"]["carrier"] == "dhl"  # the web shape: everything


async def test_partial_failure_degrades_or_fails_as_configured() -> None:
    async with upstream(orders) as o, upstream(broken) as sh:
        async with gateway(bff_config(o.target, sh.target)) as gw:
            status, body = await fetch(f"http://127.0.0.1:{gw.port}/bff/mobile/orders/7")
            assert status == 200
            assert body == {"id": "7", "status": "paid", "_missing": ["shipment"]}
            status, body = await fetch(f"http://127.0.0.1:{gw.port}/bff/mobile/orders/404")
            assert status == 502  # the order is required
            assert isinstance(body, dict) and "order" in body["failed"]
        async with gateway(bff_config(o.target, sh.target, on_error="fail")) as gw:
            status, body = await fetch(f"http://127.0.0.1:{gw.port}/bff/mobile/orders/7")
            assert status == 502
            assert isinstance(body, dict) and body["failed"] == {"shipment": "answered 500"}


async def custom_summary(req: ProxyRequest, results: dict[str, object]) -> Reply:
    order = results["order"]
    assert isinstance(order, dict)
    return Reply.json(200, {"line": f"order {order['id']} is {order['status']}", "client": req.client})


async def test_a_python_hook_aggregates_when_config_is_not_enough() -> None:
    extra = f"""
  - name: summary
    path: /bff/summary/{{id}}
    handler: {__name__}:custom_summary
    calls:
      order: {{targets: ["TARGET"], path: "/orders/{{id}}"}}
"""
    async with upstream(orders) as o, upstream(shipping) as sh:
        config = bff_config(o.target, sh.target, extra=extra.replace("TARGET", o.target))
        async with gateway(config) as gw:
            status, body = await fetch(f"http://127.0.0.1:{gw.port}/bff/summary/9")
            assert (status, body) == (200, {"line": "order 9 is paid", "client": "127.0.0.1"})


async def test_closing_right_after_a_reload_closes_the_old_configs_bff_clients() -> None:
    async with upstream(orders) as o, upstream(shipping) as sh:
        config = bff_config(o.target, sh.target)
        async with gateway(config) as gw:
            status, _ = await fetch(f"http://127.0.0.1:{gw.port}/bff/mobile/orders/7")
            assert status == 200  # the BFF clients opened their aiohttp sessions
            old = [r.handler for r in gw.routes if isinstance(r.handler, Aggregation)]
            opened = [c.transport._session for a in old for c in a.clients.values()]  # type: ignore[attr-defined]
            sessions = [s for s in opened if s is not None]
            assert len(sessions) == 2  # the mobile route's two calls
            assert not any(s.closed for s in sessions)
            assert await gw.reload(parse_config(config))
            # the gateway closes within the old build's grace period
        assert all(s.closed for s in sessions)


async def test_the_admin_api_needs_its_token_and_reports_routes_upstreams_breakers_metrics() -> None:
    async with upstream(orders) as o, upstream(shipping) as sh:
        extra = f"""
routes:
  - name: orders
    path: /api/orders
    targets: ["{o.target}"]
    rewrite: /orders
    plugins:
      - rate_limit: {{limit: 100, window: 1s, key: [ip]}}
"""
        async with gateway(bff_config(o.target, sh.target, extra=extra)) as gw:
            admin = f"http://127.0.0.1:{gw.admin_port}"
            assert (await fetch(f"{admin}/admin/routes"))[0] == 401
            assert (await fetch(f"{admin}/admin/routes", headers={"authorization": "Bearer wrong"}))[0] == 401
            auth = {"authorization": "Bearer s3cret"}
            assert (await fetch(f"http://127.0.0.1:{gw.port}/api/orders/1"))[0] == 200
            status, body = await fetch(f"{admin}/admin/routes", headers=auth)
            assert status == 200 and isinstance(body, dict)
            assert [r["name"] for r in body["routes"]] == ["orders", "mobile-order", "web-order"]
            status, body = await fetch(f"{admin}/admin/upstreams", headers=auth)
            assert isinstance(body, dict)
            instances = body["upstreams"][0]["instances"]
            assert instances[0]["address"] == o.target and instances[0]["in_rotation"] is True
            status, body = await fetch(f"{admin}/admin/breakers", headers=auth)
            assert isinstance(body, dict) and body["breakers"]["orders"]["state"] == "closed"
            status, body = await fetch(f"{admin}/admin/stats", headers=auth)
            assert isinstance(body, dict)
            (stats,) = [v for k, v in body["plugins"].items() if k.startswith("rate_limit")]
            assert stats["allowed"] >= 1
            # the same as the gateway's own plugin_stats(), which also says whose plugin it is
            (entry,) = gw.plugin_stats()
            assert (entry.key, entry.plugin, entry.route) == ("rate_limit#0", "rate_limit", "orders")
            assert {entry.key: entry.stats} == body["plugins"]
            status, body = await fetch(f"{admin}/admin/routes", headers=auth)
            assert isinstance(body, dict)
            assert body["routes"][0]["stats"] == {"bulkhead_full": 0} and body["routes"][0]["in_flight"] is None
            status, text = await fetch(f"{admin}/metrics", headers=auth)
            assert status == 200 and isinstance(text, str)
            assert 'meshkit_gateway_requests_total{route="orders",status="200"' in text
            assert "meshkit_gateway_request_duration_seconds_bucket" in text


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test ca"))
        .issuer_name(name("test ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out: dict[str, Path] = {}

    def issue(label: str, cn: str, server: bool) -> None:
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        out[f"{label}.crt"] = folder / f"{label}.crt"
        out[f"{label}.key"] = folder / f"{label}.key"
        out[f"{label}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{label}.key"].write_bytes(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    out["ca.crt"] = folder / "ca.crt"
    out["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    issue("server", "gateway", True)
    issue("client", "mobile-app", False)
    return out


async def test_tls_termination_with_client_certificates(tmp_path: Path) -> None:
    files = _certificates(tmp_path)
    async with upstream(orders) as o:
        config = f"""
listen:
  port: 0
  tls: {{cert: server.crt, key: server.key, client_ca: ca.crt, require_client_cert: true}}
routes:
  - name: orders
    path: /orders
    targets: ["{o.target}"]
"""
        async with gateway(config, folder=tmp_path) as gw:
            trust = ssl.create_default_context(cafile=str(files["ca.crt"]))
            with_cert = ssl.create_default_context(cafile=str(files["ca.crt"]))
            with_cert.load_cert_chain(str(files["client.crt"]), str(files["client.key"]))
            url = f"https://127.0.0.1:{gw.port}/orders/5"
            status, body = await fetch(url, ssl=with_cert)
            assert status == 200 and isinstance(body, dict) and body["id"] == "5"
            assert o.seen[-1].header("x-forwarded-proto") == "https"
            with pytest.raises(aiohttp.ClientError):
                await fetch(url, ssl=trust)  # no client certificate: the handshake is refused


async def test_plugin_answers_travel_back_through_the_plugins_before_them_only() -> None:
    """A cache hit is seen by the plugins configured before the cache (they add their headers once), and the
    entry it stored was taken before they changed the response."""

    def answer(seen: Seen) -> Answer:
        return Answer(
            200, b'{"id": 1, "secret": "s"}', [("content-type", "application/json"), ("cache-control", "max-age=60")]
        )

    async with upstream(answer) as up:
        config = f"""
listen: {{port: 0}}
routes:
  - name: items
    path: /items
    targets: ["{up.target}"]
    plugins:
      - headers: {{response: {{add: {{x-gw: "1"}}}}}}
      - json_body: {{response: {{remove: [secret]}}}}
      - cache: {{ttl: 60s}}
"""
        async with gateway(config) as gw, aiohttp.ClientSession() as s:
            for expected_cache in ("MISS", "HIT"):
                async with s.get(f"http://127.0.0.1:{gw.port}/items/1") as r:
                    assert r.status == 200
                    assert r.headers.getall("x-gw") == ["1"]
                    assert r.headers["x-cache"] == expected_cache
                    assert await r.json() == {"id": 1}  # json_body runs after the cache on the way out
            assert len(up.seen) == 1
