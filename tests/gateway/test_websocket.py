"""WebSocket through the gateway: a real aiohttp WebSocket server behind it and aiohttp's WebSocket client in front,
over real sockets; raw sockets where the test is about the bytes (smuggling after a refused handshake)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from meshkit.gateway.auth import hash_api_key, new_api_key
from tests.gateway.servers import Answer, Seen, exchange, gateway, status_of, upstream
from tests.gateway.test_bff_admin import _certificates

pytestmark = pytest.mark.anyio

HANDSHAKE = (
    b"GET /ws/chat HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


@dataclass
class WsUpstream:
    """An aiohttp app: ``/ws/...`` echoes every message (``close-me`` makes it close), ``/plain`` answers 200."""

    port: int = 0
    handshakes: list[dict[str, str]] = field(default_factory=list)
    received: list[str | bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    state = WsUpstream()

    async def chat(request: web.Request) -> web.StreamResponse:
        state.handshakes.append({k.lower(): v for k, v in request.headers.items()} | {":path": request.path_qs})
        ws = web.WebSocketResponse(max_msg_size=8 * 1024 * 1024)
        await ws.prepare(request)
        await ws.send_str("hello")
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                state.received.append(msg.data)
                if msg.data == "close-me":
                    await ws.close(code=4000, message=b"bye")
                    break
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                state.received.append(msg.data)
                await ws.send_bytes(msg.data)
        state.closed.set()
        return ws

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="plain")

    app = web.Application()
    app.router.add_get("/ws/{name}", chat)
    app.router.add_get("/plain", plain)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        await runner.cleanup()


def config(target: str, *, websocket: bool = True, extra: str = "", limits: str = "") -> str:
    return f"""
listen: {{port: 0}}
{limits}
routes:
  - name: chat
    path: /
    targets: ["{target}"]
    websocket: {str(websocket).lower()}
{extra}
"""


async def test_messages_cross_both_ways_and_a_close_travels_back() -> None:
    async with (
        ws_upstream() as up,
        gateway(config(up.target)) as gw,
        aiohttp.ClientSession() as s,
        s.ws_connect(f"http://127.0.0.1:{gw.port}/ws/chat?room=7", max_msg_size=8 * 1024 * 1024) as ws,
    ):
        assert await ws.receive_str(timeout=10) == "hello"  # the upstream's first frame
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=10) == "ping"
        big = bytes(range(256)) * 8192  # 2 MiB: many reads and writes each way, with back-pressure
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=30) == big
        for i in range(200):
            await ws.send_str(f"m{i}")
        assert [await ws.receive_str(timeout=10) for _ in range(200)] == [f"m{i}" for i in range(200)]
        await ws.send_str("close-me")
        closing = await ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 4000
        handshake = up.handshakes[-1]
        assert handshake[":path"] == "/ws/chat?room=7"
        assert handshake["upgrade"].lower() == "websocket"
        assert handshake["x-forwarded-for"] == "127.0.0.1"
        assert "traceparent" in handshake
        assert up.received[:2] == ["ping", big]
        # the tunnel is gone once the upstream closed
        async with asyncio.timeout(10):
            while gw.server is not None and gw.server.tunnels:  # noqa: ASYNC110 - the server's state, no event
                await asyncio.sleep(0.02)


async def test_a_client_closing_closes_the_upstream_side() -> None:
    async with ws_upstream() as up, gateway(config(up.target)) as gw, aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://127.0.0.1:{gw.port}/ws/chat")
        assert await ws.receive_str(timeout=10) == "hello"
        await ws.close()
        async with asyncio.timeout(10):
            await up.closed.wait()
        assert gw.server is not None
        async with asyncio.timeout(10):
            while gw.server.tunnels:  # noqa: ASYNC110 - the server's state, no event
                await asyncio.sleep(0.02)


async def test_a_route_without_websocket_refuses_the_handshake_and_the_upstream_never_sees_it() -> None:
    async with ws_upstream() as up, gateway(config(up.target, websocket=False)) as gw:
        response = await exchange(gw.port, HANDSHAKE + b"\r\n")
        assert status_of(response) == 501
        assert b"does not accept WebSocket" in response
        assert up.handshakes == []
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await s.ws_connect(f"http://127.0.0.1:{gw.port}/ws/chat")
            assert caught.value.status == 501
            async with s.get(f"http://127.0.0.1:{gw.port}/plain") as r:  # plain requests still go through
                assert (r.status, await r.text()) == (200, "plain")


async def test_plugins_run_on_the_handshake() -> None:
    key = new_api_key()
    plugins = f'    plugins:\n      - api_key: {{keys: [{{name: acme, hash: "{hash_api_key(key)}"}}]}}'
    async with (
        ws_upstream() as up,
        gateway(config(up.target, extra=plugins)) as gw,
        aiohttp.ClientSession() as s,
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await s.ws_connect(f"http://127.0.0.1:{gw.port}/ws/chat")
        assert caught.value.status == 401
        assert up.handshakes == []
        async with s.ws_connect(f"http://127.0.0.1:{gw.port}/ws/chat", headers={"x-api-key": key}) as ws:
            assert await ws.receive_str(timeout=10) == "hello"
            await ws.send_str("authorised")
            assert await ws.receive_str(timeout=10) == "authorised"
        assert up.handshakes[-1]["x-consumer-id"] == "acme"
        assert "x-api-key" not in up.handshakes[-1]


async def test_bytes_after_a_handshake_the_upstream_refuses_never_reach_it() -> None:
    """The WebSocket smuggling trick: the upstream answers the handshake with a plain response, and the client
    had sent a second request right behind it, hoping the proxy now tunnels blindly. The gateway tunnels only after
    a real 101: the response is passed on, the connection closed, the bytes behind it dropped."""

    def answer(seen: Seen) -> Answer:
        return Answer(200 if seen.path == "/ws/chat" else 404, b"no upgrade here")

    async with upstream(answer) as up, gateway(config(up.target)) as gw:
        smuggled = b"GET /admin/secret HTTP/1.1\r\nHost: shop\r\n\r\n"
        response = await exchange(gw.port, HANDSHAKE + b"\r\n" + smuggled, responses=2, timeout=5)
        assert status_of(response) == 200
        assert response.count(b"HTTP/1.1 ") == 1  # the connection closed after the one response
        assert b"connection: close" in response.lower()
        assert [s.path for s in up.seen] == ["/ws/chat"]
        seen = up.seen[0]
        assert seen.header("upgrade") == "websocket" and seen.header("connection") == "upgrade"


async def test_frames_sent_before_the_answer_are_delivered_after_the_switch() -> None:
    async with ws_upstream() as up, gateway(config(up.target)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            # a masked text frame "early", written right behind the handshake
            mask = b"\x01\x02\x03\x04"
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(b"early"))
            writer.write(HANDSHAKE + b"\r\n" + b"\x81\x85" + mask + payload)
            await writer.drain()
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()
                while "early" not in up.received:  # noqa: ASYNC110 - the upstream's record, no event
                    await asyncio.sleep(0.02)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_an_idle_tunnel_is_closed_after_the_idle_timeout() -> None:
    async with (
        ws_upstream() as up,
        gateway(config(up.target, limits="limits: {websocket_idle_timeout: 1s}")) as gw,
        aiohttp.ClientSession() as s,
        s.ws_connect(f"http://127.0.0.1:{gw.port}/ws/chat", autoping=False, heartbeat=None) as ws,
    ):
        assert await ws.receive_str(timeout=10) == "hello"
        closing = await ws.receive(timeout=30)  # nothing crosses: the gateway closes both sides
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        async with asyncio.timeout(10):
            await up.closed.wait()


async def test_stopping_the_gateway_closes_its_tunnels() -> None:
    async with ws_upstream() as up, aiohttp.ClientSession() as s:
        async with gateway(config(up.target)) as gw:
            ws = await s.ws_connect(f"http://127.0.0.1:{gw.port}/ws/chat")
            assert await ws.receive_str(timeout=10) == "hello"
        closing = await ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        async with asyncio.timeout(10):
            await up.closed.wait()


async def test_other_upgrades_and_bad_handshakes() -> None:
    async with ws_upstream() as up, gateway(config(up.target)) as gw:
        # h2c is not switched to: the request is answered over HTTP/1.1 and the connection goes on
        h2c = b"GET /plain HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        h2c += b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        response = await exchange(gw.port, h2c + b"GET /plain HTTP/1.1\r\nHost: shop\r\n\r\n", responses=2)
        assert response.count(b"HTTP/1.1 200 ") == 2, response
        assert b"101" not in response.split(b"\r\n", 1)[0]
        # a handshake may not carry a body (it would be read as the next request)
        with_body = HANDSHAKE + b"Content-Length: 5\r\n\r\nGET /"
        assert status_of(await exchange(gw.port, with_body)) == 400
        post = HANDSHAKE.replace(b"GET ", b"POST ", 1) + b"\r\n"
        assert status_of(await exchange(gw.port, post)) == 400
        # no route for the path: 404, nothing forwarded
        async with gateway(config(up.target).replace("path: /", "path: /ws")) as narrow:
            raw = HANDSHAKE.replace(b"/ws/chat", b"/other") + b"\r\nGET /ws/x HTTP/1.1\r\nHost: shop\r\n\r\n"
            response = await exchange(narrow.port, raw, responses=2, timeout=5)
            assert status_of(response) == 404
            assert response.count(b"HTTP/1.1 ") == 1  # and the connection closed: what followed is not read
        assert up.handshakes == []


async def test_the_handshake_is_logged_and_counted_as_101() -> None:
    async with (
        ws_upstream() as up,
        gateway(config(up.target)) as gw,
        aiohttp.ClientSession() as s,
        s.ws_connect(f"http://127.0.0.1:{gw.port}/ws/chat") as ws,
    ):
        assert await ws.receive_str(timeout=10) == "hello"
        text = gw.metrics.render().decode()
        assert any('status="101"' in line and 'route="chat"' in line for line in text.splitlines()), text
        assert len(up.handshakes) == 1


async def test_wss_through_the_tls_listener(tmp_path: Path) -> None:
    """The TLS listener negotiates with ALPN (h2 or http/1.1) and hands the connection over; a WebSocket client
    offers http/1.1 (RFC 8441, WebSocket over HTTP/2, is not served), and the tunnel runs inside TLS."""
    files = _certificates(tmp_path)
    trust = ssl.create_default_context(cafile=str(files["ca.crt"]))
    trust.set_alpn_protocols(["http/1.1"])
    async with ws_upstream() as up:
        text = config(up.target).replace(
            "listen: {port: 0}", "listen:\n  port: 0\n  tls: {cert: server.crt, key: server.key}"
        )
        async with (
            gateway(text, folder=tmp_path) as gw,
            aiohttp.ClientSession() as s,
            s.ws_connect(f"https://127.0.0.1:{gw.port}/ws/secure", ssl=trust) as ws,
        ):
            assert await ws.receive_str(timeout=10) == "hello"
            big = b"x" * 1_000_000
            await ws.send_bytes(big)
            assert await ws.receive_bytes(timeout=30) == big
            assert up.handshakes[-1]["x-forwarded-proto"] == "https"
