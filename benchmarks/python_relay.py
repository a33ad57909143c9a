"""The floor under any Python proxy: a uvloop byte relay, no HTTP parsing (a peer in benchmarks/gateway.py).

    .venv/bin/python benchmarks/python_relay.py LISTEN_PORT UPSTREAM_PORT

Each client connection gets one upstream connection of its own, and bytes are copied both ways as they arrive
(``data_received`` -> ``transport.write``): the least work an asyncio program can do per request and still proxy
it. It is not a proxy anyone should run (no parsing, no limits, one upstream connection per client), only the
measure of what the interpreter and the event loop cost before a gateway does anything.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any


class _Upstream(asyncio.Protocol):
    def __init__(self, client: Any) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: Any = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport subclasses
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_connection(lambda: _Upstream(self.transport), "127.0.0.1", self.upstream_port)
        self.upstream = upstream
        for data in self.pending:
            upstream.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def main(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream_port), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
