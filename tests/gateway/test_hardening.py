"""Hardening: request smuggling and parsing abuse over raw sockets, slowloris, oversize heads and bodies.

The rule the corpus checks: every request is either refused (4xx/5xx from the gateway, then the connection is
closed) or forwarded in a form the upstream parses the same way the gateway did: the upstream never receives a
request with two framings, and never a second request hidden in the body of the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest

from tests.gateway.servers import Answer, exchange, gateway, status_of, statuses, upstream

pytestmark = pytest.mark.anyio

CONFIG = """
listen: {port: 0}
limits: {max_header_bytes: 8KiB, header_timeout: 1s, max_body: 64KiB}
routes:
  - name: all
    path: /
    targets: ["TARGET"]
"""

H = b"Host: shop.example\r\n"

# (description, raw request bytes, the status the gateway answers; 200 = normalised and forwarded)
CORPUS: list[tuple[str, bytes, int]] = [
    (
        "CL and TE together (CL.TE)",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
        400,
    ),
    (
        "TE and CL together (TE.CL)",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        400,
    ),
    (
        "two different Content-Length",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    (
        "two equal Content-Length",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    ("Content-Length list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("negative Content-Length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("Content-Length with plus sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("hex Content-Length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    (
        "TE: identity, chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    (
        "TE: chunked, identity",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("TE: xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    (
        "two TE headers",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "TE with a space before the colon",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold continuation line", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    (
        "obs-fold on Transfer-Encoding",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "invalid chunk size",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "negative chunk size",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk size overflow",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk without CRLF after data",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
        400,
    ),
    ("missing Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Host headers", b"GET / HTTP/1.1\r\n" + H + b"Host: evil.example\r\n\r\n", 400),
    ("Host with a path", b"GET / HTTP/1.1\r\nHost: shop.example/evil\r\n\r\n", 400),
    ("Host with a space", b"GET / HTTP/1.1\r\nHost: shop example\r\n\r\n", 400),
    ("NUL in a header value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n", 400),
    ("bare LF line endings", b"GET / HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"\n", 400),
    ("space in the header name", b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n", 400),
    ("header without a colon", b"GET / HTTP/1.1\r\n" + H + b"X-A b\r\n\r\n", 400),
    ("invalid method token", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("unknown HTTP version", b"GET / HTTP/1.7\r\n" + H + b"\r\n", 400),
    ("HTTP/2 preface on HTTP/1", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("request target with a fragment", b"GET /a#b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("asterisk target on GET", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("authority-form target on GET", b"GET shop.example:80 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("non-ASCII in the target", b"GET /\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("NUL percent-encoded in the path", b"GET /a%00b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("invalid percent-encoding", b"GET /a%zzb HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("overlong UTF-8 in the path", b"GET /%c0%ae%c0%ae/etc HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("unsupported Expect", b"GET / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\n\r\n", 417),
    (
        "WebSocket upgrade on a route without websocket: true",
        b"GET / HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        501,
    ),
    ("CONNECT with a path", b"CONNECT / HTTP/1.1\r\n" + H + b"\r\n", 501),
    ("CONNECT to an authority", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    ("oversize header block", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 10_000 + b"\r\n\r\n", 431),
    (
        "many headers over the limit",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(300)) + b"\r\n",
        431,
    ),
    ("oversize body by Content-Length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1000000\r\n\r\n", 413),
    (
        "oversize chunked body",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"8000\r\n" + b"a" * 0x8000 + b"\r\n" for _ in range(3))
        + b"0\r\n\r\n",
        413,
    ),
    # normalised and forwarded: the upstream sees one clean request
    ("dot segments above the root", b"GET /../../etc/passwd HTTP/1.1\r\n" + H + b"\r\n", 200),
    ("absolute-form target", b"GET http://shop.example/a?b=1 HTTP/1.1\r\n" + H + b"\r\n", 200),
    ("double slashes", b"GET //a///b HTTP/1.1\r\n" + H + b"\r\n", 200),
    ("encoded dot segments", b"GET /a/%2e%2e/b HTTP/1.1\r\n" + H + b"\r\n", 200),
    ("HTTP/1.0 without Host", b"GET /old HTTP/1.0\r\n\r\n", 200),
]


def test_the_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 30
    assert len({d for d, _, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("description", "raw", "expected"), CORPUS, ids=[d for d, _, _ in CORPUS])
async def test_smuggling_and_parsing_corpus(description: str, raw: bytes, expected: int) -> None:
    async with upstream() as up, gateway(CONFIG.replace("TARGET", up.target)) as gw:
        # a well-formed request after the hostile one, on the same connection: if it were hidden in the first
        # one's body (smuggled), the upstream would see it
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        response = await exchange(gw.port, raw + smuggled, responses=2)
        assert status_of(response) == expected, response[:300]
        assert all(seen.path != "/smuggled" or expected == 200 for seen in up.seen)
        for seen in up.seen:
            framing = [k for k, _ in seen.headers if k in ("content-length", "transfer-encoding")]
            assert len(framing) <= 1, seen.headers  # one framing header, the gateway's own
            assert seen.header("host") == up.target
        if expected != 200:
            assert up.seen == [], [s.path for s in up.seen]
            assert statuses(response) == [expected]  # refused, then closed: nothing after it was read
            body = json.loads(response.split(b"\r\n\r\n", 1)[1])
            assert body["status"] == expected and body["message"]
        else:
            assert up.seen, "the normalised request was forwarded"
            first = up.seen[0].path
            assert "/.." not in first and "//" not in first and first.startswith("/")
        assert up.errors == []  # the upstream parsed everything it received


async def test_a_header_trickler_is_cut_off_and_does_not_starve_others() -> None:
    async with upstream() as up, gateway(CONFIG.replace("TARGET", up.target)) as gw:
        tricklers = []
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
            tricklers.append((reader, writer))

        async def trickle() -> None:
            for _ in range(30):
                for _, writer in tricklers:
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"X-Slow: 1\r\n")
                await asyncio.sleep(0.2)  # the attacker's pace, not a wait for a condition

        task = asyncio.create_task(trickle())
        # normal clients are served meanwhile
        for i in range(20):
            response = await exchange(gw.port, b"GET /n%d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % i)
            assert status_of(response) == 200
        # every trickler is answered 408 and disconnected after the header timeout (1 s), long before it ends
        async with asyncio.timeout(20):
            for reader, _ in tricklers:
                data = await reader.read()
                assert status_of(data) == 408
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _, writer in tricklers:
            writer.close()
        assert all(not s.path.startswith("/") or s.path.startswith("/n") for s in up.seen)


async def test_an_idle_connection_that_never_sends_is_closed_after_the_header_timeout() -> None:
    async with upstream() as up, gateway(CONFIG.replace("TARGET", up.target)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        async with asyncio.timeout(20):
            assert await reader.read() == b""
        writer.close()


@pytest.mark.parametrize("closing", [False, True], ids=["keep-alive", "connection-close"])
async def test_a_client_that_stops_reading_its_response_is_disconnected_after_the_send_timeout(closing: bool) -> None:
    """Slow read: the client asks for a large response and reads none of it. Its connection (and the exchange, and
    the upstream connection behind it) would be held for ever; after ``send_timeout`` it is aborted, and a client
    whose connection the gateway had already closed (Connection: close) does not keep it half-open either."""
    big = b"x" * (32 * 1024 * 1024)  # far more than the socket buffers of both ends hold

    async with (
        upstream(lambda seen: Answer(200, big)) as up,
        gateway(
            CONFIG.replace("TARGET", up.target).replace("max_body: 64KiB", "max_body: 64KiB, send_timeout: 1s")
        ) as gw,
    ):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        close = b"Connection: close\r\n" if closing else b""
        await asyncio.get_running_loop().sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: a\r\n" + close + b"\r\n")
        try:
            assert gw.server is not None
            async with asyncio.timeout(30):
                while not gw.server.connections:  # noqa: ASYNC110 - the server's state, no event to wait on
                    await asyncio.sleep(0.02)
                while gw.server.connections or gw.server.exchanges:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            # others are served meanwhile and after
            small = await exchange(gw.port, b"GET /small HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert status_of(small) == 200
        finally:
            sock.close()
