"""A real aiohttp server on a free loopback port for tests: the one way test servers here start and stop."""

from __future__ import annotations

import socket
from typing import Self

from aiohttp import web


class LocalServer:
    """Serves ``app`` on ``127.0.0.1:port`` (a free port, known after :meth:`start`). Use ``async with`` or
    :meth:`start` / :meth:`close`; :meth:`close` stops listening (new connections are refused)."""

    def __init__(self, app: web.Application) -> None:
        self.port = 0
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        self._started = False

    async def start(self) -> Self:
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._started = True
        return self

    def stopping(self) -> None:
        """Called first by :meth:`close` (release what requests may be waiting on)."""

    async def close(self) -> None:
        self.stopping()
        if self._started:
            self._started = False
            await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
