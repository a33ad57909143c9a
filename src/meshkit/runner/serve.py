"""Serving one service over HTTP (uvicorn) in the current event loop, with a graceful stop.

Both run modes use this: monolith serves every service from one loop (a server each), a child of processes mode
serves one. The runner owns the signals (uvicorn's own handlers are switched off), so one Ctrl-C stops every
server of a process in the order that drops nothing: leave the registry, stop accepting and finish the requests
in flight, then drain the message handlers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from meshkit._core.serving import bind, serve_asgi
from meshkit.runtime import RunContext, Service

__all__ = ["Served", "bind", "bring_down", "bring_up"]

log = logging.getLogger("meshkit.runner")


@dataclass
class Served:
    service: Service
    server: object  # uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


async def bring_up(
    service: Service, ctx: RunContext, host: str, sock: socket.socket, *, drain_timeout: float = 30.0
) -> Served:
    """Start ``service``, serve it on ``sock``, and register it once the server accepts connections."""
    await service.start(ctx)
    try:
        serving = await serve_asgi(service.asgi, sock, repr(service.name), graceful=drain_timeout)
    except BaseException:
        await service.stop()
        raise
    try:
        await service.register(host, serving.port)
    except BaseException:
        await serving.aclose()
        await service.stop()
        raise
    return Served(service, serving.server, serving.task, host, serving.port)


async def bring_down(served: list[Served], *, grace: float = 1.0) -> None:
    """Stop services gracefully: every one leaves the registry first; ``grace`` seconds later (time for the
    callers' registry watches to take it out of rotation, as a Kubernetes preStop pause does) the servers stop
    accepting and finish the requests in flight; then the services drain their handlers and close."""
    for s in served:
        try:
            await s.service.deregister()
        except Exception:
            log.exception("could not deregister", extra={"service": s.service.name})
    if served and grace > 0:
        await asyncio.sleep(grace)
    for s in served:
        s.server.should_exit = True  # type: ignore[attr-defined]
    for s in served:
        try:
            await s.task
        except Exception:
            log.exception("the HTTP server failed while stopping", extra={"service": s.service.name})
    for s in reversed(served):
        await s.service.stop()
