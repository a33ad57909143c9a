"""The gateway's WebSocket proxying at its edges (from an adversarial review): smuggling, resource leaks,
accounting, flow control.

A raw upstream (asyncio streams) answers exactly the bytes each test scripts and records every byte the gateway
sends it after the handshake's head; clients are raw sockets (or TLS) so the tests see the bytes themselves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from meshkit.gateway import Gateway
from meshkit.gateway.router import Router
from meshkit.gateway.server import Server, _Tunnel
from tests.gateway.jwt_corpus import JwksServer, good_token, jwks_document, make_keys
from tests.gateway.servers import exchange, gateway, status_of, statuses
from tests.gateway.test_bff_admin import _certificates
from tests.gateway.test_websocket import HANDSHAKE, config

pytestmark = pytest.mark.anyio

SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n"
)
SMUGGLED = b"GET /admin/secret HTTP/1.1\r\nHost: shop\r\n\r\n"
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
async def no_loop_errors(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    """Nothing of ours may reach the event loop's exception handler or log an error (a traceback in the logs)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: seen.append(context))
    caplog.set_level(logging.WARNING)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
    assert seen == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@dataclass
class RawConn:
    """One connection the gateway opened to the raw upstream."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    head: bytes = b""  # the first request head
    after: bytearray = field(default_factory=bytearray)  # every byte read by read_rest()
    eof: asyncio.Event = field(default_factory=asyncio.Event)  # read_rest() saw the end (or the handler ended)
    sent: int = 0

    async def read_rest(self) -> None:
        while chunk := await self.reader.read(65536):
            self.after += chunk
        self.eof.set()

    async def echo(self) -> None:
        while chunk := await self.reader.read(65536):
            self.after += chunk
            self.writer.write(chunk)
        self.eof.set()


Script = Callable[[RawConn], Awaitable[None]]


@dataclass
class RawUpstream:
    port: int = 0
    conns: list[RawConn] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def raw_upstream(script: Script, *, rcvbuf: int | None = None) -> AsyncIterator[RawUpstream]:
    state = RawUpstream()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn(reader, writer)
        state.conns.append(conn)
        try:
            conn.head = await reader.readuntil(b"\r\n\r\n")
            await script(conn)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            conn.eof.set()
            writer.close()

    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(serve, sock=sock)
    state.port = sock.getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for conn in state.conns:
            conn.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


@contextlib.asynccontextmanager
async def connect(port: int, **kw: Any) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, **kw)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)


@contextlib.asynccontextmanager
async def tunnel_to(
    script: Script,
) -> AsyncIterator[tuple[RawUpstream, Gateway, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw upstream running ``script``, a gateway in front of it, and a client whose handshake it switched (the
    101's head read)."""
    async with raw_upstream(script) as up, gateway(config(up.target)) as gw, connect(gw.port) as (reader, writer):
        writer.write(HANDSHAKE + b"\r\n")
        async with asyncio.timeout(10):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        yield up, gw, reader, writer


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the gateway's state, no event
            await asyncio.sleep(0.01)


def the_tunnel(gw: Gateway) -> Any:
    assert gw.server is not None
    assert len(gw.server.tunnels) == 1
    return next(iter(gw.server.tunnels))


def no_tunnels(gw: Gateway) -> bool:
    return gw.server is not None and not gw.server.tunnels


def idle_upstreams(gw: Gateway) -> list[Any]:
    assert gw.server is not None
    return [c for conns in gw.server.idle.values() for c in conns if not c.closed]


# ------------------------------------------------------------------------------------------------ smuggling


async def test_a_101_without_connection_upgrade_is_a_502_and_nothing_behind_the_handshake_is_forwarded() -> None:
    async def script(conn: RawConn) -> None:
        conn.writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        await conn.read_rest()

    async with raw_upstream(script) as up, gateway(config(up.target)) as gw:
        response = await exchange(gw.port, HANDSHAKE + b"\r\n" + SMUGGLED, responses=2, timeout=5)
        assert statuses(response) == [502]
        await until(lambda: bool(up.conns) and up.conns[0].eof.is_set())
        assert bytes(up.conns[0].after) == b""
        assert len(up.conns) == 1
        assert no_tunnels(gw)


async def test_a_101_to_requests_that_did_not_ask_for_websocket_is_a_502_and_the_connection_is_dropped() -> None:
    async def script(conn: RawConn) -> None:
        conn.writer.write(SWITCH + b"\x81\x05hello")
        await conn.read_rest()

    plain = b"GET /plain HTTP/1.1\r\nHost: shop\r\n\r\n"
    h2c = b"GET /plain HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    h2c += b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    async with (
        raw_upstream(script) as up,
        gateway(config(up.target, extra="    retries: 0")) as gw,
    ):
        for i, request in enumerate((plain, h2c)):
            response = await exchange(gw.port, request)
            assert status_of(response) == 502, response
            assert b"hello" not in response
            await until(lambda i=i: len(up.conns) > i and up.conns[i].eof.is_set())  # type: ignore[misc]
            assert bytes(up.conns[i].after) == b""
            assert b"upgrade" not in up.conns[i].head.lower()
        assert idle_upstreams(gw) == []
        assert no_tunnels(gw)


async def test_interim_responses_before_the_101_are_dropped_and_the_tunnel_then_works() -> None:
    async def script(conn: RawConn) -> None:
        conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await conn.writer.drain()
        conn.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + SWITCH + b"up-first|")
        await conn.echo()

    async with (
        raw_upstream(script) as up,
        gateway(config(up.target)) as gw,
        connect(gw.port) as (reader, writer),
    ):
        writer.write(HANDSHAKE + b"\r\n" + b"early|")
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 "), head
            assert b"sec-websocket-accept: x" in head.lower()
            assert await reader.readexactly(len(b"up-first|early|")) == b"up-first|early|"
            writer.write(b"more")
            assert await reader.readexactly(4) == b"more"


async def test_a_101_with_a_body_switches_and_the_bytes_after_its_head_reach_the_client_as_tunnel_data() -> None:
    async def script(conn: RawConn) -> None:
        conn.writer.write(SWITCH.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n") + b"abc")
        await conn.echo()

    async with (
        raw_upstream(script) as up,
        gateway(config(up.target)) as gw,
        connect(gw.port) as (reader, writer),
    ):
        writer.write(HANDSHAKE + b"\r\n")
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
            assert await reader.readexactly(3) == b"abc"
            writer.write(b"xyz")
            assert await reader.readexactly(3) == b"xyz"


def jwt_plugin(url: str) -> str:
    options = (
        f'{{algorithms: [RS256], jwks_url: "{url}", issuer: "https://issuer.meshkit.test/", '
        f'audience: "meshkit-gateway-tests"}}'
    )
    return f"    plugins:\n      - jwt: {options}"


@pytest.mark.parametrize("answer", ["refuse", "accept"])
async def test_an_async_jwt_handshake_forwards_bytes_behind_it_only_after_a_101(
    answer: str,
) -> None:
    """The jwt plugin's first JWKS fetch makes its request hook async: the handshake waits for it while the client
    keeps sending. Nothing the client sent behind the handshake may reach the upstream unless it answers 101."""
    keys = make_keys()

    async def script(conn: RawConn) -> None:
        if answer == "refuse":
            conn.writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
            await conn.read_rest()
        else:
            conn.writer.write(SWITCH)
            await conn.read_rest()

    handshake = HANDSHAKE + f"Authorization: Bearer {good_token(keys)}\r\n\r\n".encode()
    later = b"GET /admin/other HTTP/1.1\r\nHost: shop\r\n\r\n"
    async with (
        JwksServer(jwks_document(keys)) as jwks,
        raw_upstream(script) as up,
        gateway(config(up.target, extra=jwt_plugin(jwks.url))) as gw,
        connect(gw.port) as (reader, writer),
    ):
        jwks.hold()
        writer.write(handshake + SMUGGLED)
        await until(lambda: jwks.hits == 1)
        writer.write(later)  # while the plugin waits for its keys
        await writer.drain()
        jwks.release()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            if answer == "refuse":
                assert head.startswith(b"HTTP/1.1 403 ")
                with contextlib.suppress(ConnectionResetError):  # closed with the client's bytes unread: an RST
                    await reader.read()
                await until(lambda: bool(up.conns) and up.conns[0].eof.is_set())
                assert bytes(up.conns[0].after) == b""
            else:
                assert head.startswith(b"HTTP/1.1 101 ")
                await until(lambda: bytes(up.conns[0].after) == SMUGGLED + later)
        assert len(up.conns) == 1
        assert up.conns[0].head.startswith(b"GET /ws/chat ")


async def test_an_async_jwt_handshake_with_a_bad_token_never_reaches_the_upstream() -> None:
    keys = make_keys()

    async def script(conn: RawConn) -> None:
        conn.writer.write(SWITCH)
        await conn.read_rest()

    bad = good_token(keys, key=keys.attacker)
    async with (
        JwksServer(jwks_document(keys)) as jwks,
        raw_upstream(script) as up,
        gateway(config(up.target, extra=jwt_plugin(jwks.url))) as gw,
    ):
        raw = HANDSHAKE + f"Authorization: Bearer {bad}\r\n\r\n".encode() + SMUGGLED
        response = await exchange(gw.port, raw, responses=2, timeout=5)
        assert statuses(response) == [401]
        assert jwks.hits == 1
        assert up.conns == []


def plain_or(ws: Script) -> Script:
    """An upstream answering /plain with 200 (keep-alive, as often as asked) and handing /ws to ``ws``."""

    async def script(conn: RawConn) -> None:
        while conn.head.split(b" ", 2)[1] == b"/plain":
            conn.writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain")
            conn.head = await conn.reader.readuntil(b"\r\n\r\n")
        await ws(conn)

    return script


async def accept_and_echo(conn: RawConn) -> None:
    conn.writer.write(SWITCH)
    await conn.echo()


async def test_bytes_behind_a_pipelined_handshake_never_reach_the_upstream_without_a_101() -> None:
    async def refuse(conn: RawConn) -> None:
        conn.writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
        await conn.read_rest()

    async with raw_upstream(plain_or(refuse)) as up, gateway(config(up.target)) as gw:
        raw = b"GET /plain HTTP/1.1\r\nHost: shop\r\n\r\n" + HANDSHAKE + b"\r\n" + SMUGGLED
        await exchange(gw.port, raw, responses=3, timeout=5)  # returns once the gateway closed the connection
        assert all(b"/admin/secret" not in c.head and b"/admin/secret" not in c.after for c in up.conns)


async def test_a_handshake_pipelined_behind_a_plain_request_is_answered() -> None:
    """HTTP/1.1 lets a client pipeline a handshake behind a request; the gateway answers the first request and
    then closes the connection without ever answering (or forwarding) the handshake."""
    async with (
        raw_upstream(plain_or(accept_and_echo)) as up,
        gateway(config(up.target)) as gw,
    ):
        raw = b"GET /plain HTTP/1.1\r\nHost: shop\r\n\r\n" + HANDSHAKE + b"\r\n"
        async with connect(gw.port) as (reader, writer):
            writer.write(raw)
            async with asyncio.timeout(10):
                first = await reader.readuntil(b"plain")
                assert first.startswith(b"HTTP/1.1 200 ")
                rest = await reader.read(65536)
            assert rest.startswith(b"HTTP/1.1 101 "), f"the handshake got {rest!r} (b'': connection closed)"


# ------------------------------------------------------------------------------------------------ leaks


async def test_a_client_half_close_reaches_the_upstream_which_can_still_answer() -> None:
    async def script(conn: RawConn) -> None:
        conn.writer.write(SWITCH)
        await conn.read_rest()  # until the client's EOF arrives
        conn.writer.write(b"bye")
        await conn.writer.drain()

    async with tunnel_to(script) as (up, gw, reader, writer):
        async with asyncio.timeout(10):
            writer.write(b"ping")
            writer.write_eof()
            assert await reader.read() == b"bye"  # then EOF: the upstream closed, the tunnel too
        assert bytes(up.conns[0].after) == b"ping"
        await until(lambda: no_tunnels(gw))


async def test_an_upstream_half_close_reaches_the_client_which_can_still_send() -> None:
    async def script(conn: RawConn) -> None:
        conn.writer.write(SWITCH + b"last")
        conn.writer.write_eof()
        await conn.read_rest()

    async with tunnel_to(script) as (up, gw, reader, writer):
        async with asyncio.timeout(10):
            assert await reader.read() == b"last"  # and EOF
            writer.write(b"after-eof")
            writer.write_eof()
            await up.conns[0].eof.wait()
        assert bytes(up.conns[0].after) == b"after-eof"
        await until(lambda: no_tunnels(gw))


@pytest.mark.parametrize("answer", ["403", "101"])
async def test_upstream_connections_used_for_a_handshake_never_go_back_to_the_pool(
    answer: str,
) -> None:
    async def ws(conn: RawConn) -> None:
        if answer == "403":
            conn.writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
            await conn.read_rest()
        else:
            await accept_and_echo(conn)

    async with raw_upstream(plain_or(ws)) as up, gateway(config(up.target)) as gw:
        assert status_of(await exchange(gw.port, b"GET /plain HTTP/1.1\r\nHost: shop\r\n\r\n")) == 200
        await until(lambda: len(idle_upstreams(gw)) == 1)  # the handshake below takes this pooled connection
        async with connect(gw.port) as (reader, writer):
            writer.write(HANDSHAKE + b"\r\n")
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(f"HTTP/1.1 {answer} ".encode())
            assert idle_upstreams(gw) == []
        await until(lambda: no_tunnels(gw))
        assert idle_upstreams(gw) == []
        await until(lambda: all(c.eof.is_set() for c in up.conns))


async def test_an_idle_tunnel_to_a_client_that_stopped_reading_is_really_closed() -> None:
    """Idle timeout: the client stopped reading, the upstream is paused, nothing crosses. The gateway closes the
    tunnel with transport.close(), which waits for the write buffer to drain: it never does, so the socket (and
    its buffer) stays open for as long as the client likes."""

    async def script(conn: RawConn) -> None:
        conn.writer.write(SWITCH)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(20 * 16):  # 20 MiB, far more than the buffers take
                conn.writer.write(chunk)
                await conn.writer.drain()
                conn.sent += len(chunk)
        await conn.read_rest()

    limits = "limits: {websocket_idle_timeout: 1s}"
    async with (
        raw_upstream(script) as up,
        gateway(config(up.target, limits=limits)) as gw,
    ):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        sock.setblocking(False)
        try:
            sock.send(HANDSHAKE + b"\r\n")  # and never read
            await until(lambda: bool(gw.server and gw.server.tunnels))
            client_side = the_tunnel(gw).ends[0].transport
            gateway_socket = client_side.get_extra_info("socket")
            await until(lambda: no_tunnels(gw), timeout=15)  # the idle timeout fired
            assert client_side.is_closing()
            with contextlib.suppress(TimeoutError):
                await until(lambda: gateway_socket.fileno() == -1, timeout=3)
            assert gateway_socket.fileno() == -1, (
                f"the gateway's socket is still open, {client_side.get_write_buffer_size()} bytes waiting to be "
                "written to a client that does not read"
            )
        finally:
            sock.close()


# ------------------------------------------------------------------------------------------------ accounting


def accounted(gw: Gateway) -> tuple[int, dict[str, int], int, int]:
    route = gw.routes[0]
    assert route.upstream is not None and route.breaker is not None
    metrics = route.breaker.metrics()
    return (
        route.in_flight,
        dict(route.upstream.client.outstanding),
        metrics.calls,
        metrics.failed_calls,
    )


ACCOUNTED = "    retries: 0\n    max_concurrent: 5\n    timeout: 1s\n    breaker: {window: 4, minimum_calls: 4}"


@pytest.mark.parametrize("answer", ["101", "403", "silent"])
async def test_a_handshake_is_accounted_once(answer: str) -> None:
    async def script(conn: RawConn) -> None:
        if answer == "101":
            await accept_and_echo(conn)
        elif answer == "403":
            conn.writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
            await conn.read_rest()
        else:
            await conn.read_rest()

    async with (
        raw_upstream(script) as up,
        gateway(config(up.target, extra=ACCOUNTED)) as gw,
    ):
        async with connect(gw.port) as (reader, writer):
            writer.write(HANDSHAKE + b"\r\n")
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            expected = {"101": 101, "403": 403, "silent": 504}[answer]
            assert status_of(head) == expected
            assert accounted(gw) == (0, {}, 1, 1 if answer == "silent" else 0)
        await until(lambda: no_tunnels(gw))
        assert accounted(gw) == (0, {}, 1, 1 if answer == "silent" else 0)
        assert len(up.conns) == 1


async def test_stopping_the_gateway_mid_handshake_gives_everything_back_uncounted() -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_rest()  # never answers

    async with raw_upstream(script) as up, connect_later() as later:
        async with gateway(config(up.target, extra=ACCOUNTED)) as gw:
            route = gw.routes[0]
            reader, writer = await later(gw.port)
            writer.write(HANDSHAKE + b"\r\n" + b"early")
            await until(lambda: len(up.conns) == 1)
            assert route.in_flight == 1
        assert route.upstream is not None and route.breaker is not None
        assert (route.in_flight, dict(route.upstream.client.outstanding)) == (0, {})
        assert route.breaker.metrics().failed_calls == 0
        await until(up.conns[0].eof.is_set)
        assert bytes(up.conns[0].after) == b""
        assert await reader.read() == b""  # closed without an answer


@contextlib.asynccontextmanager
async def connect_later() -> AsyncIterator[
    Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
]:
    writers: list[asyncio.StreamWriter] = []

    async def open_(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    try:
        yield open_
    finally:
        for writer in writers:
            writer.close()


async def test_clients_that_leave_mid_handshake_do_not_count_against_the_breaker() -> None:
    """docs/gateway.md: a client that goes away mid-exchange counts against neither the route's breaker nor the
    instance's outlier detection. A handshake pauses reading the client until the upstream answers, so the gateway
    never notices the client left: the handshake holds its bulkhead slot until the route's timeout, which then
    counts as the upstream's failure (4 such clients open the breaker of a healthy upstream)."""

    async def script(conn: RawConn) -> None:
        await conn.read_rest()  # a slow upstream: answers nothing before the client gives up

    async with (
        raw_upstream(script) as up,
        gateway(config(up.target, extra=ACCOUNTED)) as gw,
    ):
        for i in range(4):
            async with connect(gw.port) as (_, writer):
                writer.write(HANDSHAKE + b"\r\n")
                await until(lambda i=i: len(up.conns) > i)  # type: ignore[misc]
        await until(lambda: accounted(gw)[:2] == (0, {}))
        failed = accounted(gw)[3]
        route = gw.routes[0]
        assert route.breaker is not None
        assert (failed, str(route.breaker.state)) == (0, "closed")


# ------------------------------------------------------------------------------------------------ flow control


async def test_a_client_that_does_not_read_pauses_reading_from_the_upstream() -> None:
    async def script(conn: RawConn) -> None:
        conn.writer.write(SWITCH)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(20 * 16):
                conn.writer.write(chunk)
                await conn.writer.drain()
                conn.sent += len(chunk)
        await conn.read_rest()

    async with tunnel_to(script) as (up, gw, _reader, writer):
        cast("asyncio.Transport", writer.transport).pause_reading()
        await until(lambda: bool(gw.server and gw.server.tunnels))
        client_side, upstream_side = (end.transport for end in the_tunnel(gw).ends)
        await until(lambda: not upstream_side.is_reading() or up.conns[0].sent >= 20 * MiB)
        assert client_side.get_write_buffer_size() < MiB
        assert up.conns[0].sent < 20 * MiB


async def test_an_upstream_that_does_not_read_pauses_reading_from_the_client() -> None:
    stop = asyncio.Event()

    async def script(conn: RawConn) -> None:
        conn.writer.write(SWITCH)
        cast("asyncio.Transport", conn.writer.transport).pause_reading()
        await stop.wait()

    async with tunnel_to(script) as (up, gw, _reader, writer):
        client_side, upstream_side = (end.transport for end in the_tunnel(gw).ends)
        writer.write(b"y" * 20 * MiB)  # buffered by the test's transport once the gateway stops reading
        await until(lambda: not client_side.is_reading() or upstream_side.get_write_buffer_size() > 4 * MiB)
        assert upstream_side.get_write_buffer_size() < MiB
        stop.set()
        assert len(up.conns) == 1


async def test_back_pressure_holds_when_the_early_frames_already_fill_the_upstream_buffer() -> None:
    """Frames sent right behind the handshake plus a flood: over loopback the kernel takes the whole early read, so
    back-pressure holds here (the unit test below shows the case where the early frames fill the buffer)."""
    stop = asyncio.Event()

    async def script(conn: RawConn) -> None:
        cast("asyncio.Transport", conn.writer.transport).pause_reading()  # reads nothing more than the handshake's head
        conn.writer.write(SWITCH)
        await stop.wait()

    async with (
        raw_upstream(script, rcvbuf=4096) as up,
        gateway(config(up.target)) as gw,
    ):
        async with connect(gw.port) as (reader, writer):
            writer.write(HANDSHAKE + b"\r\n" + b"e" * 200_000)  # read by the gateway together with the head
            async with asyncio.timeout(10):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            client_side, upstream_side = (end.transport for end in the_tunnel(gw).ends)
            writer.write(b"y" * 20 * MiB)
            await until(lambda: not client_side.is_reading() or upstream_side.get_write_buffer_size() > 4 * MiB)
            assert upstream_side.get_write_buffer_size() < MiB, "the gateway kept reading the client"
            stop.set()
        assert len(up.conns) == 1


class _Pipe(asyncio.Transport):
    """A transport stand-in with asyncio's write flow control: pause_writing once past ``high`` bytes buffered."""

    def __init__(self, high: int = 64 * 1024, *, reading: bool = True) -> None:
        super().__init__()
        self.protocol: Any = None
        self.high = high
        self.buffered = 0
        self.paused = False
        self.reading = reading
        self.closing = False

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def write(self, data: Any) -> None:
        self.buffered += len(data)
        if self.buffered > self.high and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True


async def test_early_frames_that_fill_the_upstream_buffer_keep_the_client_paused() -> None:
    """Frames sent right behind the handshake are written to the upstream when the tunnel starts. When they take the
    upstream's buffer past the high-water mark, pause_writing pauses reading the client, and the tunnel must not
    resume it: asyncio calls pause_writing only once per crossing, so a client resumed then could make the gateway
    buffer without limit for an upstream that does not read. (Over loopback the kernel takes the whole early read,
    so stand-in transports show it; on a real network it happens.)"""
    server = Server(Router([]))
    client, upstream = (
        _Pipe(reading=False),
        _Pipe(),
    )  # the client was paused since the handshake's head
    tunnel = _Tunnel(server, client, upstream, b"e" * 200_000)
    try:
        assert upstream.paused  # the early frames alone filled the upstream's buffer
        assert not client.is_reading(), "the tunnel reads the client while the upstream's buffer is full"
    finally:
        tunnel.close()


# ------------------------------------------------------------------------------------------------ TLS


async def test_a_wss_client_closing_first_logs_no_asyncio_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under TLS, eof_received returning True has no effect and asyncio logs a warning for it: _TunnelEnd returns
    True whenever the *peer* can write EOF, without asking whether its own transport (TLS) can stay half-open."""
    files = _certificates(tmp_path)
    trust = ssl.create_default_context(cafile=str(files["ca.crt"]))
    trust.set_alpn_protocols(["http/1.1"])

    async def script(conn: RawConn) -> None:
        conn.writer.write(SWITCH)
        await conn.read_rest()

    async with raw_upstream(script) as up:
        text = config(up.target).replace(
            "listen: {port: 0}",
            "listen:\n  port: 0\n  tls: {cert: server.crt, key: server.key}",
        )
        async with gateway(text, folder=tmp_path) as gw:
            caplog.set_level(logging.WARNING, logger="asyncio")
            async with connect(gw.port, ssl=trust) as (reader, writer):
                writer.write(HANDSHAKE + b"\r\n")
                async with asyncio.timeout(10):
                    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
                writer.write(b"bye")
                await writer.drain()
            # the client closed (TLS close_notify): the upstream sees the end, the tunnel goes
            await until(lambda: bool(up.conns) and up.conns[0].eof.is_set())
            await until(lambda: no_tunnels(gw))
            assert bytes(up.conns[0].after) == b"bye"
            warnings = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
            assert warnings == []
