"""Serving one service over HTTP (uvicorn) in the current event loop, with a graceful stop.

Both run modes use this: monolith serves every service from one loop (a server each), a child of processes mode
serves one. The runner owns the signals (uvicorn's own handlers are switched off), so one Ctrl-C stops every
server of a process in the order that drops nothing: leave the registry, stop accepting and finish the requests
in flight, then drain the message handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from meshkit._core.optional import require
from meshkit.errors import ConfigurationError
from meshkit.runtime import RunContext, Service

__all__ = ["Served", "bind", "bring_down", "bring_up"]

log = logging.getLogger("meshkit.runner")


def _server_class() -> Any:
    uvicorn = require("uvicorn", "service")

    class _Server(uvicorn.Server):  # type: ignore[name-defined,misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield  # the runner handles SIGINT/SIGTERM for every server of the process

    return _Server


async def _started(server: Any, task: asyncio.Task[None], name: str) -> None:
    """Wait until uvicorn accepts connections (it has no event for it: its ``started`` flag is polled)."""
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn offers no event to wait on
        await asyncio.sleep(0.01)
    if not server.started:
        task.result()  # raises what stopped it, if anything did
        raise ConfigurationError(f"the HTTP server of {name!r} stopped while starting")


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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), or a clear error if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="another process holds the port: stop it, or choose another port in meshkit.toml",
        ) from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def bring_up(
    service: Service, ctx: RunContext, host: str, sock: socket.socket, *, drain_timeout: float = 30.0
) -> Served:
    """Start ``service``, serve it on ``sock``, and register it once the server accepts connections."""
    uvicorn = require("uvicorn", "service")
    await service.start(ctx)
    config = uvicorn.Config(
        service.asgi,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(drain_timeout),
        lifespan="auto",
        interface="asgi3",
    )
    server = _server_class()(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"meshkit-http-{service.name}")
    try:
        await _started(server, task, service.name)
        port = sock.getsockname()[1]
        await service.register(host, port)
    except BaseException:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        await service.stop()
        raise
    return Served(service, server, task, host, port)


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
