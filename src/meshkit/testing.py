"""Helpers for testing code built on meshkit.

- :class:`FakeClock`: time that moves only when a test says so.
- :func:`eventually`: wait for a condition with a generous deadline (never a fixed sleep).
- :class:`FlakyHTTPServer`: a real local HTTP server that fails on a schedule, to see resilience policies act on
  real connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from meshkit._core.clock import FakeClock

__all__ = ["FakeClock", "FlakyHTTPServer", "eventually", "fails_first_and_every"]

log = logging.getLogger("meshkit.testing")

#: Generous: the machines tests run on are shared and noisy.
DEADLINE = 60.0


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = DEADLINE, *, every: float = 0.005
) -> None:
    """Wait until ``condition()`` holds, checking every ``every`` seconds; fail naming ``what`` after ``timeout``.

    ``condition`` may be a coroutine function (e.g. one that asks a broker), awaited on each check.
    """
    end = time.monotonic() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)


def fails_first_and_every(first: int = 2, every: int = 5) -> Callable[[int], bool]:
    """A schedule: request ``n`` (1-based) fails if ``n <= first`` or ``n`` is a multiple of ``every``."""

    def fails(n: int) -> bool:
        return n <= first or (every > 0 and n % every == 0)

    return fails


class FlakyHTTPServer:
    """A threaded HTTP server on ``127.0.0.1`` (a free port) that answers ``GET`` with JSON ``{"n": N}``, or with
    ``status`` (503 by default, with ``Retry-After`` when ``retry_after`` is set) when ``fails(N)`` is true.

    Use it as a context manager; ``url`` is its address, ``requests`` how many it answered and ``failures`` which
    request numbers failed.
    """

    def __init__(
        self,
        fails: Callable[[int], bool] | None = None,
        *,
        status: int = 503,
        retry_after: float | None = None,
    ) -> None:
        self.fails = fails or fails_first_and_every()
        self.status = status
        self.retry_after = retry_after
        self.requests = 0
        self.failures: list[int] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not started; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def _next(self) -> tuple[int, bool]:
        with self._lock:
            self.requests += 1
            n = self.requests
            failed = self.fails(n)
            if failed:
                self.failures.append(n)
            return n, failed

    def start(self) -> FlakyHTTPServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with owner._lock:
                    owner._connections.add(self.connection)

            def finish(self) -> None:
                with owner._lock:
                    owner._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                n, failed = owner._next()
                status = owner.status if failed else 200
                body = json.dumps({"n": n, "ok": not failed}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if failed and owner.retry_after is not None:
                    self.send_header("Retry-After", f"{owner.retry_after:g}")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("flaky server: " + format, *args)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = False  # server_close() joins the handler threads
        self._thread = threading.Thread(target=self._server.serve_forever, name="meshkit-flaky-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, end open keep-alive connections, and join every thread the server started."""
        if self._server is not None:
            self._server.shutdown()
            with self._lock:
                open_connections = list(self._connections)
            for connection in open_connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FlakyHTTPServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
