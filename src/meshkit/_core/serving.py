"""Serving an ASGI app with uvicorn inside an event loop meshkit owns: the one way every meshkit server does it
(services, the trace collector, the dashboard).

uvicorn's own signal handlers are switched off (whoever runs the loop owns SIGINT / SIGTERM, so one Ctrl-C stops
every server of a process in order), and ``interface="asgi3"`` is given because uvicorn misdetects bound methods as
ASGI 2 apps. uvicorn is imported on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from meshkit._core.optional import require
from meshkit.errors import ConfigurationError

__all__ = ["Serving", "bind", "serve_asgi", "server_class", "started"]


def bind(host: str, port: int, *, what: str = "", reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), or a clear error if the port is taken.
    ``reuse_port`` (``SO_REUSEPORT``) lets several processes listen on one port (the kernel spreads connections).
    ``listen=False``: bound only, so the port is held but connections to it are refused until a server starts
    serving on the socket (asyncio's ``create_server`` listens then). Held against plain binds and ``bind(0)``; a
    process binding it with ``SO_REUSEADDR`` and listening first would make that listen fail."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        if not hasattr(socket, "SO_REUSEPORT"):
            sock.close()
            raise ConfigurationError("reuse_port needs SO_REUSEPORT, which this platform does not have")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"{what + ' ' if what else ''}cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="another process holds the port: stop it, or choose another port",
        ) from exc
    if listen:
        sock.listen(2048)
    sock.setblocking(False)
    return sock


def server_class() -> Any:
    """``uvicorn.Server`` without its signal handling."""
    uvicorn = require("uvicorn", "service")

    class _Server(uvicorn.Server):  # type: ignore[name-defined,misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield  # the owner of the event loop handles SIGINT / SIGTERM for every server of the process

    return _Server


async def started(server: Any, task: asyncio.Task[None], name: str) -> None:
    """Wait until uvicorn accepts connections (it has no event for it: its ``started`` flag is polled)."""
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn offers no event to wait on
        await asyncio.sleep(0.01)
    if not server.started:
        task.result()  # raises what stopped it, if anything did
        raise ConfigurationError(f"the HTTP server of {name} stopped while starting")


@dataclass
class Serving:
    """A running server (:func:`serve_asgi`): ``port``, ``url``; ``await serving.aclose()`` stops it gracefully."""

    server: Any
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def aclose(self) -> None:
        """Stop accepting, finish the requests in flight, stop. Idempotent."""
        self.server.should_exit = True
        await self.task


async def serve_asgi(
    app: Any, sock: socket.socket, name: str, *, lifespan: str = "auto", graceful: float = 5.0
) -> Serving:
    """Serve ``app`` on ``sock`` in the running loop; returns once it accepts connections."""
    uvicorn = require("uvicorn", "service")
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(graceful)),
        lifespan=lifespan,
        interface="asgi3",
    )
    server = server_class()(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"meshkit-http-{name}")
    try:
        await started(server, task, name)
    except BaseException:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        raise
    host, port = sock.getsockname()[:2]
    return Serving(server, task, str(host), int(port))
