"""Fetching services' OpenAPI documents (aiohttp), cached for a few seconds per service."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from meshkit._core.clock import Clock
from meshkit._core.optional import require
from meshkit.dashboard._model import endpoints_from_openapi
from meshkit.errors import Unavailable

__all__ = ["OpenApiCache"]

log = logging.getLogger(__name__)

_MAX_DOCUMENT = 8 * 1024 * 1024  # bytes of one OpenAPI document


class OpenApiCache:
    """The endpoints of each service, read from the first of its OpenAPI URLs that answers, kept ``ttl`` seconds.

    Owns an aiohttp session (opened on first use); :meth:`aclose` closes it.
    """

    def __init__(self, clock: Clock, *, ttl: float = 10.0, timeout: float = 3.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self.timeout = timeout
        self._cache: dict[str, tuple[float, list[dict[str, Any]], str]] = {}
        self._session: Any = None
        self._locks: dict[str, asyncio.Lock] = {}

    async def endpoints(self, service: str, urls: Sequence[str]) -> tuple[list[dict[str, Any]], str]:
        """``(endpoints, url they came from)``; raises :class:`~meshkit.errors.Unavailable` when no URL answers
        with an OpenAPI document."""
        lock = self._locks.setdefault(service, asyncio.Lock())
        async with lock:  # one fetch per service at a time: concurrent page loads share it
            cached = self._cache.get(service)
            if cached is not None and cached[0] > self.clock.now() and cached[2] in urls:
                return cached[1], cached[2]
            if not urls:
                raise Unavailable(f"{service} has no registered instance to read its OpenAPI document from")
            problems = []
            for url in urls:
                try:
                    document = await self._fetch(url)
                except Unavailable as exc:
                    problems.append(f"{url}: {exc}")
                    continue
                endpoints = endpoints_from_openapi(document)
                self._cache[service] = (self.clock.now() + self.ttl, endpoints, url)
                return endpoints, url
            raise Unavailable(f"cannot read the OpenAPI document of {service}: {'; '.join(problems)}")

    async def _fetch(self, url: str) -> dict[str, Any]:
        aiohttp = require("aiohttp", "service")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.get(url, headers={"accept": "application/json"}) as response:
                if response.status != 200:
                    raise Unavailable(f"HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > _MAX_DOCUMENT:
                        break
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
        if len(body) > _MAX_DOCUMENT:
            raise Unavailable(f"the document is larger than {_MAX_DOCUMENT} bytes")
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise Unavailable("the answer is not JSON") from exc
        if not isinstance(document, dict) or "paths" not in document:
            raise Unavailable("the answer is not an OpenAPI document (no 'paths')")
        return document

    async def aclose(self) -> None:
        """Close the HTTP session. Idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
