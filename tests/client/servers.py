"""Real local HTTP servers for the client tests: aiohttp apps on free loopback ports, in the test's event loop.

A :class:`Backend` answers every path; what it answers depends on its ``mode``, which a test changes while the
server runs:

- ``ok``: 200 with JSON ``{"instance": name, "n": hits, "method": ..., "path": ..., "query": ..., "body": ...}``;
- ``fail``: 503;
- ``drop``: the connection is closed without an answer (a crashed handler, a killed worker);
- ``hang``: no answer until the server closes.

``hits`` counts every request the server received (in every mode) and ``seen`` keeps them, so tests measure where
traffic went on the server side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from meshkit.discovery import Instance, Registry
from tests.local_http import LocalServer

Mode = Literal["ok", "fail", "drop", "hang"]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class Backend(LocalServer):
    """One real HTTP server (see the module docstring). Use ``async with`` or :meth:`start` / :meth:`close`."""

    def __init__(self, name: str, mode: Mode = "ok", *, status: int = 503) -> None:
        self.name = name
        self.mode: Mode = mode
        self.status = status
        self.hits = 0
        self.seen: list[Seen] = []
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        super().__init__(app)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        body = await request.read()
        self.seen.append(Seen(request.method, request.path, request.query_string, dict(request.headers), body))
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPServiceUnavailable
        if self.mode == "hang":
            await self._release.wait()
            raise web.HTTPServiceUnavailable
        if self.mode == "fail":
            return web.json_response({"instance": self.name, "n": self.hits}, status=self.status)
        return web.json_response(
            {
                "instance": self.name,
                "n": self.hits,
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "body": body.decode(),
            }
        )

    def instance(self, service: str, **kwargs: object) -> Instance:
        return Instance(service, self.name, "127.0.0.1", self.port, **kwargs)  # type: ignore[arg-type]

    def stopping(self) -> None:
        self._release.set()


@contextlib.asynccontextmanager
async def backends(*names: str, mode: Mode = "ok") -> AsyncIterator[list[Backend]]:
    started: list[Backend] = []
    try:
        for name in names:
            started.append(await Backend(name, mode).start())
        yield started
    finally:
        for backend in started:
            await backend.close()


async def register(registry: Registry, service: str, *servers: Backend, **kwargs: object) -> None:
    for server in servers:
        await registry.register(server.instance(service, **kwargs), ttl=600, keepalive=False)
