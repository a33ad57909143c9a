"""``AsgiTransport``: call the ASGI app of a service in this process, with no socket in between.

This is how the monolith run mode connects its services: the client balances, retries, times out and propagates
trace context exactly as over HTTP, and the request reaches the target service's ASGI app as an HTTP/1.1 request
would (method, raw path, query string, headers, body), in the calling task. The app's answer (``http.response.start``
and every ``http.response.body`` chunk) is collected into one :class:`~meshkit.client.Response`.

As a server would: an exception raised by the app before it started its response becomes a ``500`` (and is
logged); one raised after the response started is a lost connection (:class:`~meshkit.errors.Unavailable`). The
caller's deadline cancels the app, as a client hanging up cancels a handler on a real server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import unquote

from meshkit.client.base import Headers, Request, Response
from meshkit.discovery import Instance
from meshkit.errors import ConfigurationError, Unavailable

__all__ = ["ASGIApp", "AsgiTransport", "Message", "Receive", "Scope", "Send"]

log = logging.getLogger("meshkit.client")

# The ASGI 3 types, spelled out here so the client does not depend on starlette for them.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_INTERNAL_ERROR = b"Internal Server Error"


class _Exchange:
    """One request/response exchange with an app: feeds ``receive``, collects ``send``."""

    __slots__ = ("body", "chunks", "done", "headers", "sent_body", "started", "status")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent_body = False
        self.started = False
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.done = asyncio.Event()

    async def receive(self) -> Message:
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        # The request is complete: a further receive waits for the "connection" to end, as on a real server
        # (apps that watch for a client disconnect while streaming rely on this).
        await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("the ASGI app sent http.response.start twice")
            self.started = True
            self.status = int(message["status"])
            self.headers = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in message["headers"]]
        elif kind == "http.response.body":
            if not self.started:
                raise RuntimeError("the ASGI app sent http.response.body before http.response.start")
            if self.done.is_set():
                return  # after the end of the response: a server ignores it as well
            self.chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                self.done.set()
        # other messages (http.response.trailers, extensions) are not part of what the client returns


class AsgiTransport:
    """Sends each request to ``apps[instance.service]``, in process. ``apps`` maps service names to ASGI apps."""

    def __init__(self, apps: Mapping[str, ASGIApp], *, client: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.apps = dict(apps)
        self.client = client

    def _scope(self, instance: Instance, request: Request) -> Scope:
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.raw()]
        names = {k for k, _ in headers}
        if b"host" not in names:
            headers.insert(0, (b"host", instance.address.encode("latin-1")))
        if request.content and b"content-length" not in names:
            headers.append((b"content-length", str(len(request.content)).encode("latin-1")))
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": unquote(request.path),
            "raw_path": request.path.encode("latin-1"),
            "query_string": request.query.encode("latin-1"),
            "root_path": "",
            "headers": headers,
            "client": self.client,
            "server": (instance.host, instance.port),
            "extensions": {},
        }

    async def send(self, instance: Instance, request: Request, timeout: float | None) -> Response:
        app = self.apps.get(instance.service)
        if app is None:
            raise ConfigurationError(
                f"no ASGI app for service {instance.service!r} in this process",
                hint=f"in-process services: {', '.join(sorted(self.apps)) or 'none'}",
            )
        exchange = _Exchange(request.content)
        try:
            await app(self._scope(instance, request), exchange.receive, exchange.send)
        except Exception as exc:
            if exchange.started:
                raise Unavailable(
                    f"{instance.service}'s app failed in the middle of its response to "
                    f"{request.method} {request.path}: {type(exc).__name__}: {exc}"
                ) from exc
            log.exception(
                "%s's app failed on %s %s",
                instance.service,
                request.method,
                request.path,
                extra={"service": instance.service, "instance": instance.id, "method": request.method},
            )
            return _server_error(instance, request)
        finally:
            exchange.done.set()  # wake a receive() still waiting for the disconnect
        if not exchange.started:
            log.error(
                "%s's app returned without a response to %s %s",
                instance.service,
                request.method,
                request.path,
                extra={"service": instance.service, "instance": instance.id, "method": request.method},
            )
            return _server_error(instance, request)
        return Response(exchange.status, Headers(exchange.headers), b"".join(exchange.chunks), instance, request)

    async def aclose(self) -> None:
        """Nothing to release: the apps belong to their services."""

    def __repr__(self) -> str:
        return f"AsgiTransport({sorted(self.apps)})"


def _server_error(instance: Instance, request: Request) -> Response:
    headers = Headers([("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(_INTERNAL_ERROR)))])
    return Response(500, headers, _INTERNAL_ERROR, instance, request)
