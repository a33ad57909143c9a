"""Calling an ASGI app in-process (httpx is not installed), and serving one on a free port with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import uvicorn

from meshkit.testing import eventually


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


async def call(
    app: Any,
    method: str,
    path: str,
    *,
    params: dict[str, str | int | float] | None = None,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
) -> Reply:
    """One HTTP request to ``app`` through the ASGI interface, as a server would make it."""
    query = urlencode(params or {}).encode()
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers]
    if body:
        raw_headers.append((b"content-length", str(len(body)).encode()))
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": raw_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    reply = Reply(0)
    sent_body = False
    done = asyncio.Event()

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    assert reply.status, "the app sent no response"
    return reply


async def get_json(app: Any, path: str, expect: int = 200, **params: str | int | float) -> Any:
    reply = await call(app, "GET", path, params=params)
    assert reply.status == expect, (reply.status, reply.body[:500])
    return reply.json()


async def post_json(app: Any, path: str, document: Any, *, content_type: str = "application/json") -> Reply:
    return await call(app, "POST", path, body=json.dumps(document).encode(), headers=[("content-type", content_type)])


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 (lifespan on); yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started or task.done(), "uvicorn to start")
        assert not task.done(), "uvicorn stopped at once"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
