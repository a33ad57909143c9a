"""``HttpTransport``: requests over HTTP/1.1 with one pooled aiohttp session.

aiohttp (``pip install 'meshkit[service]'``) rather than httpx on this path: under many concurrent calls httpx's
connection pool spends far more time per request than aiohttp's (benchmarks/discovery.py measures the client
side). The session is created on the first request, inside the running loop, and keeps connections alive
between calls; :meth:`HttpTransport.aclose` closes it.

aiohttp's errors are mapped here, and only here: a connection that cannot be opened is
:class:`~meshkit.errors.Unavailable` with ``request_sent = False`` (any call may be retried elsewhere); a
connection lost during the exchange is ``Unavailable`` (only idempotent calls are retried); a connect timeout is
:class:`~meshkit.errors.TimeoutExceeded`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from meshkit._core.optional import require
from meshkit.client.base import Headers, Request, Response
from meshkit.discovery import Instance
from meshkit.errors import ConfigurationError, TimeoutExceeded, Unavailable

if TYPE_CHECKING:
    import aiohttp

__all__ = ["HttpTransport"]

log = logging.getLogger("meshkit.client")


class HttpTransport:
    """Sends requests to ``{scheme}://{instance.address}{path}`` over a pool of kept-alive connections.

    - ``limit``: the most connections open at once, over every instance (aiohttp queues requests beyond it).
    - ``limit_per_host``: the most to one instance (0: only ``limit`` applies).
    - ``keepalive``: seconds an idle connection stays open for reuse.
    - ``connect_timeout``: seconds to open a connection when the call has no timeout of its own.
    """

    def __init__(
        self,
        *,
        limit: int = 256,
        limit_per_host: int = 0,
        keepalive: float = 30.0,
        connect_timeout: float = 10.0,
        scheme: str = "http",
    ) -> None:
        if limit < 1 or limit_per_host < 0:
            raise ConfigurationError("limit must be >= 1 and limit_per_host >= 0")
        if scheme not in ("http", "https"):
            raise ConfigurationError(f"scheme must be http or https, not {scheme!r}")
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.scheme = scheme
        self._aiohttp: Any = None
        self._yarl: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ConfigurationError("this HttpTransport is closed")
        lib = self._aiohttp = require("aiohttp", "service")
        self._yarl = require("yarl", "service")  # aiohttp's URL type: given pre-encoded, it is not parsed again
        connector = lib.TCPConnector(
            limit=self.limit, limit_per_host=self.limit_per_host, keepalive_timeout=self.keepalive
        )
        session: aiohttp.ClientSession = lib.ClientSession(
            connector=connector,
            timeout=lib.ClientTimeout(total=None, sock_connect=self.connect_timeout),
            auto_decompress=True,
            raise_for_status=False,
        )
        self._session = session
        return session

    def _timeout(self, seconds: float | None) -> aiohttp.ClientTimeout:
        """aiohttp's timeout for an attempt of ``seconds``: only connecting is bounded here (the client cancels
        the whole attempt at its deadline); cached, as a call's budget takes few distinct values."""
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            if len(self._timeouts) > 64:
                self._timeouts.clear()
            connect = self.connect_timeout if seconds is None else min(seconds, self.connect_timeout)
            timeout = self._timeouts[seconds] = self._aiohttp.ClientTimeout(total=None, sock_connect=connect)
        return timeout

    async def send(self, instance: Instance, request: Request, timeout: float | None) -> Response:
        session = self._session or self._open()
        aiohttp = self._aiohttp
        url = self._yarl.URL(f"{self.scheme}://{instance.address}{request.target}", encoded=True)
        try:
            async with session.request(
                request.method,
                url,
                headers=request.headers.raw(),
                data=request.content or None,
                allow_redirects=False,
                timeout=self._timeout(timeout),
            ) as answer:
                content = await answer.read()
                return Response(answer.status, Headers(answer.headers.items()), content, instance, request)
        except aiohttp.ClientConnectorError as exc:
            unreachable = Unavailable(
                f"cannot connect to {instance.service} at {instance.address} (instance {instance.id}): "
                f"{exc.os_error.strerror or exc.os_error}",
                hint="is the instance running? it stays in the registry until its lease expires or a health check "
                "marks it",
            )
            unreachable.request_sent = False  # no connection, so nothing was sent: safe to retry any call
            raise unreachable from exc
        except aiohttp.ServerTimeoutError as exc:  # a connect timeout (reads are bounded by the client)
            slow = TimeoutExceeded(
                f"connecting to {instance.service} at {instance.address} (instance {instance.id}) timed out",
                timeout=timeout,
            )
            slow.request_sent = False
            raise slow from exc
        except aiohttp.ClientError as exc:
            raise Unavailable(
                f"{request.method} {request.path} to {instance.service} at {instance.address} "
                f"(instance {instance.id}) failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def aclose(self) -> None:
        """Close the pooled connections. Later requests raise :class:`~meshkit.errors.ConfigurationError`."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def __repr__(self) -> str:
        return f"HttpTransport(limit={self.limit}, scheme={self.scheme!r})"
