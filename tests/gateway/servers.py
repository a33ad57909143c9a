"""Real servers for the gateway tests: a recording upstream (raw asyncio + httptools, so the tests see exactly the
bytes the gateway sent) and helpers to start a gateway from YAML text and talk to it over raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httptools

from meshkit.discovery import Registry
from meshkit.gateway import Gateway, parse_config


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"ok"
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False
    delay: float = 0.0
    close: bool = False  # close the connection after answering (or, with status 0, without answering)


Responder = Callable[[Seen], Answer]


def echo(seen: Seen) -> Answer:
    """The default: 200 with a JSON description of what arrived."""
    body = json.dumps(
        {
            "method": seen.method,
            "path": seen.path,
            "headers": seen.headers,
            "body": seen.body.decode("latin-1"),
        }
    ).encode()
    return Answer(200, body, [("content-type", "application/json")])


class _Conn(asyncio.Protocol):
    def __init__(self, upstream: RecordingUpstream) -> None:
        self.up = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()
        self.headers: list[tuple[str, str]] = []
        self.url = b""
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up.connections += 1
        self.up.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.open.discard(self)

    def data_received(self, data: bytes) -> None:
        self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # the request asked to switch protocols; this upstream never does: it answered it as a plain request
            self.parser = httptools.HttpRequestParser(self)
        except httptools.HttpParserError as exc:
            self.up.errors.append(f"{type(exc).__name__}: {exc}")
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.headers = []
        self.url = b""
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        seen = Seen(
            self.parser.get_method().decode(),
            self.url.decode("latin-1"),
            self.headers,
            bytes(self.body),
            bytes(self.raw),
        )
        self.raw = bytearray()
        self.up.seen.append(seen)
        answer = self.up.responder(seen)
        if answer.delay:
            asyncio.get_running_loop().call_later(answer.delay, self._answer, answer, seen)
        else:
            self._answer(answer, seen)

    def _answer(self, answer: Answer, seen: Seen) -> None:
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return
        if answer.status == 0:
            transport.close()
            return
        head = [f"HTTP/1.1 {answer.status} X\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in answer.headers]
        if answer.chunked:
            head.append("transfer-encoding: chunked\r\n")
        elif not (seen.method == "HEAD" and any(k == "content-length" for k, _ in answer.headers)):
            head.append(f"content-length: {len(answer.body)}\r\n")
        if answer.close:
            head.append("connection: close\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        if seen.method != "HEAD":
            if answer.chunked:
                data += b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in (answer.body[:3], answer.body[3:]) if c)
                data += b"0\r\n\r\n"
            else:
                data += answer.body
        transport.write(data)
        if answer.close:
            transport.close()


class RecordingUpstream:
    """An HTTP/1.1 server that records every request it gets and answers with ``responder``."""

    def __init__(self, responder: Responder = echo) -> None:
        self.responder = responder
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        self.connections = 0
        self.open: set[_Conn] = set()
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> RecordingUpstream:
        self.server = await asyncio.get_running_loop().create_server(lambda: _Conn(self), "127.0.0.1", port)
        return self

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in self.open:
                if conn.transport is not None:
                    conn.transport.close()
            await self.server.wait_closed()
            self.server = None


@contextlib.asynccontextmanager
async def upstream(responder: Responder = echo) -> AsyncIterator[RecordingUpstream]:
    up = await RecordingUpstream(responder).start()
    try:
        yield up
    finally:
        await up.aclose()


@contextlib.asynccontextmanager
async def gateway(
    text: str, *, registry: Registry | None = None, folder: Path | None = None, path: Path | None = None
) -> AsyncIterator[Gateway]:
    """A gateway started from YAML text on free ports."""
    gw = Gateway(parse_config(text, folder=folder), registry=registry, path=path)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.aclose(grace=1.0)


class _Counter:
    def __init__(self) -> None:
        self.complete = 0

    def on_message_complete(self) -> None:
        self.complete += 1


async def exchange(port: int, raw: bytes, *, responses: int = 1, timeout: float = 10.0) -> bytes:
    """Send raw bytes; read until ``responses`` complete responses arrived or the server closed the connection.
    Returns every byte that came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    counter = _Counter()
    parser = httptools.HttpResponseParser(counter)
    out = bytearray()
    try:
        writer.write(raw)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await writer.drain()
        async with asyncio.timeout(timeout):
            while counter.complete < responses:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
                with contextlib.suppress(httptools.HttpParserError):
                    parser.feed_data(chunk)
        return bytes(out)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def status_of(response: bytes) -> int:
    """The status code of the first response in ``response`` (0: none)."""
    if not response.startswith(b"HTTP/1."):
        return 0
    return int(response.split(b" ", 2)[1])


def statuses(response: bytes) -> list[int]:
    """The status codes of every response in a byte stream (pipelined answers)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", response)]
