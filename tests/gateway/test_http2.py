"""HTTP/2 on the gateway: TLS with ALPN ``h2`` in front of real HTTP/1.1 upstreams, driven by an HTTP/2 client built
on the h2 library over a real TLS socket (the same library, client side, checks the gateway's flow control: a
frame beyond a window is a protocol error there)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import jwt
import pytest

from meshkit.gateway import Gateway, parse_config
from meshkit.gateway.http2 import MAX_STREAMS, _Http2, _Presence
from meshkit.gateway.server import _ClientConn
from tests.gateway.servers import Answer, RecordingUpstream, Seen, echo, exchange, gateway, status_of, upstream
from tests.gateway.test_bff_admin import _certificates

pytestmark = pytest.mark.anyio

SECRET = "an-hmac-secret-that-is-long-enough-for-hs256"


# -- an HTTP/2 client -------------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    interim: list[int] = field(default_factory=list)
    reset: int | None = None  # the error code of a RST_STREAM from the gateway
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    got_data: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return json.loads(bytes(self.body))


class H2Client:
    """HTTP/2 over TLS (or cleartext with prior knowledge) with the h2 library: one connection, many streams.
    ``auto_ack``: give the window back as DATA arrives (off: the test does it with :meth:`ack`)."""

    def __init__(self, port: int, context: ssl.SSLContext | None, *, auto_ack: bool = True) -> None:
        self.port = port
        self.context = context
        self.auto_ack = auto_ack
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.responses: dict[int, Response] = {}
        self.window = asyncio.Event()
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.alpn: str | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> H2Client:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.context)
        ssl_object = self._writer.get_extra_info("ssl_object")
        self.alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        self.conn.initiate_connection()
        # a wide connection window: the streams' own 64 KiB windows are what the tests hold back
        self.conn.increment_flow_control_window(64 * 1024 * 1024)
        self._flush()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._writer is not None and self._task is not None
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def _flush(self) -> None:
        assert self._writer is not None
        data = self.conn.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while data := await self._reader.read(65536):
                for event in self.conn.receive_data(data):
                    self._event(event)
                self._flush()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.closed.set()
            for response in self.responses.values():
                response.ended.set()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            response = self.responses[event.stream_id]
            for name, value in event.headers:
                if name == b":status":
                    response.status = int(value)
                else:
                    response.headers.append((name.decode(), value.decode()))
        elif isinstance(event, h2.events.InformationalResponseReceived):
            self.responses[event.stream_id].interim.append(int(dict(event.headers)[b":status"]))
        elif isinstance(event, h2.events.DataReceived):
            response = self.responses[event.stream_id]
            response.body += event.data
            response.got_data.set()
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id].ended.set()
        elif isinstance(event, h2.events.StreamReset):
            response = self.responses[event.stream_id]
            response.reset = event.error_code
            response.ended.set()
        elif isinstance(event, h2.events.WindowUpdated):
            self.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
            for response in self.responses.values():
                response.ended.set()

    def start(
        self, method: str, path: str, headers: list[tuple[str, str]] | None = None, *, end: bool = True
    ) -> tuple[int, Response]:
        stream_id = self.conn.get_next_available_stream_id()
        response = self.responses[stream_id] = Response()
        head = [(":method", method), (":scheme", "https"), (":authority", "shop.example"), (":path", path)]
        self.conn.send_headers(stream_id, head + (headers or []), end_stream=end)
        self._flush()
        return stream_id, response

    async def send_body(self, stream_id: int, body: bytes, *, end: bool = True) -> None:
        """Send ``body`` in DATA frames as the gateway's windows allow."""
        view = memoryview(body)
        while view:
            size = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size, len(view))
            if size <= 0:
                self.window.clear()
                await asyncio.wait_for(self.window.wait(), 10)
                continue
            self.conn.send_data(stream_id, view[:size])
            view = view[size:]
            self._flush()
        if end:
            self.conn.end_stream(stream_id)
            self._flush()

    async def request(
        self, method: str, path: str, headers: list[tuple[str, str]] | None = None, body: bytes | None = None
    ) -> Response:
        stream_id, response = self.start(method, path, headers, end=body is None)
        if body is not None:
            await self.send_body(stream_id, body)
        await asyncio.wait_for(response.ended.wait(), 10)
        return response

    def ack(self, stream_id: int, size: int) -> None:
        self.conn.acknowledge_received_data(size, stream_id)
        self._flush()

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self._flush()


async def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- fixtures ----------------------------------------------------------------------------------------------------


@dataclass
class Tls:
    folder: Path
    client: ssl.SSLContext  # trusts the test CA, offers h2 and http/1.1

    def context(self, *protocols: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.folder / "ca.crt"))
        context.set_alpn_protocols(list(protocols))
        return context


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    files = _certificates(tmp_path)
    client = ssl.create_default_context(cafile=str(files["ca.crt"]))
    client.set_alpn_protocols(["h2", "http/1.1"])
    return Tls(tmp_path, client)


def tls_config(target: str, extra: str = "", *, limits: str = "") -> str:
    return f"""
listen:
  port: 0
  tls: {{cert: server.crt, key: server.key}}
{limits}
routes:
  - name: orders
    path: /orders
    targets: ["{target}"]
{extra}
"""


@contextlib.asynccontextmanager
async def h2_gateway(
    tls: Tls, responder: Callable[[Seen], Answer] = echo, extra: str = "", *, limits: str = ""
) -> AsyncIterator[tuple[Gateway, RecordingUpstream]]:
    async with upstream(responder) as up, gateway(tls_config(up.target, extra, limits=limits), folder=tls.folder) as gw:
        yield gw, up


def h2_connections(gw: Gateway) -> list[_Http2]:
    assert gw.server is not None
    return [c.owner for c in gw.server.connections if isinstance(c, _Presence)]


# -- the basics ----------------------------------------------------------------------------------------------------


async def test_get_is_proxied_over_http2_with_the_clients_address_and_no_connection_headers(tls: Tls) -> None:
    async with h2_gateway(tls) as (gw, up), H2Client(gw.port, tls.client) as client:
        assert client.alpn == "h2"
        r = await client.request(
            "GET", "/orders/5?x=1", [("cookie", "a=1"), ("cookie", "b=2"), ("x-trace", "t"), ("te", "trailers")]
        )
        assert r.status == 200 and r.reset is None
        assert r.json()["path"] == "/orders/5?x=1"
        seen = up.seen[-1]
        assert seen.method == "GET"
        assert seen.header("host") == up.target  # the instance address, as over HTTP/1.1 (preserve_host: false)
        assert seen.header("x-forwarded-host") == "shop.example"  # :authority is the request's Host
        assert seen.header("x-forwarded-for") == "127.0.0.1"  # the real client, not a virtual one
        assert seen.header("x-forwarded-proto") == "https"
        assert seen.all("cookie") == ["a=1; b=2"]  # HTTP/2's split cookie fields, joined for HTTP/1.1
        assert seen.header("x-trace") == "t"
        for hop in ("connection", "te", "transfer-encoding"):
            assert seen.header(hop) is None, hop
        assert seen.body == b""
        # the response: lower-case names, nothing HTTP/2 forbids
        assert r.header("content-type") == "application/json"
        assert r.header("content-length") == str(len(r.body))
        assert r.header("connection") is None and r.header("transfer-encoding") is None
        assert r.header("date") is not None
        # the gateway's settings: 100 streams, a header list bound from the limits
        assert client.conn.remote_settings.max_concurrent_streams == MAX_STREAMS == 100
        assert client.conn.remote_settings.max_header_list_size == 2 * 32 * 1024


async def test_head_404_and_the_engines_own_answers_travel_over_http2(tls: Tls) -> None:
    def answer(seen: Seen) -> Answer:
        return Answer(200, b"", [("content-length", "1234")])

    async with h2_gateway(tls, answer) as (gw, _), H2Client(gw.port, tls.client) as client:
        head = await client.request("HEAD", "/orders/1")
        assert head.status == 200 and head.reset is None
        assert head.header("content-length") == "1234" and head.body == b""
        missing = await client.request("GET", "/nowhere")
        assert missing.status == 404 and missing.json()["status"] == 404
        bad = await client.request("GET", "/orders/%00")
        assert bad.status == 400
        # the connection is still good after all three
        again = await client.request("HEAD", "/orders/2")
        assert again.status == 200


async def test_post_bodies_with_and_without_content_length(tls: Tls) -> None:
    body = bytes(range(256)) * 1000  # 256 kB: more than the stream's 64 KiB receive window
    async with h2_gateway(tls) as (gw, up), H2Client(gw.port, tls.client) as client:
        sized = await client.request("POST", "/orders", [("content-length", str(len(body)))], body)
        assert sized.status == 200
        seen = up.seen[-1]
        assert seen.body == body
        assert seen.header("content-length") == str(len(body)) and seen.header("transfer-encoding") is None

        streamed = await client.request("PUT", "/orders/7", [("content-type", "application/octet-stream")], body)
        assert streamed.status == 200
        seen = up.seen[-1]
        assert seen.method == "PUT" and seen.body == body
        assert seen.header("transfer-encoding") == "chunked"  # no length known: the gateway frames it

        empty = await client.request("POST", "/orders")  # END_STREAM with the headers: no body
        assert empty.status == 200
        assert up.seen[-1].body == b"" and up.seen[-1].header("transfer-encoding") is None


async def test_header_limits_over_http2(tls: Tls) -> None:
    async with h2_gateway(tls) as (gw, up), H2Client(gw.port, tls.client) as client:
        # over max_header_bytes (32 KiB by default) but within the connection's header list size: the engine's 431
        large = await client.request("GET", "/orders/1", [("x-big", "a" * 40_000)])
        assert large.status == 431
        assert up.seen == []
        ok = await client.request("GET", "/orders/1", [("x-fine", "a" * 20_000)])
        assert ok.status == 200 and up.seen[-1].header("x-fine") == "a" * 20_000
        # over the advertised SETTINGS_MAX_HEADER_LIST_SIZE: the connection is closed
        client.start("GET", "/orders/1", [("x-huge", "a" * 70_000)])
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.terminated is not None
        assert client.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_a_body_over_the_routes_limit_is_refused_and_the_connection_lives_on(tls: Tls) -> None:
    extra = "    max_body: 1000\n"
    async with h2_gateway(tls, extra=extra) as (gw, up), H2Client(gw.port, tls.client) as client:
        sized = await client.request("POST", "/orders", [("content-length", "5000")], b"x" * 5000)
        assert sized.status == 413
        stream_id, streamed = client.start("POST", "/orders", end=False)
        await client.send_body(stream_id, b"y" * 5000, end=False)  # chunked: refused while it streams
        await asyncio.wait_for(streamed.ended.wait(), 10)
        assert streamed.status == 413
        assert up.seen == []
        ok = await client.request("GET", "/orders/1")
        assert ok.status == 200


async def test_many_concurrent_streams_on_one_connection(tls: Tls) -> None:
    def slow(seen: Seen) -> Answer:
        answer = echo(seen)
        answer.delay = 0.3  # every stream waits on its upstream at the same time
        return answer

    async with h2_gateway(tls, slow) as (gw, up), H2Client(gw.port, tls.client) as client:
        n = 60
        responses = await asyncio.gather(*(client.request("GET", f"/orders/{i}") for i in range(n)))
        assert [r.status for r in responses] == [200] * n
        assert [r.json()["path"] for r in responses] == [f"/orders/{i}" for i in range(n)]
        # concurrently, not one after the other: each stream had its own upstream connection at the same time
        assert up.connections >= n // 2
        assert len(h2_connections(gw)) == 1
        await wait_until(lambda: not h2_connections(gw)[0].streams, what="every stream to end")


async def test_a_large_response_respects_the_clients_flow_control_and_pauses_the_upstream(tls: Tls) -> None:
    big = bytes(range(251)) * 40_000  # ~10 MB: far more than the 64 KiB window and the socket buffers

    def answer(seen: Seen) -> Answer:
        return Answer(200, big, [("content-type", "application/octet-stream")])

    async with h2_gateway(tls, answer) as (gw, _), H2Client(gw.port, tls.client, auto_ack=False) as client:
        stream_id, response = client.start("GET", "/orders/big")
        window = 65_535
        await wait_until(lambda: len(response.body) >= window, what="the first window of data")
        # the client gave no window back: the gateway holds the rest and stops reading from the upstream
        (conn,) = h2_connections(gw)
        stream = conn.streams[stream_id]
        await wait_until(lambda: stream.writer_paused, what="the stream's writer to be paused")
        virtual = stream.protocol
        assert isinstance(virtual, _ClientConn)
        up_conn = virtual.queue[0].up
        assert up_conn is not None and up_conn.transport is not None
        assert not up_conn.transport.is_reading()
        assert len(response.body) == window  # not a byte beyond the window (h2 would have raised)
        assert not response.ended.is_set()
        # giving the window back lets it all through
        acked = 0
        async with asyncio.timeout(60):  # a generous bound on a hang, not a speed check
            while not response.ended.is_set():
                if len(response.body) > acked:
                    client.ack(stream_id, len(response.body) - acked)
                    acked = len(response.body)
                response.got_data.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(response.got_data.wait(), 0.5)
        assert response.status == 200 and response.reset is None
        assert bytes(response.body) == big


async def test_a_large_response_with_a_client_that_reads_along(tls: Tls) -> None:
    big = b"0123456789abcdef" * 200_000  # 3.2 MB, chunked by the upstream

    def answer(seen: Seen) -> Answer:
        return Answer(200, big, chunked=True)

    async with h2_gateway(tls, answer) as (gw, _), H2Client(gw.port, tls.client) as client:
        rs = await asyncio.gather(*(client.request("GET", f"/orders/{i}") for i in range(3)))
        for r in rs:
            assert r.status == 200 and bytes(r.body) == big and r.header("content-length") is None


# -- plugins, HTTP/1.1 beside it ---------------------------------------------------------------------------------


async def test_plugins_answer_the_same_over_http2_and_http11(tls: Tls) -> None:
    extra = f"""
  - name: private
    path: /private
    targets: ["{{target}}"]
    plugins:
      - headers: {{response: {{add: {{x-gw: "1"}}}}}}
      - jwt: {{algorithms: [HS256], secret: "{SECRET}"}}
  - name: denied
    path: /denied
    targets: ["{{target}}"]
    plugins:
      - ip_filter: {{deny: [127.0.0.0/8]}}
"""
    async with upstream() as up:
        config = tls_config(up.target, extra.replace("{target}", up.target))
        async with gateway(config, folder=tls.folder) as gw, H2Client(gw.port, tls.client) as client:
            over_h2 = await client.request("GET", "/private/1")
            assert over_h2.status == 401 and over_h2.header("x-gw") == "1"
            assert over_h2.header("www-authenticate") is not None
            token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
            allowed = await client.request("GET", "/private/1", [("authorization", f"Bearer {token}")])
            assert allowed.status == 200 and allowed.header("x-gw") == "1"
            assert up.seen[-1].header("x-consumer-id") == "alice"
            denied = await client.request("GET", "/denied/1")  # the peer address is the real one: 127.0.0.1
            assert denied.status == 403
            # the same answers over HTTP/1.1 on the same TLS port
            async with aiohttp.ClientSession() as s:
                base = f"https://127.0.0.1:{gw.port}"
                async with s.get(f"{base}/private/1", ssl=tls.context("http/1.1")) as r:
                    assert r.status == 401 and r.headers.get("x-gw") == "1"
                    assert json.loads(await r.read()) == over_h2.json()
                async with s.get(f"{base}/denied/1", ssl=tls.context("http/1.1")) as r:
                    assert r.status == 403
            assert len(up.seen) == 1


async def test_http11_still_works_on_the_tls_port(tls: Tls) -> None:
    async with h2_gateway(tls) as (gw, up):
        # a client that offers http/1.1 only, one that offers nothing (no ALPN), aiohttp
        for protocols in (["http/1.1"], []):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=tls.context(*protocols))
            try:
                chosen = writer.get_extra_info("ssl_object").selected_alpn_protocol()
                assert chosen == ("http/1.1" if protocols else None)
                writer.write(b"GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /orders/2 HTTP/1.1\r\nHost: a\r\n\r\n")
                data = b""
                while data.count(b"HTTP/1.1 200") < 2:
                    chunk = await asyncio.wait_for(reader.read(65536), 10)
                    assert chunk, data
                    data += chunk
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        assert [s.path for s in up.seen] == ["/orders/1", "/orders/2"] * 2
        async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{gw.port}/orders/3", ssl=tls.context()) as r:
            assert r.status == 200 and r.version == aiohttp.HttpVersion11


# -- resets, endings ---------------------------------------------------------------------------------------------


async def test_a_stream_reset_mid_response_leaves_the_other_streams_alone(tls: Tls) -> None:
    big = b"z" * 4_000_000

    def answer(seen: Seen) -> Answer:
        if seen.path.startswith("/orders/big"):
            return Answer(200, big)
        return echo(seen)

    async with h2_gateway(tls, answer) as (gw, _), H2Client(gw.port, tls.client, auto_ack=False) as client:
        big_id, big_response = client.start("GET", "/orders/big")
        await wait_until(lambda: len(big_response.body) > 0, what="the big response to start")
        (conn,) = h2_connections(gw)
        stream = conn.streams[big_id]
        virtual = stream.protocol
        assert isinstance(virtual, _ClientConn)
        up_conn = virtual.queue[0].up
        assert up_conn is not None
        other_id, other = client.start("GET", "/orders/other")  # in flight beside it
        client.reset(big_id)
        await asyncio.wait_for(other.ended.wait(), 10)
        client.ack(other_id, len(other.body))
        assert other.status == 200 and other.json()["path"] == "/orders/other"
        # the reset stream's exchange is over: its virtual connection closed, its upstream connection dropped
        await wait_until(lambda: virtual.closed and up_conn.closed, what="the reset stream's exchange to end")
        await wait_until(lambda: big_id not in conn.streams, what="the stream to be forgotten")
        assert big_response.reset is None and not big_response.ended.is_set()
        client.auto_ack = True
        client.ack(big_id, len(big_response.body))  # the connection window, given back
        after = await client.request("GET", "/orders/after")
        assert after.status == 200 and after.json()["path"] == "/orders/after"
        assert client.terminated is None


async def test_an_upstream_that_breaks_mid_response_resets_only_its_stream(tls: Tls) -> None:
    async def breaking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # a length it will not keep, then the connection closes
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial")
        await writer.drain()
        writer.close()

    broken = await asyncio.start_server(breaking, "127.0.0.1", 0)
    extra = f"""
  - name: cut
    path: /cut
    targets: ["127.0.0.1:{broken.sockets[0].getsockname()[1]}"]
"""
    try:
        async with h2_gateway(tls, extra=extra) as (gw, _), H2Client(gw.port, tls.client) as client:
            cut = await client.request("GET", "/cut")
            assert cut.status == 200 and cut.reset == h2.errors.ErrorCodes.INTERNAL_ERROR
            assert bytes(cut.body) == b"partial"
            ok = await client.request("GET", "/orders/ok")
            assert ok.status == 200 and ok.reset is None
    finally:
        broken.close()
        await broken.wait_closed()


async def test_idle_connections_get_goaway_after_keepalive_timeout(tls: Tls) -> None:
    limits = "limits: {keepalive_timeout: 1s}"
    async with h2_gateway(tls, limits=limits) as (gw, _), H2Client(gw.port, tls.client) as client:
        r = await client.request("GET", "/orders/1")
        assert r.status == 200
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.terminated is not None
        assert client.terminated.error_code == h2.errors.ErrorCodes.NO_ERROR
        assert client.terminated.last_stream_id == 1
        assert h2_connections(gw) == []


async def test_drain_finishes_streams_in_flight_refuses_new_ones_then_says_goaway(tls: Tls) -> None:
    def slow(seen: Seen) -> Answer:
        answer = echo(seen)
        answer.delay = 2.0  # long enough for the refused stream to arrive while this one is in flight
        return answer

    async with upstream(slow) as up:
        gw = Gateway(parse_config(tls_config(up.target), folder=tls.folder))
        await gw.start()
        try:
            async with H2Client(gw.port, tls.client) as client:
                stream_id, in_flight = client.start("GET", "/orders/1")
                await wait_until(lambda: len(up.seen) == 1, what="the request to reach the upstream")
                closing = asyncio.create_task(gw.aclose(grace=10))
                (conn,) = h2_connections(gw)
                await wait_until(lambda: conn.draining, what="the connection to drain")
                _, refused = client.start("GET", "/orders/2")
                await asyncio.wait_for(refused.ended.wait(), 10)
                assert refused.reset == h2.errors.ErrorCodes.REFUSED_STREAM
                await asyncio.wait_for(in_flight.ended.wait(), 10)
                assert in_flight.status == 200 and in_flight.reset is None
                await asyncio.wait_for(client.closed.wait(), 10)
                assert client.terminated is not None and client.terminated.last_stream_id == stream_id
                await closing
        finally:
            await gw.aclose()


async def test_expect_100_continue_is_an_interim_response(tls: Tls) -> None:
    async with h2_gateway(tls) as (gw, up), H2Client(gw.port, tls.client) as client:
        stream_id, response = client.start(
            "POST", "/orders", [("expect", "100-continue"), ("content-length", "5")], end=False
        )
        await wait_until(lambda: response.interim == [100], what="100 Continue")
        await client.send_body(stream_id, b"hello")
        await asyncio.wait_for(response.ended.wait(), 10)
        assert response.status == 200 and up.seen[-1].body == b"hello"


# -- cleartext with prior knowledge (h2c) ------------------------------------------------------------------------


async def test_h2c_prior_knowledge_and_http11_share_a_cleartext_listener() -> None:
    async with upstream() as up:
        route = f'{{name: orders, path: /orders, targets: ["{up.target}"]}}'
        config = f"listen: {{port: 0, h2c: true}}\nroutes: [{route}]\n"
        async with gateway(config) as gw:
            port = gw.port
            async with H2Client(port, None) as client:
                r = await client.request("GET", "/orders/1")
                assert r.status == 200 and r.json()["path"] == "/orders/1"
                assert up.seen[-1].header("x-forwarded-proto") == "http"
            raw = await exchange(port, b"GET /orders/2 HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n")
            assert status_of(raw) == 200
            # a few bytes at a time: the first ones do not decide before they can
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                for part in (b"GE", b"T /orders/3 HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"):
                    writer.write(part)
                    await writer.drain()
                data = await asyncio.wait_for(reader.read(), 10)
                assert status_of(data) == 200
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()


async def test_rapid_reset_closes_the_connection(tls: Tls) -> None:
    """Opening streams and cancelling them at once costs the gateway an upstream exchange each: a client that
    resets far more streams than it lets finish is disconnected (ENHANCE_YOUR_CALM)."""

    def slow(seen: Seen) -> Answer:
        answer = echo(seen)
        answer.delay = 5.0
        return answer

    async with h2_gateway(tls, slow) as (gw, _), H2Client(gw.port, tls.client) as client:
        ok = await client.request("GET", "/nowhere")  # a stream that finished: the allowance grows by one
        assert ok.status == 404
        for i in range(2 * MAX_STREAMS + 1):
            stream_id, _ = client.start("GET", f"/orders/{i}")
            client.reset(stream_id)
            if client.closed.is_set():
                break
        # one reset more than the allowance (200 + 1 finished stream) is tolerated, the next is not
        assert not client.closed.is_set()
        stream_id, _ = client.start("GET", "/orders/last")
        client.reset(stream_id)
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.terminated is not None
        assert client.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert h2_connections(gw) == []


# -- an independent client: curl (nghttp2) -----------------------------------------------------------------------


def _curl_http2() -> bool:
    curl = shutil.which("curl")
    if curl is None:
        return False
    out = subprocess.run([curl, "--version"], capture_output=True, text=True, check=False).stdout
    return "HTTP2" in out


@pytest.mark.skipif(not _curl_http2(), reason="needs curl built with HTTP/2 (nghttp2)")
async def test_curl_speaks_http2_to_the_gateway(tls: Tls) -> None:
    big = bytes(range(256)) * 8000  # 2 MB each way
    (tls.folder / "big.bin").write_bytes(big)

    def answer(seen: Seen) -> Answer:
        return Answer(200, big) if seen.path == "/orders/big" else echo(seen)

    async def curl(*args: str) -> tuple[str, str]:
        command = ["curl", "-sS", "--http2", "--cacert", str(tls.folder / "ca.crt"), *args]
        process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err
        return out.decode(), err.decode()

    async with h2_gateway(tls, answer) as (gw, up):
        base = f"https://127.0.0.1:{gw.port}"
        out, err = await curl("-v", f"{base}/orders/1")
        assert "ALPN: server accepted h2" in err and "< HTTP/2 200" in err
        assert json.loads(out)["path"] == "/orders/1"
        out, _ = await curl(
            "-o", str(tls.folder / "down.bin"), "-w", "%{http_version} %{http_code}", f"{base}/orders/big"
        )
        assert out == "2 200" and (tls.folder / "down.bin").read_bytes() == big
        out, _ = await curl(
            "--data-binary", f"@{tls.folder / 'big.bin'}", "-o", "/dev/null", "-w", "%{http_code}", base + "/orders/up"
        )
        assert out == "200" and up.seen[-1].method == "POST" and up.seen[-1].body == big
        # 20 transfers at once, multiplexed on one connection
        urls = [arg for i in range(20) for arg in ("-o", "/dev/null", f"{base}/orders/p{i}")]
        out, _ = await curl(
            "--parallel", "--parallel-max", "20", "-w", "%{http_version} %{http_code} %{num_connects}\n", *urls
        )
        lines = out.split()
        assert len(lines) == 60 and set(lines[0::3]) == {"2"} and set(lines[1::3]) == {"200"}
        assert sum(int(n) for n in lines[2::3]) == 1  # one connection for all twenty
