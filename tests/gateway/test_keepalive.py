"""Keep-alive, pipelining and the slow-read timeout (``limits.send_timeout``) at their edges, over raw sockets.

The rule: a response that says keep-alive is followed by the next answer on the same connection, one that says
``connection: close`` ends it, no request read after the connection's end is forwarded, and a client that reads
its response steadily (however slowly it arrives in full) is never cut off by the slow-read timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httptools
import pytest

from meshkit.gateway import ProxyRequest, Reply
from tests.gateway.servers import Answer, Seen, exchange, gateway, status_of, statuses, upstream

pytestmark = pytest.mark.anyio

BIG = 4 * 1024 * 1024  # far more than the write buffer's high-water mark
HUGE = 16 * 1024 * 1024  # more than the socket buffers hold too (Linux grows a send buffer up to 4 MiB)

CONFIG = """
listen: {port: 0}
limits: {LIMITS}
routes:
  - name: api
    path: /api
    targets: ["TARGET"]
bff:
  - name: big
    path: /big
    handler: tests.gateway.test_keepalive:big_answer
    timeout: 30s
    calls:
      one: {targets: ["TARGET"], path: "/api/slow"}
"""


async def big_answer(req: ProxyRequest, results: dict[str, object]) -> Reply:
    """A gateway-built answer (an aggregation, a plugin's or a cache's reply): written to the client at once."""
    size = int(req.query.removeprefix("size=")) if req.query.startswith("size=") else BIG
    return Reply(200, body=b"x" * size)


def config(target: str, limits: str = "{}") -> str:
    return CONFIG.replace("TARGET", target).replace("{LIMITS}", limits)


class _Reader:
    def __init__(self) -> None:
        self.complete = 0
        self.body = 0
        self.headers: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.lower()))

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        self.complete += 1


async def steady_read(port: int, request: bytes, *, piece: int = 16 * 1024, pause: float = 0.01) -> _Reader:
    """A client with a small receive buffer that reads ``piece`` bytes every ``pause`` seconds (about 1.5 MB/s:
    slow, never stalled) until its response is complete or the connection ends."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    reader = _Reader()
    parser = httptools.HttpResponseParser(reader)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        async with asyncio.timeout(60):
            while reader.complete == 0:
                try:
                    data = await loop.sock_recv(sock, piece)
                except ConnectionResetError:
                    break
                if not data:
                    break
                with contextlib.suppress(httptools.HttpParserError):
                    parser.feed_data(data)
                await asyncio.sleep(pause)  # the pace of a slow link, not a wait for a condition
    finally:
        sock.close()
    return reader


def slow(seen: Seen) -> Answer:
    """The BFF call: answered after 1.5 s (a slow backend); everything else at once."""
    if seen.path == "/api/slow":
        return Answer(200, b"{}", delay=1.5)
    return Answer(200, b"ok")


# -- (a) closing after the exchange that asked to -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /api/2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        b"POST /api/3 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
        # an HTTP/1.0 client keeps its connection while it asks for keep-alive
        b"GET /api/1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        b"GET /api/2 HTTP/1.0\r\n\r\n"
        b"GET /api/3 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ],
    ids=["http-1.1", "http-1.0"],
)
async def test_pipelined_requests_up_to_the_one_that_closes_are_answered_and_later_ones_never_forwarded(
    raw: bytes,
) -> None:
    async with upstream(lambda seen: Answer(200, b"ok")) as up, gateway(config(up.target)) as gw:
        out = await exchange(gw.port, raw, responses=3)
        assert statuses(out) == [200, 200]
        assert out.lower().count(b"connection: close") == 1  # on the second answer only
        assert [s.path for s in up.seen] == ["/api/1", "/api/2"]


async def test_a_request_pipelined_behind_an_answer_the_gateway_gives_itself_is_not_forwarded_unanswered() -> None:
    """Fixed: a 404 (as any answer given while the request is read: 405, 413, a plugin's 401/429, an open breaker's
    503) closes the connection, yet llhttp goes on reading the same packet and the next request is started: with a
    pooled upstream connection, the POST reaches the upstream and its answer is thrown away. The client, which saw
    the connection close after the 404, will send it again."""
    async with upstream(lambda seen: Answer(200, b"ok")) as up, gateway(config(up.target)) as gw:
        assert status_of(await exchange(gw.port, b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n")) == 200  # pools one
        raw = b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\nPOST /api/pay HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        out = await exchange(gw.port, raw, responses=2)
        answered = statuses(out)
        forwarded = [s.path for s in up.seen if s.method == "POST"]
        assert answered == [404, 200] or not forwarded, f"answers {answered}, the upstream got {forwarded}"


async def test_a_404_on_a_keep_alive_connection_does_not_close_it() -> None:
    """Fixed: reply() counts a bodiless GET answered from on_headers_complete as 'body unread' (request_done is set
    by on_message_complete, after it): every 404 / 401 / 429 closes the keep-alive connection."""
    async with upstream(lambda seen: Answer(200, b"ok")) as up, gateway(config(up.target)) as gw:
        raw = b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"
        out = await exchange(gw.port, raw)
        assert status_of(out) == 404
        assert b"connection: close" not in out.lower()


async def test_a_valid_request_pipelined_before_a_malformed_one_gets_its_own_answer() -> None:
    """Fixed: refuse() drops the exchanges queued before the bad request and writes its 400 first: the client reads
    it as the answer to its (valid) first request; had that one's head already gone out, the connection is closed
    mid-response instead."""
    async with upstream(lambda seen: Answer(200, b"ok", delay=0.2)) as up, gateway(config(up.target)) as gw:
        raw = (
            b"POST /api/pay HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /api HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n"
        )
        out = await exchange(gw.port, raw, responses=2)
        assert statuses(out)[:1] == [200], f"the first request got {statuses(out)}"


# -- (b) send_timeout (slow read) --------------------------------------------------------------------------------


async def test_a_steady_reader_of_a_streamed_response_outlives_the_send_timeout() -> None:
    """a proxied response is read from the upstream only as the client takes it, so each pause of writing
    is short and ends with resume_writing (the clock restarts)."""
    async with (
        upstream(lambda seen: Answer(200, b"y" * BIG)) as up,
        gateway(config(up.target, "{send_timeout: 1s}")) as gw,
    ):
        got = await steady_read(gw.port, b"GET /api HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert (got.complete, got.body) == (1, BIG)


async def test_a_steady_reader_of_a_large_gateway_answer_is_not_aborted_by_the_send_timeout() -> None:
    """Fixed: an answer the gateway writes at once (a BFF or handler reply, a buffered response up to 10 MiB) pauses
    writing once; resume_writing comes only when the buffer is down to the low-water mark, so a client reading
    steadily but needing more than send_timeout for the whole body is aborted as if it had stopped reading."""
    async with upstream(lambda seen: Answer(200, b"{}")) as up, gateway(config(up.target, "{send_timeout: 1s}")) as gw:
        request = b"GET /big?size=%d HTTP/1.1\r\nHost: a\r\n\r\n" % HUGE
        got = await steady_read(gw.port, request, piece=64 * 1024)
        assert (got.complete, got.body) == (1, HUGE), f"the connection ended after {got.body} of {HUGE} bytes"


@pytest.mark.parametrize("closing", [False, True], ids=["keep-alive", "connection-close"])
async def test_a_response_slower_than_the_keepalive_timeout_is_not_cut_off_while_it_is_written(closing: bool) -> None:
    """Fixed: idle_since is the time the request arrived; once the exchange finished, expired()
    sees a connection 'idle' for longer than keepalive_timeout, and timed_out() now aborts any connection that is
    write-paused or closed: the tail of the response still in the write buffer is thrown away (send_timeout is
    60 s and the client never stopped reading)."""
    async with (
        upstream(slow) as up,
        gateway(config(up.target, "{keepalive_timeout: 1s, send_timeout: 60s}")) as gw,
    ):
        close = b"Connection: close\r\n" if closing else b""
        request = b"GET /big?size=%d HTTP/1.1\r\nHost: a\r\n%b\r\n" % (HUGE, close)
        got = await steady_read(gw.port, request, piece=64 * 1024)
        assert (got.complete, got.body) == (1, HUGE), f"the connection ended after {got.body} of {HUGE} bytes"
