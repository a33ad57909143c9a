"""Who may call, from where, and how much they may send: the ``ip_filter``, ``cors`` and ``request_size`` plugins.

::

    plugins:
      - ip_filter: {allow: [10.0.0.0/8, "2001:db8::/32"], deny: [10.6.6.0/24]}
      - cors: {allow_origins: ["https://shop.example"], allow_methods: [GET, POST], allow_headers: [content-type]}
      - request_size: {max_body: 1MiB}

- ``ip_filter`` answers ``403`` to clients whose address (``req.client``: the socket peer, or what trusted proxies
  report, see :mod:`meshkit.gateway.forwarded`) is in ``deny``, or, when there is an ``allow`` list, not in it.
  ``deny`` wins. An address that cannot be read as an IP address is refused.
- ``cors`` implements the server side of the Fetch standard's CORS protocol: it answers preflight requests itself
  (``204`` with the ``Access-Control-*`` headers, or ``403`` for an origin, method or header it does not allow;
  a preflight never reaches the upstream) and adds ``Access-Control-Allow-Origin`` and friends to the responses of
  allowed origins. It owns those headers on its routes: an upstream's ``Access-Control-Allow-*`` /
  ``-Expose-Headers`` are dropped. Put it before authentication plugins: preflights carry no credentials.
- ``request_size`` answers ``413`` to a request whose ``Content-Length`` is over ``max_body`` before any of its
  body is read; the server reads the plugin's ``max_body`` attribute to cut chunked bodies at the same size.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshkit.gateway.config import parse_size
from meshkit.gateway.forwarded import NetworkSet, parse_network
from meshkit.gateway.plugin import Headers, Plugin, PluginContext, ProxyRequest, Reply, RequestResult, ResponseHead

__all__ = [
    "Cors",
    "CorsOptions",
    "IpFilter",
    "IpFilterOptions",
    "RequestSize",
    "RequestSizeOptions",
]

_VERDICT_CACHE = 10_000  # client address / origin -> verdict, bounded (the oldest entry goes first)

_CACHED_ORIGIN = 256  # longer Origin values are checked every time, not remembered
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP method or header name


def _remember(cache: dict[str, bool], key: str, verdict: bool) -> None:
    if len(cache) >= _VERDICT_CACHE:
        del cache[next(iter(cache))]
    cache[key] = verdict


# -- ip_filter ---------------------------------------------------------------------------------------------------------


class IpFilterOptions(BaseModel):
    """``allow`` / ``deny``: CIDRs or addresses, IPv4 or IPv6. At least one of them."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)

    @field_validator("allow", "deny")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        return [str(parse_network(entry)) for entry in entries]

    @model_validator(mode="after")
    def _something(self) -> IpFilterOptions:
        if not self.allow and not self.deny:
            raise ValueError("ip_filter needs an allow or a deny list")
        return self


class IpFilter(Plugin):
    """Refuse (403) clients by address: ``deny`` wins; with an ``allow`` list, everything else is denied."""

    name: ClassVar[str] = "ip_filter"
    Options: ClassVar[type[BaseModel]] = IpFilterOptions

    def __init__(self, options: IpFilterOptions | Mapping[str, Any], context: PluginContext | None = None) -> None:
        opts = options if isinstance(options, IpFilterOptions) else IpFilterOptions.model_validate(options)
        self.options = opts
        self._allow = NetworkSet(parse_network(entry) for entry in opts.allow)
        self._deny = NetworkSet(parse_network(entry) for entry in opts.deny)
        self._has_allow = bool(opts.allow)
        self._verdicts: dict[str, bool] = {}

    def allows(self, client: str) -> bool:
        """Whether ``client`` (an address as text) may call."""
        verdict = self._verdicts.get(client)
        if verdict is None:
            try:
                address = ipaddress.ip_address(client)
            except ValueError:
                verdict = False  # what cannot be read cannot be vouched for
            else:
                verdict = address not in self._deny and (not self._has_allow or address in self._allow)
            _remember(self._verdicts, client, verdict)
        return verdict

    def request(self, req: ProxyRequest) -> RequestResult:
        if self.allows(req.client):
            return None
        return Reply.error(403, "your address is not allowed")


# -- cors --------------------------------------------------------------------------------------------------------------

#: methods a browser sends without asking, so a preflight for them always succeeds (Fetch: CORS-safelisted method)
_SAFELISTED_METHODS = frozenset({"GET", "HEAD", "POST"})
_OWNED = frozenset({"access-control-allow-origin", "access-control-allow-credentials", "access-control-expose-headers"})
_PREFLIGHT_STATE = "cors.preflight"
_ORIGIN_STATE = "cors.origin"
_PREFLIGHT_VARY = "Access-Control-Request-Method, Access-Control-Request-Headers"


def _origin(text: str) -> str:
    """``text`` as a serialized origin (``scheme://host[:port]``, lower-case), or ``ValueError`` saying why not."""
    if text == "null":
        return text
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r} has a bad port") from exc
    if not parts.scheme or not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValueError(f"{text!r} is not an origin: write scheme://host[:port], such as https://app.example")
    if parts.path or parts.query or parts.fragment or text.endswith(("?", "#")):
        bare = f"{parts.scheme}://{parts.netloc}"
        raise ValueError(f"{text!r} is not an origin (an origin has no path): did you mean {bare!r}?")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None else "")


def _tokens(values: list[str], what: str, *, upper: bool = False) -> list[str]:
    out: list[str] = []
    for value in values:
        if value != "*" and not _TOKEN.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid {what}")
        normal = value.upper() if upper else value.lower()
        if normal not in out:
            out.append(normal)
    return out


class CorsOptions(BaseModel):
    """The ``cors`` plugin's options.

    - ``allow_origins``: exact origins (``https://app.example``, ``http://localhost:3000``, ``null``) or ``"*"``
      (any origin; not with ``allow_credentials``). ``allow_origin_regex``: regular expressions an origin must
      match whole (``https://[a-z0-9-]+\\.example\\.com``).
    - ``allow_methods`` (``[GET, HEAD, POST]``), ``allow_headers`` (``[]``), ``expose_headers`` (``[]``): lists;
      ``"*"`` in ``allow_methods`` / ``allow_headers`` allows whatever a preflight asks for (echoed back, so it
      works with credentials and for ``Authorization`` too).
    - ``allow_credentials`` (false): let the browser send cookies / HTTP auth and read the response.
    - ``max_age`` (600): seconds a browser may cache a preflight's answer; ``null`` leaves the header out.
    """

    model_config = ConfigDict(extra="forbid")

    allow_origins: list[str] = Field(default_factory=list)
    allow_origin_regex: list[str] = Field(default_factory=list)
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD", "POST"])
    allow_headers: list[str] = Field(default_factory=list)
    expose_headers: list[str] = Field(default_factory=list)
    allow_credentials: bool = False
    max_age: int | None = Field(default=600, ge=0)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        return list(dict.fromkeys(value if value == "*" else _origin(value) for value in values))

    @field_validator("allow_origin_regex")
    @classmethod
    def _regexes(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regular expression {value!r}: {exc}") from exc
        return values

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, values: list[str]) -> list[str]:
        return _tokens(values, "method", upper=True)

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _headers(cls, values: list[str]) -> list[str]:
        return _tokens(values, "header name")

    @model_validator(mode="after")
    def _consistent(self) -> CorsOptions:
        if not self.allow_origins and not self.allow_origin_regex:
            raise ValueError("cors needs allow_origins or allow_origin_regex")
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError(
                'allow_origins "*" cannot be used with allow_credentials (browsers refuse it): list the origins'
            )
        if self.allow_credentials and "*" in self.expose_headers:
            raise ValueError('expose_headers "*" is not honoured with allow_credentials: list the headers')
        return self


class Cors(Plugin):
    """Cross-origin resource sharing, the server side (see the module docstring and :class:`CorsOptions`)."""

    name: ClassVar[str] = "cors"
    Options: ClassVar[type[BaseModel]] = CorsOptions

    def __init__(self, options: CorsOptions | Mapping[str, Any], context: PluginContext | None = None) -> None:
        opts = options if isinstance(options, CorsOptions) else CorsOptions.model_validate(options)
        self.options = opts
        self._any_origin = "*" in opts.allow_origins
        self._origins = frozenset(o for o in opts.allow_origins if o != "*")
        self._regexes = [re.compile(r) for r in opts.allow_origin_regex]
        self._verdicts: dict[str, bool] = {}
        # "*" for every origin: the answer does not depend on Origin, so it is sent on every response, without Vary
        # (the Fetch standard's advice for HTTP caches); otherwise every response says Vary: Origin
        self._wildcard = self._any_origin and not opts.allow_credentials
        self._credentials = opts.allow_credentials
        self._any_method = "*" in opts.allow_methods
        self._methods = frozenset(opts.allow_methods)
        self._methods_text = ", ".join(m for m in opts.allow_methods if m != "*")
        self._any_header = "*" in opts.allow_headers
        self._headers = frozenset(opts.allow_headers)
        self._headers_text = ", ".join(h for h in opts.allow_headers if h != "*")
        self._expose_text = ", ".join(opts.expose_headers)
        self._max_age = None if opts.max_age is None else str(opts.max_age)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a request from ``origin`` (the ``Origin`` header's value) may read responses."""
        if self._any_origin or origin in self._origins:
            return True
        if not self._regexes:
            return False
        verdict = self._verdicts.get(origin)
        if verdict is None:
            verdict = any(regex.fullmatch(origin) for regex in self._regexes)
            if len(origin) <= _CACHED_ORIGIN:  # the Origin header is the client's: no huge cache entries
                _remember(self._verdicts, origin, verdict)
        return verdict

    def request(self, req: ProxyRequest) -> RequestResult:
        origin = req.headers.get("origin")
        if origin is None:
            return None
        if req.method == "OPTIONS":
            method = req.headers.get("access-control-request-method")
            if method is not None:
                return self._preflight(req, origin, method)
        if not self._wildcard and self.origin_allowed(origin):
            req.state[_ORIGIN_STATE] = origin
        return None

    def _refuse(self, message: str) -> Reply:
        vary = _PREFLIGHT_VARY if self._wildcard else f"Origin, {_PREFLIGHT_VARY}"
        return Reply.error(403, message, [("vary", vary)])

    def _preflight(self, req: ProxyRequest, origin: str, method: str) -> Reply:
        req.state[_PREFLIGHT_STATE] = True
        if not self.origin_allowed(origin):
            return self._refuse(f"CORS: origin {origin!r} is not allowed")
        method = method.strip().upper()
        if not (self._any_method or method in self._methods or method in _SAFELISTED_METHODS):
            return self._refuse(f"CORS: method {method!r} is not allowed")
        names = [
            name
            for value in req.headers.get_all("access-control-request-headers")
            for name in (item.strip().lower() for item in value.split(","))
            if name
        ]
        if not self._any_header:
            refused = [name for name in names if name not in self._headers]
            if refused:
                return self._refuse(f"CORS: header{'s' if len(refused) > 1 else ''} {', '.join(refused)} not allowed")
        headers = Headers()
        if self._wildcard:
            headers.add("access-control-allow-origin", "*")
            headers.add("vary", _PREFLIGHT_VARY)
        else:
            headers.add("access-control-allow-origin", origin)
            headers.add("vary", f"Origin, {_PREFLIGHT_VARY}")
        if self._credentials:
            headers.add("access-control-allow-credentials", "true")
        headers.add("access-control-allow-methods", method if self._any_method else self._methods_text)
        if names:
            headers.add("access-control-allow-headers", ", ".join(names) if self._any_header else self._headers_text)
        if self._max_age is not None:
            headers.add("access-control-max-age", self._max_age)
        return Reply(204, headers)

    def response(self, req: ProxyRequest, resp: ResponseHead) -> None:
        state = req.state
        if _PREFLIGHT_STATE in state:  # our own preflight answer: complete as it is
            return
        headers = resp.headers
        if any(name in _OWNED for name, _ in headers.items()):  # an upstream's CORS headers: ours replace them
            for name in _OWNED:
                headers.remove(name)
        if self._wildcard:
            headers.add("access-control-allow-origin", "*")
            if self._expose_text:
                headers.add("access-control-expose-headers", self._expose_text)
            return
        headers.add("vary", "Origin")
        origin = state.get(_ORIGIN_STATE)
        if origin is None:
            return
        headers.add("access-control-allow-origin", origin)
        if self._credentials:
            headers.add("access-control-allow-credentials", "true")
        if self._expose_text:
            headers.add("access-control-expose-headers", self._expose_text)


# -- request_size ------------------------------------------------------------------------------------------------------


class RequestSizeOptions(BaseModel):
    """``max_body``: the largest request body, in bytes or as ``"1MB"`` / ``"512KiB"``."""

    model_config = ConfigDict(extra="forbid")

    max_body: int = Field(ge=0)

    @field_validator("max_body", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)


class RequestSize(Plugin):
    """Refuse (413) a request whose declared ``Content-Length`` is over ``max_body``, before reading its body.

    ``max_body`` (an attribute) is what the server also enforces on bodies without a length (chunked).
    """

    name: ClassVar[str] = "request_size"
    Options: ClassVar[type[BaseModel]] = RequestSizeOptions

    def __init__(self, options: RequestSizeOptions | Mapping[str, Any], context: PluginContext | None = None) -> None:
        opts = options if isinstance(options, RequestSizeOptions) else RequestSizeOptions.model_validate(options)
        self.options = opts
        self.max_body: int = opts.max_body
        self._digits = len(str(opts.max_body))
        self._message = f"the request body is larger than the limit of {opts.max_body} bytes"

    def request(self, req: ProxyRequest) -> RequestResult:
        length = req.headers.get("content-length")
        if length is None:
            return None
        digits = length.strip()
        if not (digits.isascii() and digits.isdigit()):
            return None  # not a length: the server refuses it (400) on its own
        digits = digits.lstrip("0") or "0"
        # the length check first: int() of a huge string is slow (and refused past 4300 digits)
        if len(digits) > self._digits or int(digits) > self.max_body:
            return Reply.error(413, self._message)
        return None
