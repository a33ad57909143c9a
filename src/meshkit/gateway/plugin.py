"""The one plugin interface of the gateway, and the request / response objects plugins see.

A plugin is a small object with up to five hooks; the gateway calls the ones a plugin overrides, in the order the
plugins are configured (global plugins first, then the route's)::

    class AddTenant(Plugin):
        name = "add_tenant"

        def request(self, req: ProxyRequest) -> Reply | None:
            tenant = req.headers.get("x-tenant")
            if tenant is None:
                return Reply.error(400, "the X-Tenant header is required")
            req.headers.set("x-tenant", tenant.lower())
            return None                              # go on: next plugin, then the upstream

- :meth:`Plugin.request` runs on the parsed request head, before anything is sent upstream. It may change the
  request (headers, path, query) and may answer it itself by returning a :class:`Reply` (401, 429, a cached
  response): then no later plugin's ``request`` runs and nothing reaches the upstream. It returns either the result
  or an awaitable of it; return an awaitable only when there is I/O to wait for (a JWKS fetch, a Redis round trip):
  plugins that answer synchronously keep the request on the gateway's fast path, with no task created for it.
- :meth:`Plugin.response` runs on the upstream's response head (status and headers), before it is sent on. It
  may change the headers (CORS, ``RateLimit-*``). Responses travel back through the plugins in reverse order
  (the last configured sees the response first, as with ASGI middleware), and an answer a plugin gives itself
  (a cache hit, a 429) is seen only by the plugins configured before it.
- :meth:`Plugin.request_body` / :meth:`Plugin.response_body` receive and return a whole body. A route with a
  plugin that overrides either buffers that body (up to its size limit) instead of streaming it: use them for
  JSON field mapping and caching, not for anything that can work on headers alone.
- :meth:`Plugin.done` runs once per request after the last byte of the answer was written (or the client went
  away), with the status sent (0 when none was) and the seconds the gateway spent: access logs and metrics.

Hooks run on the event loop: they must not block. Errors a hook raises become a 500 for that request (logged with
the plugin's name); they never reach the client as a traceback.

A plugin is configured in the gateway's YAML by its ``name`` and options (``- jwt: {issuer: ...}``); the class's
``Options`` pydantic model validates them, and the class is built as ``cls(options, context)``. Built-in plugins
are known by name; others by ``module:Class`` (``- myapp.plugins:AddTenant: {}``).
"""

from __future__ import annotations

import json as _json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = [
    "REASONS",
    "Headers",
    "Plugin",
    "PluginContext",
    "ProxyRequest",
    "Reply",
    "RequestResult",
    "ResponseHead",
    "header_pairs",
]

REASONS: dict[int, str] = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    412: "Precondition Failed",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class Headers:
    """An ordered, mutable list of HTTP header fields with case-insensitive names (stored lower-case).

    Values are ``str`` (ISO-8859-1 decoded, as HTTP/1.1 defines header bytes). Repeated fields stay separate.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(k.lower(), v) for k, v in items]

    @classmethod
    def _trusted(cls, items: list[tuple[str, str]]) -> Headers:
        """Wrap a list whose names are lower-case already (the parser's), without copying it."""
        headers = cls.__new__(cls)
        headers._items = items
        return headers

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (``default`` when absent)."""
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = name.lower()
        return any(key == name for key, _ in self._items)

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` field by one with ``value``."""
        name = name.lower()
        self._items = [(k, v) for k, v in self._items if k != name]
        self._items.append((name, value))

    def add(self, name: str, value: str) -> None:
        self._items.append((name.lower(), value))

    def remove(self, name: str) -> None:
        """Remove every ``name`` field (no error when there is none)."""
        name = name.lower()
        if any(k == name for k, _ in self._items):
            self._items = [(k, v) for k, v in self._items if k != name]

    def items(self) -> list[tuple[str, str]]:
        """The fields in order, as ``(lower-case name, value)``; the list is the live one, do not change it."""
        return self._items

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(slots=True, eq=False)
class ProxyRequest:
    """One request as the gateway forwards it. Plugins may change ``path``, ``query`` and ``headers``.

    - ``method``: upper-case. ``path``: the normalised, percent-decoded path the route matched (dot segments
      resolved, ``//`` collapsed); what the upstream receives after the route's rewrite. ``query``: the raw query
      string, without ``?``.
    - ``client``: the client's IP address: the socket peer, or, when the peer is a trusted proxy, the address it
      reports in ``X-Forwarded-For`` (see the gateway's ``trusted_proxies``). ``peer``: the socket peer.
    - ``route``: the name of the matched route; ``params``: the values of its path template (``{id}``).
    - ``consumer``: who is calling, set by an auth plugin (the JWT ``sub``, the API key's name); ``claims``: the
      verified claims of a token. Rate limits and logs use them.
    - ``state``: free space for plugins to pass things along (to their own ``response`` / ``done``).
    """

    method: str
    path: str
    query: str
    headers: Headers
    client: str
    peer: str = ""
    scheme: str = "http"
    http_version: str = "1.1"
    route: str = ""
    params: dict[str, str] = field(default_factory=dict)
    consumer: str | None = None
    claims: dict[str, Any] | None = None
    started: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass(slots=True, eq=False)
class ResponseHead:
    """The status and headers of an upstream's (or a plugin's) response, as they are about to be sent on."""

    status: int
    headers: Headers


@dataclass(slots=True, eq=False)
class Reply:
    """A response the gateway itself sends (a plugin's 401 / 429, a cached entry, an aggregation)."""

    status: int
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    @classmethod
    def json(cls, status: int, data: Any, headers: Iterable[tuple[str, str]] = ()) -> Reply:
        body = _json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        out = Headers(headers)
        if "content-type" not in out:
            out.add("content-type", "application/json")
        return cls(status, out, body)

    @classmethod
    def error(cls, status: int, message: str, headers: Iterable[tuple[str, str]] = (), **extra: Any) -> Reply:
        """The gateway's error body: ``{"error": <reason phrase>, "status": N, "message": ...}`` (+ ``extra``)."""
        return cls.json(
            status, {"error": REASONS.get(status, "Error"), "status": status, "message": message, **extra}, headers
        )


RequestResult = Reply | None | Awaitable[Reply | None]


@dataclass(slots=True)
class PluginContext:
    """What the gateway gives a plugin when it builds it.

    ``redis_url``: the gateway's shared-state Redis (``None``: in-process state). ``clock``: seconds, monotonic
    (tests pass a fake). ``route``: the route the plugin is configured on (``None``: a global plugin). ``folder``:
    the folder of the config file (relative paths in options are resolved against it).
    """

    clock: Callable[[], float]
    redis_url: str | None = None
    route: str | None = None
    folder: str = "."
    resources: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Call ``closer`` when the gateway closes or reloads away from this plugin (close a Redis pool here)."""
        self.resources.append(closer)


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Plugin:
    """Base class of gateway plugins: override the hooks you need (see the module docstring)."""

    #: the name the gateway's YAML configures it by
    name: ClassVar[str] = ""
    #: the pydantic model of its options (validated at load, errors name the key and line)
    Options: ClassVar[type[BaseModel]] = _NoOptions

    def __init__(self, options: Any = None, context: PluginContext | None = None) -> None:
        """Built once per config load with the validated ``options`` (an ``Options`` instance)."""

    def request(self, req: ProxyRequest) -> RequestResult:
        return None

    def response(self, req: ProxyRequest, resp: ResponseHead) -> None:
        return None

    def request_body(self, req: ProxyRequest, body: bytes) -> bytes:
        return body

    def response_body(self, req: ProxyRequest, resp: ResponseHead, body: bytes) -> bytes:
        return body

    def done(self, req: ProxyRequest, status: int, elapsed: float) -> None:
        return None

    # which hooks a subclass overrides: the gateway skips the others entirely
    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(Plugin, hook)

    def uses(self, hook: str) -> bool:
        """Whether the gateway should call ``hook`` on this instance (default: the class overrides it). A plugin
        whose options leave a body hook with nothing to do returns False for it, so its route does not buffer."""
        return self.overrides(hook)


def header_pairs(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(name, value)`` pairs from a mapping or an iterable of pairs."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), str(v)) for k, v in items]
