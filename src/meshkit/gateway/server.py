"""The gateway's forwarding engine: an asyncio protocol-level HTTP/1.1 proxy (httptools parsers, pooled keep-alive
upstream connections, streamed bodies).

Why not an ASGI app in front of an HTTP client: that path parses every request twice into Python objects, creates
a task per request and buffers bodies, and measured at a sixth of nginx's throughput on this project's benchmark
machine. Here a request is a few callbacks on the client's connection and a few on an upstream connection taken
from a pool; no task is created unless a plugin has real I/O to wait for (a JWKS fetch, a Redis round trip) or the
route is served by Python code (BFF aggregation, the admin API).

What the engine guarantees (the hardening tests hold it to it):

- framing is the gateway's own: requests with both ``Content-Length`` and ``Transfer-Encoding``, duplicate
  lengths, a ``Transfer-Encoding`` other than ``chunked``, bad chunk sizes, obs-fold, missing or repeated
  ``Host`` are refused (400/501) and the connection is closed; the upstream receives a request it frames itself;
- the path the upstream receives is the normalised one the routes matched;
- header bytes are bounded (431), bodies by the route's ``max_body`` (413), slow clients by a header timeout;
- hop-by-hop headers are dropped both ways; ``X-Forwarded-For`` trusts only configured proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import inspect
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import httptools

from meshkit.errors import CircuitOpen, Unavailable
from meshkit.gateway._http import HOP_BY_HOP, BadRequest, normalise_path, quote_path
from meshkit.gateway.plugin import REASONS, Headers, Plugin, ProxyRequest, Reply, ResponseHead
from meshkit.gateway.router import Match, PathMatcher, Router

if TYPE_CHECKING:
    from meshkit.client import ServiceClient
    from meshkit.discovery import Instance
    from meshkit.gateway.forwarded import TrustedProxies
    from meshkit.resilience import CircuitBreaker

__all__ = ["Limits", "Route", "Server", "Upstream"]

log = logging.getLogger(__name__)

Handler = Callable[[ProxyRequest, bytes], Awaitable[Reply]]
_ALL = 1 << 30  # "every plugin" as a position bound
_RESPONSE_SKIP = frozenset(h.encode() for h in HOP_BY_HOP)
_STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in REASONS.items()}
_NO_HEADERS = Headers()
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "expect", "upgrade"})
_NO_UPGRADE, _WEBSOCKET, _IGNORED_UPGRADE = range(3)  # what a client connection does with an upgrade request
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
# request headers the gateway sets itself (or drops) when it forwards
_NOT_FORWARDED = HOP_BY_HOP | {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "traceparent"}
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HOST = re.compile(r"[A-Za-z0-9.\-_~!$&'()*+,;=%]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


class _Closed(Exception):
    """Raised from a parser callback to stop reading a connection the gateway closed."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a client may send and how long it may take.

    ``max_header_bytes``: the request line and headers together (431 above it). ``header_timeout``: seconds from
    a request's first byte to the end of its headers (the connection is closed after it: slowloris).
    ``keepalive_timeout``: seconds an idle keep-alive connection is kept. ``max_body``: default body limit of
    routes that set none (413). ``max_pipelined``: requests read ahead on one connection before reading pauses.
    ``websocket_idle_timeout``: seconds a WebSocket connection may carry nothing either way before it is closed.
    ``send_timeout``: seconds a client may leave the gateway unable to write to it (it does not read: slow read)
    before its connection is aborted.
    """

    max_header_bytes: int = 32 * 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 60.0
    max_body: int = 10 * 1024 * 1024
    max_pipelined: int = 16
    max_buffered_response: int = 10 * 1024 * 1024
    websocket_idle_timeout: float = 300.0
    send_timeout: float = 60.0


class Upstream:
    """Where a route forwards to: a service's instances (through a :class:`~meshkit.client.ServiceClient`, which
    follows the registry, balances and ejects outliers) and how the gateway reaches them."""

    __slots__ = ("client", "name")

    def __init__(self, name: str, client: ServiceClient) -> None:
        self.name = name
        self.client = client


@dataclass(slots=True, eq=False)
class Route:
    """One route, compiled: its conditions, its target (an upstream or a Python handler) and its policies."""

    name: str
    path: PathMatcher
    upstream: Upstream | None = None
    handler: Handler | None = None
    hosts: frozenset[str] | None = None
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, re.Pattern[str] | None], ...] = ()
    plugins: tuple[Plugin, ...] = ()
    timeout: float = 30.0
    retries: int = 1
    breaker: CircuitBreaker | None = None
    max_concurrent: int | None = None
    max_body: int | None = None
    preserve_host: bool = False
    websocket: bool = False  # WebSocket handshakes are forwarded (else answered 501)
    # derived by compile()
    in_flight: int = 0
    request_hooks: tuple[tuple[int, Callable[[ProxyRequest], Any]], ...] = ()
    request_body_hooks: tuple[Callable[[ProxyRequest, bytes], bytes], ...] = ()
    # (position, response hook, response_body hook), innermost plugin first: the response travels back out
    response_chain: tuple[
        tuple[
            int,
            Callable[[ProxyRequest, ResponseHead], None] | None,
            Callable[[ProxyRequest, ResponseHead, bytes], bytes] | None,
        ],
        ...,
    ] = ()
    done_hooks: tuple[Callable[[ProxyRequest, int, float], None], ...] = ()
    buffer_request: bool = False
    buffer_response: bool = False
    #: counters of what the route refused itself: ``bulkhead_full`` (503s because ``max_concurrent`` requests were
    #: in flight); the admin API's ``/admin/routes`` reports them
    stats: dict[str, int] = field(default_factory=dict)

    def compile(self, global_plugins: Sequence[Plugin] = ()) -> Route:
        """Collect the hooks of the global plugins, then the route's, skipping hooks a plugin does not override."""
        plugins = (*global_plugins, *self.plugins)
        self.request_hooks = tuple((i, p.request) for i, p in enumerate(plugins) if p.uses("request"))
        self.request_body_hooks = tuple(p.request_body for p in plugins if p.uses("request_body"))
        self.response_chain = tuple(
            (i, p.response if p.uses("response") else None, p.response_body if p.uses("response_body") else None)
            for i, p in reversed(list(enumerate(plugins)))
            if p.uses("response") or p.uses("response_body")
        )
        self.done_hooks = tuple(p.done for p in plugins if p.uses("done"))
        # a plugin with a body limit (request_size) bounds streamed bodies too, not only Content-Length
        limits = [limit for p in plugins if isinstance(limit := getattr(p, "max_body", None), int)]
        if limits:
            self.max_body = min([*limits, self.max_body] if self.max_body is not None else limits)
        self.buffer_request = bool(self.request_body_hooks) or self.handler is not None
        self.buffer_response = any(body is not None for _, _, body in self.response_chain)
        return self


class SpanHooks(Protocol):
    """How the server records a span per request when tracing is on (see ``observe.GatewaySpans``)."""

    def start(self, req: ProxyRequest) -> Any: ...

    def traceparent(self, span: Any) -> str: ...

    def activate(self, span: Any) -> contextlib.AbstractContextManager[Any]: ...

    def end(self, span: Any, req: ProxyRequest, status: int) -> None: ...


class Observer(Protocol):
    """What the server reports to (metrics); the gateway passes one (:class:`meshkit.gateway.observe.Metrics`)."""

    def request_done(self, route: str, upstream: str, status: int, elapsed: float) -> None: ...

    def upstream_error(self, route: str, upstream: str, kind: str) -> None: ...


class _Unobserved:
    """The observer of a server given none: records nothing."""

    def request_done(self, route: str, upstream: str, status: int, elapsed: float) -> None:
        return None

    def upstream_error(self, route: str, upstream: str, kind: str) -> None:
        return None


class Server:
    """The protocol factory of one listening socket (or several: it is shared), with the state all its connections
    share: the current router (swapped atomically on reload), the upstream connection pool, limits, timers."""

    def __init__(
        self,
        router: Router,
        *,
        limits: Limits | None = None,
        trusted: TrustedProxies | None = None,
        observer: Observer | None = None,
        scheme: str = "http",
        connect_timeout: float = 5.0,
        max_idle_per_host: int = 256,
        spans: SpanHooks | None = None,
    ) -> None:
        self.router = router
        self.spans = spans
        self.limits = limits or Limits()
        self.trusted = trusted
        self.observer: Observer = observer or _Unobserved()
        self.scheme = scheme
        self.connect_timeout = connect_timeout
        self.max_idle_per_host = max_idle_per_host
        self.connections: set[_ClientConn] = set()
        self.exchanges: set[_Exchange] = set()
        self.tunnels: set[_Tunnel] = set()  # WebSocket connections past their handshake
        self.idle: dict[tuple[str, int], list[_UpstreamConn]] = {}
        self.random = random.Random()
        #: header names as the parser gives them -> lower-case text, and upstream response header lines -> what
        #: the response path does with them: clients and upstreams send the same few again and again, so a dict
        #: lookup replaces a decode, a split and a lower-casing (bounded: past the cap, lines are just not kept)
        self.header_names: dict[bytes, str] = {}
        self.response_lines: dict[bytes, int] = {}
        #: the loop's clock, read every 0.1 s by the sweep: timeouts need no finer grain, and requests need not
        #: read the clock themselves
        self.now = 1.0
        self.date = b""
        self._tick()
        self._timer: asyncio.TimerHandle | None = None
        self._next_second = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # -- the factory -------------------------------------------------------------------------------------------

    def __call__(self) -> asyncio.Protocol:
        if self._loop is None:
            self.start()
        return _ClientConn(self)

    def start(self) -> None:
        """Start the timers (also done on the first connection)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.now = self._loop.time()
            self._timer = self._loop.call_later(0.1, self._sweep)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _tick(self) -> None:
        self.date = email.utils.formatdate(usegmt=True).encode()

    def _sweep(self) -> None:
        """Every 0.1 s: response deadlines; every second: the Date header, header and keep-alive timeouts."""
        loop = self._loop
        assert loop is not None
        now = self.now = loop.time()
        for exchange in [e for e in self.exchanges if e.deadline and now > e.deadline]:
            exchange.timed_out()
        if now >= self._next_second:  # (a late timer skips no second's work: it runs on the next sweep)
            self._next_second = now + 1.0
            self._tick()
            limits = self.limits
            for conn in [c for c in self.connections if c.expired(now, limits)]:
                conn.timed_out()
            for tunnel in [t for t in self.tunnels if now - t.last > limits.websocket_idle_timeout]:
                tunnel.close(abort=True)
            for key, conns in list(self.idle.items()):
                fresh = [c for c in conns if now - c.idle_since < limits.keepalive_timeout and not c.closed]
                for c in conns:
                    if c not in fresh:
                        c.close()
                if fresh:
                    self.idle[key] = fresh
                else:
                    del self.idle[key]
        if not self._closing:
            self._timer = loop.call_later(0.1, self._sweep)

    # -- upstream connections ----------------------------------------------------------------------------------

    def take(self, key: tuple[str, int]) -> _UpstreamConn | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            if not conn.closed:
                return conn
        return None

    def give(self, conn: _UpstreamConn) -> None:
        if self._closing or conn.closed:
            conn.close()
            return
        conns = self.idle.setdefault(conn.key, [])
        if len(conns) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = self.now
        conns.append(conn)

    def connect(self, key: tuple[str, int], exchange: _Exchange) -> None:
        """Open a connection for ``exchange``'s current attempt; an attempt that ended meanwhile (timed out, the
        client left) ignores the outcome and the connection goes to the pool."""
        loop = self._loop
        assert loop is not None
        attempt = exchange.attempts

        async def connect() -> None:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, conn = await loop.create_connection(lambda: _UpstreamConn(self, key), key[0], key[1])
            except (OSError, TimeoutError) as exc:
                if exchange.attempts == attempt and not exchange.responded:
                    exchange.connect_failed(exc)
                return
            if exchange.attempts == attempt and not exchange.responded and not exchange.client.closed:
                exchange.attach(conn)
            else:
                self.give(conn)

        self.spawn(connect(), f"meshkit-gateway-connect-{key[0]}:{key[1]}")

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop keep-alive (idle connections close; busy ones close after their response) and wait up to
        ``grace`` seconds for the exchanges in flight; then close what is left."""
        self._closing = True
        for conn in list(self.connections):
            if not conn.queue:
                conn.close()
            else:
                conn.keep_alive = False
        deadline = time.monotonic() + grace
        while self.exchanges and time.monotonic() < deadline:  # noqa: ASYNC110 - exchanges end in callbacks
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        for tunnel in list(self.tunnels):
            tunnel.close(abort=True)
        for conns in self.idle.values():
            for c in conns:
                c.close()
        self.idle.clear()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _ClientConn(asyncio.Protocol):
    """One client connection: parses requests, runs their exchanges one after the other (pipelining)."""

    __slots__ = (
        "closed",
        "corked",
        "fresh",
        "head_bytes",
        "head_size",
        "head_started",
        "headers",
        "idle_since",
        "keep_alive",
        "last_host",
        "parser",
        "paused",
        "peer",
        "queue",
        "refusal",
        "server",
        "stalled_since",
        "transport",
        "unsent",
        "upgrade",
        "url",
        "write_paused",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Exchange] = deque()
        self.headers: list[tuple[str, str]] = []
        self.url = b""
        self.peer = ""
        self.last_host: str | None = None
        self.head_started = 0.0
        self.head_bytes = 0
        self.head_size = 0
        self.idle_since = 0.0
        self.keep_alive = True
        self.closed = False
        self.corked: list[bytes] | None = None
        self.fresh = True
        self.paused = False
        self.write_paused = False
        # writing paused, or the connection closed with bytes left to write: since when nothing left, and how much
        # was waiting then (send_timeout; see expired())
        self.stalled_since = 0.0
        self.unsent = 0
        self.refusal: tuple[int, str] | None = None  # the answer to a request that could not be read, written last
        self.upgrade = _NO_UPGRADE  # what the last request's Upgrade header asked for (see upgraded())

    # -- asyncio.Protocol --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's transports do not subclass it
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        self.idle_since = self.server.now
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for exchange in self.queue:
            exchange.client_gone()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._stalled()
        if self.queue:
            self.queue[0].pause_upstream(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            self.queue[0].pause_upstream(False)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Closed):
                return  # nothing after it is read, let alone forwarded
            if isinstance(cause, BadRequest):
                self.refuse(cause.status, cause.message)
            else:
                log.error("gateway: internal error while reading a request", exc_info=cause or exc)  # noqa: TRY400
                self.refuse(500, "the gateway failed to handle this request")
            return
        except httptools.HttpParserUpgrade as exc:
            self.upgraded(data[exc.args[0] :])
            return
        except httptools.HttpParserInvalidURLError:
            self.refuse(400, "the request target is not a valid URL")
            return
        except httptools.HttpParserError as exc:
            if not self.keep_alive and self.queue and self.queue[-1].request_done:
                # bytes after a request that closes the connection: never read, never forwarded
                if self.transport is not None:
                    self.transport.pause_reading()
                return
            self.refuse(400, f"malformed HTTP request: {exc}")
            return
        if self.head_started:  # still reading a request's head
            self.head_bytes += len(data)
            if self.head_bytes > self.server.limits.max_header_bytes:
                self.refuse(431, "the request line and headers are too large")

    def eof_received(self) -> bool | None:
        return None  # close our side too, once what was queued is written

    # -- httptools callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closed:  # closed after an answer while requests pipelined behind it were still in the buffer
            raise _Closed
        self.headers = []
        self.url = b""
        self.head_started = self.server.now
        self.head_bytes = 0
        self.head_size = 0
        self.fresh = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        server = self.server
        if self.head_size > server.limits.max_header_bytes:
            raise BadRequest(431, "the request line and headers are too large")
        names = server.header_names
        text = names.get(name)
        if text is None:
            text = name.decode("latin-1").lower()
            if len(names) < _CACHED_LINES:
                names[name] = text
        self.headers.append((text, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_started = 0.0
        server = self.server
        parser = self.parser
        headers = self.headers
        self.headers = []
        url = self.url
        self.url = b""
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or _other_method(raw_method)
        version = parser.get_http_version()
        keep_alive = parser.should_keep_alive()

        # framing and Host: refuse what could mean two things
        host = None
        length = None
        chunked = False
        expect = False
        upgrade = None
        for name, value in headers:
            if name not in _FRAMING:
                continue
            if name == "host":
                if host is not None:
                    raise BadRequest(400, "more than one Host header")
                host = value
            elif name == "content-length":
                if length is not None:
                    raise BadRequest(400, "more than one Content-Length header")
                if not value.isdigit() or not value.isascii():
                    raise BadRequest(400, "Content-Length is not a number")
                length = int(value)
            elif name == "transfer-encoding":
                if chunked or value.strip().lower() != "chunked":
                    raise BadRequest(501, "only 'Transfer-Encoding: chunked' is supported")
                chunked = True
            elif name == "expect":
                if value.lower() != "100-continue":
                    raise BadRequest(417, f"unsupported expectation {value!r}")
                expect = True
            elif name == "upgrade":
                upgrade = value
        if chunked and length is not None:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if chunked and version == "1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        if host is None:
            if version != "1.0":
                raise BadRequest(400, "the Host header is required")
            host = ""
        elif host != self.last_host:  # a keep-alive connection sends the same Host again and again
            if host and not _HOST.fullmatch(host):
                raise BadRequest(400, "the Host header is not a valid host")
            self.last_host = host

        target = url.decode("latin-1")
        if not target.startswith("/"):
            if target.startswith(("http://", "https://")):
                parsed = httptools.parse_url(url)
                target = (parsed.path or b"/").decode("latin-1")
                if parsed.query:
                    target += "?" + parsed.query.decode("latin-1")
            else:
                raise BadRequest(400, "the request target must be a path (origin-form)")
        if "#" in target:
            raise BadRequest(400, "the request target may not contain a fragment")
        raw_path, _, query = target.partition("?")
        path = normalise_path(raw_path)

        peer = self.peer
        client = server.trusted.client_address(peer, _all(headers, "x-forwarded-for")) if server.trusted else peer
        fields = Headers._trusted(headers)
        router = server.router
        hostname = ""
        if router.by_host:
            hostname = (host.rsplit(":", 1)[0] if host and not host.endswith("]") else host).lower()
        match = router.match(hostname, method, path, fields)
        if isinstance(match, Match):
            route: Route | None = match.route
            name, params, status_only = match.route.name, match.params, 0
        else:
            route, name, params, status_only = None, "", {}, match
        websocket = False
        if upgrade is not None and parser.should_upgrade():
            websocket = self._upgrade(upgrade, method, length, chunked, route)
            if self.upgrade == _WEBSOCKET:
                keep_alive = False  # a refused handshake closes the connection (what follows it is not HTTP)
        req = ProxyRequest(
            method,
            path,
            query,
            fields,
            client,
            peer,
            server.scheme,
            version,
            name,
            params,
            started=time.perf_counter(),
        )
        exchange = _Exchange(self, req, host, keep_alive, chunked or bool(length), length, expect)
        exchange.route = route
        exchange.status_only = status_only
        if websocket:
            exchange.upgrade = True
        if not keep_alive:
            self.keep_alive = False
        self.queue.append(exchange)
        if len(self.queue) == 1:
            exchange.start()
        elif len(self.queue) >= server.limits.max_pipelined and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _upgrade(self, upgrade: str, method: str, length: int | None, chunked: bool, route: Route | None) -> bool:
        """A request asked to switch protocols (``Connection: upgrade`` and ``Upgrade``): True when it is a WebSocket
        handshake to forward. Another protocol (``h2c``...) is not switched to: the request is answered over
        HTTP/1.1 and the connection goes on (RFC 9110 §7.8 lets a server ignore Upgrade)."""
        if chunked or length:
            # llhttp stops at the end of the head of an upgrade request: a body would be read as the next request
            raise BadRequest(400, "a request asking for a protocol upgrade may not have a body")
        if "websocket" not in {token.strip().lower() for token in upgrade.split(",")}:
            self.upgrade = _IGNORED_UPGRADE
            return False
        self.upgrade = _WEBSOCKET
        if route is None:
            return False  # answered 404 / 405, then the connection is closed
        if not route.websocket:
            log.info(
                "gateway: a WebSocket handshake on route %s, which does not accept them (websocket: true enables it)",
                route.name,
                extra={"route": route.name},
            )
            raise BadRequest(501, "this route does not accept WebSocket connections")
        if method != "GET":
            raise BadRequest(400, "a WebSocket handshake is a GET request")
        return True

    def upgraded(self, rest: bytes) -> None:
        """llhttp stopped after the head of a request asking to switch protocols; ``rest`` is what followed it."""
        kind, self.upgrade = self.upgrade, _NO_UPGRADE
        if kind == _IGNORED_UPGRADE:  # answered as a plain request: read on with a new parser
            self.parser = httptools.HttpRequestParser(self)
            if rest:
                self.data_received(rest)
            return
        exchange = self.queue[-1] if self.queue else None
        if exchange is not None and exchange.upgrade:
            # nothing more on this connection is HTTP: until the upstream answers, what the client sends is kept
            # for the tunnel (forwarded only after a 101), and its leaving ends the exchange
            if self.transport is not None:
                self.transport.set_protocol(_Held(self, exchange))
            exchange.hold(rest)
        elif kind == _WEBSOCKET:
            if self.transport is not None:
                self.transport.pause_reading()  # the handshake was answered (404...): the connection closes
        else:  # (not reached: CONNECT is refused with its head, and an Upgrade header sets self.upgrade)
            self.refuse(501, "this protocol upgrade is not supported")

    def on_body(self, body: bytes) -> None:
        if self.queue:
            self.queue[-1].request_chunk(body)

    def on_message_complete(self) -> None:
        if self.queue:
            self.queue[-1].request_complete()
        self.idle_since = self.server.now

    # -- used by exchanges -------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        corked = self.corked
        if corked is not None:
            corked.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def cork(self) -> None:
        """Collect writes until :meth:`uncork`: a response that arrives in one read leaves in one write."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        corked, self.corked = self.corked, None
        if corked and self.transport is not None and not self.closed:
            self.transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def finished(self, exchange: _Exchange, reusable: bool) -> None:
        """``exchange`` wrote its whole response; start the next queued one or close."""
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        self.idle_since = self.server.now  # keep-alive's idle time starts when the answer is written
        if self.refusal is not None and reusable and exchange.keep_alive:
            if not self.queue:
                self._write_refusal()  # the requests before the one refused are answered: now its answer
                return
            self.queue[0].start()
            return
        # close after the exchange that asked for it (Connection: close, a WebSocket handshake...), not before
        # the requests read ahead of it are answered
        if not reusable or not exchange.keep_alive or self.server._closing or not (self.keep_alive or self.queue):
            self.close()
            return
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        if self.queue:
            self.queue[0].start()

    def refuse(self, status: int, message: str) -> None:
        """Answer a request the gateway cannot read, then close: the rest of the stream has no framing it can
        trust, so nothing more is read. The requests read before it are answered first, in order, and the refusal
        last (see :meth:`finished`); one whose body was being read when it broke is dropped."""
        self.keep_alive = False
        if self.refusal is not None:
            return
        log.info(
            "gateway refused a request from %s: %d %s",
            self.peer,
            status,
            message,
            extra={"client": self.peer, "status": status},
        )
        if self.queue and not self.queue[-1].request_done:
            exchange = self.queue.pop()  # the request whose body was being read when it broke
            exchange.client_gone()
            if exchange.responded:  # its answer had begun: it cannot be finished, nor followed by another
                self.close()
                return
        self.refusal = (status, message)
        if self.queue and not self.closed:
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self._write_refusal()

    def _write_refusal(self) -> None:
        if self.refusal is not None and not self.closed:
            status, message = self.refusal
            body = Reply.error(status, message)
            self.write(_refusal_head(status, body.headers.items(), len(body.body), self.server.date) + body.body)
        self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.uncork()
            self.closed = True
            self._stalled()
            self.transport.close()

    def _stalled(self) -> None:
        self.stalled_since = self.server.now
        self.unsent = self._buffered()

    def _buffered(self) -> int:
        """Bytes written and not yet sent to the client."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def expired(self, now: float, limits: Limits) -> bool:
        if self.write_paused or self.closed:
            # writing a response it does not read (slow read), or closed with its last bytes still to leave: judged
            # by send_timeout alone, and any progress (the buffer went down since the last look) restarts the clock
            unsent = self._buffered()
            if unsent < self.unsent:
                self.unsent, self.stalled_since = unsent, now
                return False
            return now - self.stalled_since > limits.send_timeout
        if self.head_started:
            return now - self.head_started > limits.header_timeout
        if self.fresh:  # connected and sent nothing yet: it gets the header timeout, not keep-alive's
            return now - self.idle_since > limits.header_timeout
        return not self.queue and now - self.idle_since > limits.keepalive_timeout

    def timed_out(self) -> None:
        if (self.write_paused or self.closed) and self.transport is not None:
            # the client stopped reading, or the connection was closed but what was left to write never left:
            # nothing more can reach it
            if self.write_paused:
                log.info("gateway: %s stopped reading its response; connection aborted", self.peer)
            self.closed = True
            self.transport.abort()
        elif self.head_started:
            self.refuse(408, "the request headers took too long to arrive")
        else:
            self.close()


class _UpstreamConn(asyncio.Protocol):
    """One keep-alive connection to an upstream instance, used by one exchange at a time."""

    __slots__ = (
        "closed",
        "exchange",
        "idle_since",
        "key",
        "parser",
        "raw",
        "reading_head",
        "reset_parser",
        "server",
        "transport",
        "used",
    )

    def __init__(self, server: Server, key: tuple[str, int]) -> None:
        self.server = server
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.raw = b""  # the bytes of a response head being received
        self.reading_head = False
        self.idle_since = 0.0
        self.closed = False
        self.used = False
        self.reset_parser = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's transports do not subclass it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_client(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_client(False)

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            self.close()  # an upstream talking out of turn: the connection cannot be trusted any more
            return
        client = self.exchange.client
        client.cork()
        if self.reading_head:
            self.raw = self.raw + data if self.raw else data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switched(client, data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            client.uncork()
            exchange, self.exchange = self.exchange, None
            self.close()
            if exchange is not None:
                cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
                if isinstance(exc, httptools.HttpParserCallbackError):
                    log.error("gateway: internal error while reading a response", exc_info=cause)  # noqa: TRY400
                exchange.upstream_broken(f"invalid HTTP response from the upstream: {cause}")
            return
        client.uncork()
        if self.reset_parser:
            self.reset_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def _switched(self, client: _ClientConn, rest: bytes) -> None:
        """llhttp stopped after a 101's head: the end of HTTP on this connection."""
        exchange, self.exchange = self.exchange, None
        if exchange is not None and exchange.switch_head is not None:
            exchange.switched(self, rest)
            return
        client.uncork()
        self.close()
        if exchange is not None:
            exchange.upstream_broken("the upstream switched protocols without being asked to")

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    # no on_header callback: the head is taken from the bytes received (one split instead of a Python call per
    # header), after llhttp has validated it

    def on_headers_complete(self) -> None:
        raw = self.raw
        end = raw.find(b"\r\n\r\n")
        head, self.raw = raw[:end], raw[end + 4 :]
        exchange = self.exchange
        if exchange is not None:
            status = self.parser.get_status_code()
            if not 100 <= status < 200:
                self.reading_head = False
            exchange.response_head(status, head.split(b"\r\n")[1:], self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_chunk(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_complete(self.parser.should_keep_alive())


def _all(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n".encode()


def _header_lines(items: Sequence[tuple[str, str]]) -> list[bytes]:
    return [f"{k}: {v}\r\n".encode("latin-1") for k, v in items]


def _refusal_head(status: int, headers: Sequence[tuple[str, str]], length: int, date: bytes) -> bytes:
    """The head of an answer that ends the connection (a request refused before any exchange was made)."""
    lines = _header_lines(headers)
    return b"%b%bcontent-length: %d\r\nconnection: close\r\ndate: %b\r\n\r\n" % (
        _status_line(status),
        b"".join(lines),
        length,
        date,
    )


class _Exchange:
    """One request through the gateway: plugins, the upstream attempt(s), the response back."""

    __slots__ = (
        "attempts",
        "body",
        "body_size",
        "breaker_ticket",
        "chunked_out",
        "client",
        "deadline",
        "early",
        "expect",
        "has_body",
        "head_only",
        "host",
        "instance",
        "keep_alive",
        "length",
        "req",
        "request_done",
        "resp",
        "resp_body",
        "resp_chunked",
        "resp_framed",
        "resp_ignore",
        "responded",
        "route",
        "span",
        "started_upstream",
        "status",
        "status_only",
        "streaming",
        "switch_head",
        "tried",
        "up",
        "upgrade",
        "waiting_body",
    )

    def __init__(
        self,
        client: _ClientConn,
        req: ProxyRequest,
        host: str,
        keep_alive: bool,
        has_body: bool,
        length: int | None,
        expect: bool,
    ) -> None:
        self.client = client
        self.req = req
        self.host = host
        self.keep_alive = keep_alive
        self.has_body = has_body
        self.length = length
        self.expect = expect
        self.head_only = req.method == "HEAD"
        self.route: Route | None = None
        self.status_only = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.request_done = False
        self.streaming = False  # request body chunks go straight to the upstream
        self.waiting_body = False  # the exchange waits for the whole body (buffered routes)
        self.up: _UpstreamConn | None = None
        self.instance: Instance | None = None
        self.tried: tuple[str, ...] = ()  # the instances of earlier attempts
        self.attempts = 0
        self.breaker_ticket: int | None = None
        self.deadline = 0.0
        self.started_upstream = 0.0
        self.resp: ResponseHead | None = None
        self.resp_body: list[bytes] | None = None
        self.resp_chunked = False
        self.resp_framed = False
        self.resp_ignore = False
        self.chunked_out = False
        self.responded = False  # the response head was written
        self.status = 0
        self.span: Any = None  # the gateway's span of this request (tracing on)
        self.upgrade = False  # a WebSocket handshake, forwarded as one
        self.early = b""  # what the client sent after the handshake, before the upstream's answer
        self.switch_head: bytes | None = None  # the upstream's 101 header lines, until llhttp confirms the switch

    # -- the request side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        route = self.route
        spans = self.client.server.spans
        if spans is not None:
            self.span = spans.start(self.req)
        if route is None:
            status = self.status_only
            message = "no route for this path" if status == 404 else "the route does not allow this method"
            self.reply(Reply.error(status, message))
            return
        limit = route.max_body if route.max_body is not None else self.client.server.limits.max_body
        if self.length is not None and self.length > limit:
            self.reply(Reply.error(413, f"the request body is larger than {limit} bytes"))
            return
        self._run_request_hooks(0)

    def _run_request_hooks(self, index: int) -> None:
        route = self.route
        assert route is not None
        hooks = route.request_hooks
        req = self.req
        for i in range(index, len(hooks)):
            position, hook = hooks[i]
            try:
                result = hook(req)
            except Exception:
                log.exception("gateway: a plugin's request hook failed on route %s", route.name)
                self.reply(Reply.error(500, "the gateway failed to handle this request"), position)
                return
            if result is None:
                continue
            if isinstance(result, Reply):
                self.reply(result, position)  # the plugins before it see this answer on its way out
                return
            if inspect.isawaitable(result):
                self.client.server.spawn(self._await_hook(result, i), "meshkit-gateway-plugin")
                return
        self._proceed()

    async def _await_hook(self, pending: Awaitable[Reply | None], index: int) -> None:
        position = self.route.request_hooks[index][0] if self.route is not None else 0
        try:
            result = await pending
        except Exception:
            log.exception("gateway: a plugin's request hook failed on route %s", self.req.route)
            self.reply(Reply.error(500, "the gateway failed to handle this request"), position)
            return
        if self.client.closed:
            return
        if isinstance(result, Reply):
            self.reply(result, position)
            return
        self._run_request_hooks(index + 1)

    def _proceed(self) -> None:
        route = self.route
        assert route is not None
        if self.expect and not self.request_done:
            self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if route.buffer_request and not self.request_done:
            self.waiting_body = True
            return
        if route.handler is not None:
            self.client.server.spawn(self._handle(route.handler), f"meshkit-gateway-{route.name}")
            return
        if route.request_body_hooks and not self._run_body_hooks():
            return
        self._forward()

    def _run_body_hooks(self) -> bool:
        route = self.route
        assert route is not None
        body = b"".join(self.body)
        try:
            for hook in route.request_body_hooks:
                body = hook(self.req, body)
        except Exception as exc:
            status = getattr(exc, "status", None)
            if isinstance(status, int) and 400 <= status < 500:
                self.reply(Reply.error(status, str(getattr(exc, "message", exc))))
                return False
            log.exception("gateway: a plugin's request_body hook failed on route %s", route.name)
            self.reply(Reply.error(500, "the gateway failed to handle this request"))
            return False
        self.body = [body] if body else []
        self.body_size = len(body)
        self.length = len(body)
        self.has_body = bool(body)
        return True

    def hop_traceparent(self, incoming: str | None) -> str:
        """The ``traceparent`` of the gateway's hop: its span's (with tracing on) or a new span id in the caller's
        trace."""
        spans = self.client.server.spans
        if spans is None:
            return _next_traceparent(incoming, self.client.server.random)
        if self.span is None:
            self.span = spans.start(self.req)
        return spans.traceparent(self.span)

    async def _handle(self, handler: Handler) -> None:
        # the gateway's hop of the trace: what the handler's own calls carry
        headers = self.req.headers
        headers.set("traceparent", self.hop_traceparent(headers.get("traceparent")))
        spans = self.client.server.spans
        try:
            if spans is not None and self.span is not None:
                with spans.activate(self.span):
                    reply = await handler(self.req, b"".join(self.body))
            else:
                reply = await handler(self.req, b"".join(self.body))
        except Exception:
            log.exception("gateway: the handler of route %s failed", self.req.route)
            reply = Reply.error(500, "the gateway failed to handle this request")
        if not self.client.closed:
            self.reply(reply)

    def request_chunk(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        route = self.route
        limit = self.client.server.limits.max_body if route is None or route.max_body is None else route.max_body
        if self.body_size > limit:
            self.client.refuse(413, f"the request body is larger than {limit} bytes")
            self.abandon_upstream()
            return
        if self.streaming and self.up is not None:
            self.up.send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked_out else chunk)
        elif not self.responded:
            self.body.append(chunk)

    def request_complete(self) -> None:
        self.request_done = True
        if self.streaming and self.up is not None:
            if self.chunked_out:
                self.up.send(b"0\r\n\r\n")
        elif self.waiting_body:
            self.waiting_body = False
            self._proceed()

    # -- choosing and reaching the upstream ----------------------------------------------------------------------

    def _forward(self) -> None:
        route = self.route
        assert route is not None
        assert route.upstream is not None
        upstream = route.upstream
        if self.attempts == 0:
            if route.breaker is not None:
                try:
                    self.breaker_ticket = route.breaker.try_acquire()
                except CircuitOpen as exc:
                    wait = max(1, round(exc.retry_after or 1))
                    self.reply(
                        Reply.error(
                            503,
                            f"the upstream {upstream.name!r} is failing; the gateway stopped calling it for a while",
                            [("retry-after", str(wait))],
                            route=route.name,
                        )
                    )
                    return
            if route.max_concurrent is not None:
                if route.in_flight >= route.max_concurrent:
                    self._release_breaker()
                    route.stats["bulkhead_full"] = route.stats.get("bulkhead_full", 0) + 1
                    self.reply(Reply.error(503, f"too many requests in flight on route {route.name!r}"))
                    return
                route.in_flight += 1
        self.attempts += 1
        try:
            instance = upstream.client.acquire(self.tried)
        except Unavailable as exc:
            self._finish_upstream(None)
            self.reply(Reply.error(503, str(exc), upstream=upstream.name))
            return
        self.instance = instance
        self.tried = (*self.tried, instance.id)
        server = self.client.server
        self.started_upstream = server.now
        self.deadline = self.started_upstream + route.timeout
        server.exchanges.add(self)
        key = (instance.host, instance.port)
        conn = server.take(key)
        if conn is not None:
            self.attach(conn)
        else:
            server.connect(key, self)

    def attach(self, conn: _UpstreamConn) -> None:
        self.up = conn
        conn.exchange = self
        conn.reading_head = True
        conn.raw = b""
        route = self.route
        assert route is not None
        req = self.req
        path = route.path.rewritten(req.path, req.params) if route.path.rewrite else req.path
        target = quote_path(path)
        if req.query:
            target += "?" + req.query
        lines = [f"{req.method} {target} HTTP/1.1\r\n"]
        instance = self.instance
        assert instance is not None
        host = self.host if route.preserve_host and self.host else f"{instance.host}:{instance.port}"
        lines.append(f"host: {host}\r\n")
        forwarded_for = None
        traceparent = None
        connection = None
        first = len(lines)
        for name, value in req.headers.items():
            if name in _NOT_FORWARDED:
                if name == "x-forwarded-for":
                    forwarded_for = value if forwarded_for is None else f"{forwarded_for}, {value}"
                elif name == "traceparent":
                    traceparent = value
                elif name == "connection":
                    connection = value if connection is None else f"{connection}, {value}"
                continue
            lines.append(f"{name}: {value}\r\n")
        if connection is not None:  # headers the client named in Connection are hop-by-hop too
            tokens = {t.strip().lower() for t in connection.split(",")} - {"close", "keep-alive"}
            if tokens:
                lines[first:] = [line for line in lines[first:] if line.partition(":")[0] not in tokens]
        server = self.client.server
        peer = req.peer
        if forwarded_for is not None and server.trusted is not None and server.trusted.trusts(peer):
            lines.append(f"x-forwarded-for: {forwarded_for}, {peer}\r\n")
        else:
            lines.append(f"x-forwarded-for: {peer}\r\n")
        lines.append(f"x-forwarded-proto: {req.scheme}\r\n")
        if self.host:
            lines.append(f"x-forwarded-host: {self.host}\r\n")
        lines.append(f"traceparent: {self.hop_traceparent(traceparent)}\r\n")
        if self.upgrade:
            lines.append("connection: upgrade\r\nupgrade: websocket\r\n")
        buffered = not self.streaming and (self.request_done or route.buffer_request)
        if not self.has_body:
            lines.append("\r\n")
            conn.send("".join(lines).encode("latin-1"))
        elif buffered or self.length is not None:
            length = self.body_size if buffered else self.length
            lines.append(f"content-length: {length}\r\n\r\n")
            conn.send("".join(lines).encode("latin-1") + b"".join(self.body))
        else:
            lines.append("transfer-encoding: chunked\r\n\r\n")
            self.chunked_out = True
            data = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in self.body)
            if self.request_done:
                data += b"0\r\n\r\n"
            conn.send("".join(lines).encode("latin-1") + data)
        if not self.request_done:
            self.streaming = True
            self.body = []
        conn.used = True

    def connect_failed(self, exc: BaseException) -> None:
        route = self.route
        assert route is not None
        assert route.upstream is not None
        assert self.instance is not None
        log.info(
            "gateway: cannot connect to %s at %s:%d: %s",
            route.upstream.name,
            self.instance.host,
            self.instance.port,
            exc,
            extra={"route": route.name, "upstream": route.upstream.name, "instance": self.instance.id},
        )
        self.client.server.observer.upstream_error(route.name, route.upstream.name, "connect")
        self._attempt_failed(retry_safe=True)

    def upstream_lost(self, conn: _UpstreamConn, exc: BaseException | None) -> None:
        """The upstream connection closed before the response was complete."""
        if self.up is not conn:
            return
        self.up = None
        if self.resp is not None and not self.resp_framed:
            self.response_complete(False)  # a response delimited by the connection's end
            return
        resp = self.resp
        route = self.route
        assert route is not None
        assert route.upstream is not None
        self.client.server.observer.upstream_error(route.name, route.upstream.name, "reset")
        if self.responded:
            self._cut_short()
            return
        # nothing of the response arrived: retry if repeating the request is harmless
        idempotent = self.req.method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
        self._attempt_failed(retry_safe=idempotent and not self.has_body and resp is None)

    def upstream_broken(self, message: str) -> None:
        self.up = None
        route = self.route
        assert route is not None
        assert route.upstream is not None
        self.client.server.observer.upstream_error(route.name, route.upstream.name, "protocol")
        if self.responded:
            self._cut_short()
            return
        self._finish_upstream(None)
        self.reply(Reply.error(502, message, upstream=route.upstream.name))

    def timed_out(self) -> None:
        self.deadline = 0.0
        route = self.route
        assert route is not None
        assert route.upstream is not None
        self.client.server.observer.upstream_error(route.name, route.upstream.name, "timeout")
        self.abandon_upstream()
        if self.responded:
            self._cut_short()
            return
        self._finish_upstream(None)
        self.reply(Reply.error(504, f"the upstream {route.upstream.name!r} did not answer within {route.timeout:g}s"))

    def _cut_short(self) -> None:
        """The upstream failed after the response head went out: a response cannot be finished, so the client's
        connection is closed (it sees the response truncated, not a wrong one)."""
        self._finish_upstream(None)
        self.client.close()
        self._done(self.status)

    def _attempt_failed(self, *, retry_safe: bool) -> None:
        route = self.route
        assert route is not None
        assert route.upstream is not None
        client = route.upstream.client
        if self.instance is not None:
            client.release(self.instance, None)
            self.instance = None
        self.client.server.exchanges.discard(self)
        if self.client.closed:
            self._finish_upstream(None, released=True)
            return
        if retry_safe and self.attempts <= route.retries and not self.streaming:
            self._forward()
            return
        self._finish_upstream(None, released=True)
        self.reply(
            Reply.error(502, f"the upstream {route.upstream.name!r} could not be reached", upstream=route.upstream.name)
        )

    def abandon_upstream(self) -> None:
        up, self.up = self.up, None
        if up is not None:
            up.close()

    # -- the response side --------------------------------------------------------------------------------------

    def response_head(self, status: int, raw: list[bytes], keep_alive: bool) -> None:
        if 100 <= status < 200 and not (status == 101 and self.upgrade):
            self.resp_ignore = True  # an interim response (103 Early Hints): not passed on
            return
        self.resp_ignore = False
        self.deadline = 0.0
        self.client.server.exchanges.discard(self)
        self.status = status
        route = self.route
        assert route is not None
        length: bytes | None = None
        chunked = False
        tokens: set[bytes] | None = None
        dated = False
        kept: list[bytes] = []  # header lines as received
        seen = self.client.server.response_lines
        for line in raw:
            kind = seen.get(line)
            if kind is None:
                kind = _line_kind(line)
                if kind != _DATE and len(seen) < _CACHED_LINES:  # a Date line is new every second
                    seen[line] = kind
            if kind == _KEEP:
                kept.append(line)
            elif kind == _DATE:
                dated = True
                kept.append(line)
            elif kind == _LENGTH:
                length = line.partition(b":")[2].strip()
            elif kind == _CHUNKED:
                chunked = True
            elif kind == _CONNECTION:
                tokens = {t.strip().lower() for t in line.partition(b":")[2].split(b",")} - {b"close", b"keep-alive"}
        if tokens:
            kept = [k for k in kept if k.partition(b":")[0].lower() not in tokens]
        if status == 101:  # the upstream accepts the WebSocket handshake; see switched()
            self.switch_head = b"".join(line + b"\r\n" for line in kept)
            return
        self.resp_framed = chunked or length is not None
        bodiless = self.head_only or status in (204, 304)
        if route.response_chain:
            # plugins see (and may change) the head: decode it once
            fields = [line.decode("latin-1").partition(":") for line in kept]
            resp = ResponseHead(status, Headers._trusted([(k.lower(), v.strip()) for k, _, v in fields]))
            self.resp = resp
            if route.buffer_response and not bodiless:
                self.resp_body = []  # the plugins see head and body together once the body is in
                return
            self._outbound(resp, None, _ALL)
            lines = [b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]
            dated = "date" in resp.headers
        else:
            self.resp = ResponseHead(status, _NO_HEADERS)
            lines = kept
            lines.append(b"")  # the CRLF after the last kept line (joined below)
            lines = [b"\r\n".join(lines)]
        if bodiless:
            if self.head_only and length is not None:
                lines.append(b"content-length: %s\r\n" % length)
            self._send_head(status, lines, -1, dated)
            if self.head_only and self.up is not None:
                self.up.reset_parser = True  # llhttp cannot be told a response to HEAD has no body
            self.response_complete(keep_alive)
            return
        if length is not None and not chunked:
            self._send_head(status, lines, int(length), dated)
        else:
            self.resp_chunked = True
            self._send_head(status, lines, None, dated)

    def _write_head(self, status: int, items: Sequence[tuple[str, str]], length: int | None) -> None:
        """Write a head the gateway holds as text (plugins' answers, buffered responses)."""
        self._send_head(status, _header_lines(items), length, any(k == "date" for k, _ in items))

    def _send_head(self, status: int, lines: list[bytes], length: int | None, dated: bool) -> None:
        """``lines``: the header lines; ``length``: a number, None (chunked; close-delimited to an HTTP/1.0
        client), or -1 (no framing header: the answer to HEAD, 204, 304)."""
        client = self.client
        status_line = _status_line(status)
        if length is None:
            if self.req.http_version == "1.0":
                client.keep_alive = self.keep_alive = False  # the end of the body is the end of the connection
                self.resp_chunked = False
            else:
                lines.append(b"transfer-encoding: chunked\r\n")
        elif length >= 0:
            lines.append(b"content-length: %d\r\n" % length)
        last = not client.keep_alive and len(client.queue) <= 1 and client.refusal is None  # (a refusal follows)
        if not self.keep_alive or client.server._closing or last:
            lines.append(b"connection: close\r\n")
        if not dated:
            lines.append(b"date: " + client.server.date + b"\r\n")
        lines.append(b"\r\n")
        client.write(status_line + b"".join(lines))
        self.responded = True

    def response_chunk(self, chunk: bytes) -> None:
        if self.resp_ignore:
            return
        if self.resp_body is not None:
            self.resp_body.append(chunk)
            if sum(len(c) for c in self.resp_body) > self.client.server.limits.max_buffered_response:
                self.upstream_broken("the upstream's response is larger than the gateway buffers for this route")
            return
        if self.resp_chunked:
            self.client.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.client.write(chunk)

    def response_complete(self, keep_alive: bool) -> None:
        if self.resp_ignore:
            self.resp_ignore = False
            return
        if self.switch_head is not None:
            return  # a 101's head is complete: switched() takes it from here
        up, self.up = self.up, None
        if up is not None:
            up.exchange = None
            if keep_alive and self.request_done and not self.upgrade:
                self.client.server.give(up)
            else:
                up.close()
        resp = self.resp
        if self.resp_body is not None and resp is not None:
            body = b"".join(self.resp_body)
            self.resp_body = None
            shaped = self._outbound(resp, body, _ALL)
            if shaped is None:
                self._finish_upstream(resp.status)
                self.reply(Reply.error(500, "the gateway failed to handle this response"), 0)
                return
            body = shaped
            self._write_head(resp.status, resp.headers.items(), len(body))
            self.client.write(body)
        elif self.resp_chunked:
            self.client.write(b"0\r\n\r\n")
        self._finish_upstream(resp.status if resp is not None else None)
        self._done(self.status)
        self.client.finished(self, self.request_done)

    def hold(self, data: bytes) -> None:
        """Keep what the client sent after the handshake (bounded: reading pauses past ``_MAX_EARLY``)."""
        if data:
            self.early += data
            transport = self.client.transport
            if len(self.early) > _MAX_EARLY and transport is not None:
                transport.pause_reading()

    def switched(self, up: _UpstreamConn, rest: bytes) -> None:
        """llhttp confirmed the upstream's 101: answer the client, account for the handshake, and hand both
        connections to a :class:`_Tunnel` (``rest``: the upstream's first frames, read with its head)."""
        client = self.client
        head, self.switch_head = self.switch_head or b"", None
        client.write(_STATUS_LINES[101] + head + b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
        if rest:
            client.write(rest)
        client.uncork()
        self.responded = True
        self.up = None
        self._finish_upstream(101)
        self._done(101)
        client.queue.clear()
        client.server.connections.discard(client)
        gone = client.closed or client.transport is None
        # both connections belong to the tunnel now: the client's is not read as HTTP any more, the upstream's never
        # goes back to the pool
        client.closed = up.closed = True
        if gone or up.transport is None:
            if up.transport is not None:
                up.transport.close()
            return
        assert client.transport is not None
        _Tunnel(client.server, client.transport, up.transport, self.early)
        self.early = b""

    # -- endings ------------------------------------------------------------------------------------------------

    def _outbound(self, resp: ResponseHead, body: bytes | None, below: int) -> bytes | None:
        """Run the response hooks of the plugins at positions below ``below``, innermost first (the answer
        travels back out through them); with a ``body``, each plugin's response_body hook right after its response
        hook. Returns the body (None if a body hook failed: the caller answers 500)."""
        route = self.route
        if route is None:
            return body
        req = self.req
        for position, head_hook, body_hook in route.response_chain:
            if position >= below:
                continue
            if head_hook is not None:
                try:
                    head_hook(req, resp)
                except Exception:
                    log.exception("gateway: a plugin's response hook failed on route %s", route.name)
            if body_hook is not None and body is not None:
                try:
                    body = body_hook(req, resp, body)
                except Exception:
                    log.exception("gateway: a plugin's response_body hook failed on route %s", route.name)
                    return None
        return body

    def reply(self, reply: Reply, source: int = -1) -> None:
        """Answer with the gateway's own response: an error, a handler's result, or the answer of the plugin at
        position ``source`` (then only the plugins before it see the answer; -1: every plugin does)."""
        if self.responded:
            self.client.close()
            self._done(self.status)
            return
        resp = ResponseHead(reply.status, reply.headers)
        out = self._outbound(resp, reply.body, _ALL if source < 0 else source)
        if out is None:
            resp = ResponseHead(500, Headers())
            failed = Reply.error(500, "the gateway failed to handle this response")
            resp.headers = failed.headers
            out = failed.body
        self.status = resp.status
        # a body we did not read leaves the stream without framing we trust: close after this answer (a request
        # without one is whole once its head is read)
        reusable = self.request_done or not self.has_body
        if not reusable:
            self.client.keep_alive = self.keep_alive = False
        body = b"" if self.head_only else out
        no_body = resp.status in (204, 304) or 100 <= resp.status < 200
        self._write_head(resp.status, resp.headers.items(), -1 if no_body else len(out))
        if body and not no_body:
            self.client.write(body)
        self.abandon_upstream()
        self._done(resp.status)
        self.client.finished(self, reusable)

    def _release_breaker(self) -> None:
        route = self.route
        ticket, self.breaker_ticket = self.breaker_ticket, None
        if ticket is not None and route is not None and route.breaker is not None:
            route.breaker.release(ticket)

    def _finish_upstream(self, status: int | None, *, released: bool = False, counted: bool = True) -> None:
        """Account for the upstream part once: instance outcome, breaker, bulkhead. ``counted=False``: the
        exchange ended for a reason that says nothing about the upstream (the client left): the instance and the
        breaker permit are given back without an outcome."""
        route = self.route
        if route is None or route.upstream is None or self.attempts == 0:
            return
        self.client.server.exchanges.discard(self)
        if self.instance is not None and not released:
            route.upstream.client.release(self.instance, status, counted=counted)
            self.instance = None
        ticket, self.breaker_ticket = self.breaker_ticket, None
        if ticket is not None and route.breaker is not None:
            if counted:
                route.breaker.on_result(ticket, failed=status is None or status >= 500)
            else:
                route.breaker.release(ticket)
        if route.max_concurrent is not None:
            route.in_flight -= 1
        self.attempts = 0

    def _done(self, status: int) -> None:
        route = self.route
        elapsed = time.perf_counter() - self.req.started
        if self.span is not None:
            spans = self.client.server.spans
            if spans is not None:
                spans.end(self.span, self.req, status)
            self.span = None
        if route is not None:
            for hook in route.done_hooks:
                try:
                    hook(self.req, status, elapsed)
                except Exception:
                    log.exception("gateway: a plugin's done hook failed on route %s", route.name)
            upstream = route.upstream.name if route.upstream is not None else ""
            self.client.server.observer.request_done(route.name, upstream, status, elapsed)
        else:
            self.client.server.observer.request_done("", "", status, elapsed)

    def client_gone(self) -> None:
        """The client closed its connection (or reset its HTTP/2 stream): stop the upstream side of this exchange.
        A client leaving says nothing about the upstream: neither the route's breaker nor outlier detection count
        it (clients that cancel would otherwise open the breaker of a healthy upstream)."""
        if self.up is not None or self.instance is not None:
            self.abandon_upstream()
            self._finish_upstream(None, counted=False)
        self.client.server.exchanges.discard(self)

    def pause_upstream(self, paused: bool) -> None:
        up = self.up
        if up is not None and up.transport is not None and not up.closed:
            if paused:
                up.transport.pause_reading()
            else:
                up.transport.resume_reading()

    def pause_client(self, paused: bool) -> None:
        transport = self.client.transport
        if transport is not None and not self.client.closed:
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()


class _Tunnel:
    """A WebSocket connection past its handshake: the client's and the upstream's connections carry each other's
    bytes, unread, until either closes or nothing crossed for ``websocket_idle_timeout`` seconds. Each direction
    has its own back-pressure (a peer that cannot keep up pauses reading from the other) and half-close."""

    __slots__ = ("closed", "ends", "last", "server")

    def __init__(
        self, server: Server, client: asyncio.Transport, upstream: asyncio.Transport, early: bytes = b""
    ) -> None:
        self.server = server
        self.last = server.now
        self.closed = False
        self.ends = (_TunnelEnd(self, client, upstream), _TunnelEnd(self, upstream, client))
        server.tunnels.add(self)
        client.set_protocol(self.ends[0])
        upstream.set_protocol(self.ends[1])
        if early:
            upstream.write(early)  # (may pause reading from the client, through ends[1].pause_writing)
        if client.is_closing() or upstream.is_closing():
            self.close()
            return
        if not self.ends[1].writing_paused:
            client.resume_reading()  # in case the early frames paused it (see _Exchange.hold)

    def close(self, *, abort: bool = False) -> None:
        """Close both connections: after what is queued to each is written, or (``abort``: the idle timeout, the
        gateway stopping) at once. A tunnel leaves ``server.tunnels`` when both connections are gone, so one
        that cannot flush to a client that stopped reading is aborted by the idle sweep in the end."""
        self.closed = True
        for end in self.ends:
            if abort:
                end.transport.abort()
            elif not end.transport.is_closing():
                end.transport.close()

    def lost(self) -> None:
        if all(end.lost for end in self.ends):
            self.server.tunnels.discard(self)
        else:
            self.close()


class _TunnelEnd(asyncio.Protocol):
    """One side of a :class:`_Tunnel`: what ``transport`` reads goes to ``peer``."""

    __slots__ = ("eof", "lost", "peer", "transport", "tunnel", "writing_paused")

    def __init__(self, tunnel: _Tunnel, transport: asyncio.Transport, peer: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer = peer
        self.eof = False
        self.lost = False
        self.writing_paused = False

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        tunnel.last = tunnel.server.now
        if not tunnel.closed:
            self.peer.write(data)

    def eof_received(self) -> bool:
        """This side will send nothing more: tell the peer (half-close) and keep the other direction open; a TLS
        connection cannot stay half-open, so its end closes the tunnel once the peer has been told."""
        self.eof = True
        ends = self.tunnel.ends
        peer_can = self.peer.can_write_eof()
        if peer_can and not (ends[0].eof and ends[1].eof):
            self.peer.write_eof()
            if self.transport.get_extra_info("ssl_object") is None:
                return True
        self.tunnel.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.lost()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.peer.resume_reading()


class _Held(asyncio.Protocol):
    """A client connection whose WebSocket handshake waits for the upstream's answer: reads go to the exchange's
    early bytes (see :meth:`_Exchange.hold`), a client that leaves ends the exchange as on any connection."""

    __slots__ = ("conn", "exchange")

    def __init__(self, conn: _ClientConn, exchange: _Exchange) -> None:
        self.conn = conn
        self.exchange = exchange

    def data_received(self, data: bytes) -> None:
        self.exchange.hold(data)

    def eof_received(self) -> bool | None:
        return None  # a client that stops sending before the answer has left: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


_KEEP, _DATE, _LENGTH, _CHUNKED, _CONNECTION, _HOP = range(6)  # what the response path does with a header line
_CACHED_LINES = 1024
_MAX_EARLY = 64 * 1024  # bytes kept from a client between its WebSocket handshake and the upstream's answer
_LOW_64 = (1 << 64) - 1
_LOW_BITS = (1 << 64) | 1  # the lowest bit of the trace id and of the span id


def _other_method(raw: bytes) -> str:
    """A method outside the common ones; CONNECT asks for a tunnel (llhttp stops reading after its head), which the
    gateway does not open: it is refused before anything is forwarded."""
    if raw == b"CONNECT":
        raise BadRequest(501, "CONNECT (a tunnel through the gateway) is not supported")
    return raw.decode()


def _line_kind(line: bytes) -> int:
    """What the response path does with an upstream's header line (see :meth:`_Exchange.response_head`)."""
    lname = line.partition(b":")[0].lower()
    if lname == b"date":
        return _DATE
    if lname not in _RESPONSE_SKIP:
        return _KEEP
    if lname == b"content-length":
        return _LENGTH
    if lname == b"transfer-encoding":
        return _CHUNKED
    if lname == b"connection":
        return _CONNECTION
    return _HOP


def _next_traceparent(incoming: str | None, rng: random.Random) -> str:
    """The ``traceparent`` for the upstream: the caller's trace (a new one if it sent none or a malformed one),
    with the gateway's hop as the parent span."""
    # ids as hex through to_bytes().hex(): half the cost of formatting the ints with %x
    if incoming is not None:
        m = _TRACEPARENT.fullmatch(incoming.strip())
        if m is not None and m[1] != "0" * 32 and m[2] != "0" * 16:
            return f"00-{m[1]}-{(rng.getrandbits(64) or 1).to_bytes(8, 'big').hex()}-{m[3]}"
    bits = rng.getrandbits(192)  # trace id (128) and span id (64), neither all zeros
    if not (bits >> 64 and bits & _LOW_64):
        bits |= _LOW_BITS
    ids = bits.to_bytes(24, "big").hex()
    return f"00-{ids[:32]}-{ids[32:]}-01"
