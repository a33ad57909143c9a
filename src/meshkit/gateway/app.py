"""The gateway: builds routes, plugins and upstreams from a config, listens, reloads, serves the admin API.

``Gateway(loaded_config, registry=...)`` then ``await gateway.start()``; ``await gateway.reload()`` re-reads
the file (``--watch`` polls it, SIGHUP asks for it); ``await gateway.aclose()`` drains. A reload that fails
validation changes nothing (the error is logged); one that succeeds swaps the routes atomically: requests in
flight finish on the old routes, new requests take the new ones, no connection is dropped. Listen addresses and
the admin port are read at start only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import importlib.util
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from meshkit.client import ClientOptions, ServiceClient
from meshkit.discovery import Instance, Registry, connect
from meshkit.discovery.memory import MemoryRegistry
from meshkit.errors import ConfigurationError
from meshkit.gateway.bff import Aggregation, bff_matcher
from meshkit.gateway.config import (
    BreakerConfig,
    LoadedConfig,
    RouteConfig,
    _Target,
    iter_plugins,
    load_config,
    validate_options,
)
from meshkit.gateway.http2 import alpn_protocols, negotiating
from meshkit.gateway.observe import AccessLog, GatewaySpans, Metrics
from meshkit.gateway.plugin import Plugin, PluginContext, ProxyRequest, Reply
from meshkit.gateway.router import PathMatcher, Router
from meshkit.gateway.server import Limits, Route, Server, Upstream
from meshkit.resilience import BreakerState, CircuitBreaker

__all__ = ["Gateway", "PluginStats", "builtin_plugins"]

log = logging.getLogger(__name__)

_RETIRE_GRACE = 30.0  # seconds an old build stays open after a reload (requests in flight finish with it)
_BUILTIN_MODULES = (
    "meshkit.gateway.auth",
    "meshkit.gateway.ratelimit",
    "meshkit.gateway.access",
    "meshkit.gateway.transform",
    "meshkit.gateway.cache",
)


def builtin_plugins() -> dict[str, type[Plugin]]:
    """The plugins the YAML knows by name."""
    found: dict[str, type[Plugin]] = {AccessLog.name: AccessLog}
    for module_name in _BUILTIN_MODULES:
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Plugin) and value is not Plugin and value.name:
                found[value.name] = value
    return found


@dataclass(frozen=True, slots=True)
class PluginStats:
    """One plugin's ``stats()`` (see :meth:`Gateway.plugin_stats`).

    ``key``: ``name#index`` (the plugin's place in the config, as ``/admin/stats`` names it); ``plugin``: its
    name (``rate_limit``); ``route``: the route (or BFF route) whose ``plugins`` list it is in, ``None`` for a
    global one (every route runs it)."""

    key: str
    plugin: str
    route: str | None
    stats: dict[str, Any]


@dataclass(slots=True)
class _Built:
    """Everything one config load made: dropped as a whole on reload."""

    routes: list[Route]
    plugins: list[Plugin]
    contexts: list[PluginContext]
    clients: set[str]
    bff_clients: list[ServiceClient] = field(default_factory=list)
    owners: list[str | None] = field(default_factory=list)  # the route of each of ``plugins`` (None: global)


class Gateway:
    """One gateway: its listeners, its admin API, its config. See the module docstring."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        registry: Registry | None = None,
        path: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        reuse_port: bool = False,
        admin: bool = True,
        tracer: Any = None,
    ) -> None:
        self.loaded = loaded
        self.tracer = tracer  # an OpenTelemetry tracer: a span per request, BFF calls as its children
        self.path = Path(path) if path is not None else None
        self.clock = clock
        self.reuse_port = reuse_port
        self._registry = registry
        self._owns_registry = registry is None
        self._static = MemoryRegistry()
        self._clients: dict[str, ServiceClient] = {}
        self.metrics = Metrics()
        self.metrics.breaker_states = self._breaker_states
        self.server: Server | None = None
        self.admin_server: Server | None = None
        self._servers: list[asyncio.Server] = []
        self._built: _Built | None = None
        self._with_admin = admin
        self._watch: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self._retired: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()  # ends the retirement grace period of old builds at once
        self._reloads: set[asyncio.Task[bool]] = set()
        self.reloads = 0

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            url = self.loaded.config.registry or "memory://"
            self._registry = connect(url)
        return self._registry

    @property
    def port(self) -> int:
        """The port the gateway listens on (useful with ``port: 0``)."""
        return int(self._servers[0].sockets[0].getsockname()[1])

    @property
    def admin_port(self) -> int | None:
        if self.admin_server is None or len(self._servers) < 2:
            return None
        return int(self._servers[1].sockets[0].getsockname()[1])

    @property
    def routes(self) -> list[Route]:
        return list(self._built.routes) if self._built is not None else []

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, *, watch: bool = False) -> None:
        config = self.loaded.config
        built = await self._build(self.loaded)
        self._built = built
        limits = Limits(**config.limits.model_dump())  # every limit of the config is one of the server's
        trusted = _trusted(config.trusted_proxies)
        tls = _tls_context(config.listen.tls, self.loaded.folder) if config.listen.tls else None
        self.server = Server(
            Router(built.routes),
            limits=limits,
            trusted=trusted,
            observer=self.metrics,
            scheme="https" if tls else "http",
            spans=GatewaySpans(self.tracer) if self.tracer is not None else None,
        )
        loop = asyncio.get_running_loop()
        self.server.start()
        self._servers.append(
            await loop.create_server(
                # HTTP/2 when ALPN chose it, or (h2c) when a cleartext connection starts with HTTP/2's preface
                negotiating(self.server, h2c=config.listen.h2c) if tls or config.listen.h2c else self.server,
                config.listen.host,
                config.listen.port,
                ssl=tls,
                reuse_port=self.reuse_port or None,
                backlog=2048,
            )
        )
        if config.admin is not None and self._with_admin:
            token = config.admin.token or (os.environ.get(config.admin.token_env) if config.admin.token_env else None)
            if not token:
                raise ConfigurationError(
                    "the admin API needs a token",
                    hint="set admin.token, or admin.token_env to the name of an environment variable holding it",
                )
            self.admin_server = Server(Router(self._admin_routes(token)), limits=limits)
            self.admin_server.start()
            self._servers.append(await loop.create_server(self.admin_server, config.admin.host, config.admin.port))
        if watch and self.path is not None:
            self._watch = asyncio.create_task(self._watch_file(), name="meshkit-gateway-watch")
        log.info(
            "gateway listening on %s:%d (%d routes)",
            config.listen.host,
            self.port,
            len(built.routes),
            extra={"port": self.port, "routes": len(built.routes)},
        )

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop listening, let requests in flight finish (up to ``grace`` seconds), close everything."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        for srv in self._servers:
            srv.close()
        for server in (self.server, self.admin_server):
            if server is not None:
                await server.drain(grace)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        self._servers.clear()
        for reload in list(self._reloads):
            reload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reload
        # builds kept for a grace period after a reload are disposed of now, not left open
        self._closing.set()
        for retire in list(self._retired):
            try:
                await retire
            except Exception:
                log.exception("gateway: closing what an earlier config made failed")
        if self._built is not None:
            await self._dispose(self._built, set())
            self._built = None
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        await self._static.aclose()
        if self._owns_registry and self._registry is not None:
            await self._registry.aclose()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- reload ----------------------------------------------------------------------------------------------

    async def reload(self, loaded: LoadedConfig | None = None) -> bool:
        """Apply a new config (default: re-read :attr:`path`). False (and the old config kept) when it is not
        valid; the error is logged."""
        async with self._reloading:
            if loaded is None and self.path is None:
                log.error("gateway reload: this gateway was not started from a file")
                return False
            try:
                loaded = loaded if loaded is not None else load_config(self.path)  # type: ignore[arg-type]
                built = await self._build(loaded)
            except ConfigurationError as exc:
                log.error(  # noqa: TRY400 - the message is the whole story; no traceback wanted
                    "gateway reload refused, the running config stays: %s", exc, extra={"error": str(exc)}
                )
                return False
            old = self._built
            self._built = built
            self.loaded = loaded
            if self.server is not None:
                self.server.router = Router(built.routes)  # atomic: the next request head sees the new routes
            self.reloads += 1
            log.info("gateway config reloaded (%d routes)", len(built.routes), extra={"routes": len(built.routes)})
            if old is not None:
                task = asyncio.create_task(self._retire(old, built.clients), name="meshkit-gateway-retire")
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
            return True

    async def _retire(self, old: _Built, keep: set[str]) -> None:
        """Close what the old config made once requests in flight had time to finish with it (or at once when
        the gateway closes)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_RETIRE_GRACE):
                await self._closing.wait()
        await self._dispose(old, keep)

    async def _dispose(self, built: _Built, keep: set[str]) -> None:
        for context in built.contexts:
            for closer in context.resources:
                try:
                    await closer()
                except Exception:
                    log.exception("gateway: closing a plugin failed")
        for client in built.bff_clients:
            await client.aclose()
        for key in built.clients - keep:
            if key in self._clients:
                await self._clients.pop(key).aclose()

    async def _watch_file(self) -> None:
        assert self.path is not None
        last = _mtime(self.path)
        while True:
            await asyncio.sleep(1.0)
            now = _mtime(self.path)
            if now != last:
                last = now
                await self.reload()

    def request_reload(self) -> None:
        """Ask for a reload from a signal handler (SIGHUP)."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="meshkit-gateway-reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    # -- building --------------------------------------------------------------------------------------------

    async def _build(self, loaded: LoadedConfig) -> _Built:
        config = loaded.config
        kinds = builtin_plugins()
        contexts: list[PluginContext] = []
        plugins: list[Plugin] = []
        built = _Built([], plugins, contexts, set())
        try:
            global_plugins = self._plugins(loaded, ("plugins",), config.plugins, None, kinds, built)
            for index, spec in enumerate(config.routes):
                built.routes.append(await self._route(loaded, index, spec, global_plugins, kinds, built))
            for index, bff in enumerate(config.bff):
                route_plugins = self._plugins(loaded, ("bff", index, "plugins"), bff.plugins, bff.name, kinds, built)
                clients: dict[str, ServiceClient] = {}
                for name, call in bff.calls.items():
                    client = ServiceClient(
                        call.service or await self._static_service(call),
                        self.registry if call.service else self._static,
                        tracer=self.tracer,
                    )
                    built.bff_clients.append(client)
                    clients[name] = client
                aggregation = Aggregation(bff, clients)
                route = Route(
                    bff.name,
                    bff_matcher(bff),
                    handler=aggregation,
                    methods=frozenset(m.upper() for m in bff.methods),
                    plugins=tuple(route_plugins),
                    timeout=bff.timeout,
                )
                built.routes.append(route.compile(global_plugins))
        except ConfigurationError as exc:
            await self._dispose(built, set(self._clients))
            if exc.__cause__ is None and loaded.source not in str(exc):
                raise ConfigurationError(f"{loaded.source}: {exc}", hint=exc.hint) from None
            raise
        except BaseException:  # cancelled too (a reload the gateway's closing cancels): nothing made is left open
            await self._dispose(built, set(self._clients))
            raise
        return built

    def _plugins(
        self,
        loaded: LoadedConfig,
        loc: tuple[str | int, ...],
        items: list[dict[str, dict[str, Any] | None]],
        route: str | None,
        kinds: Mapping[str, type[Plugin]],
        built: _Built,
    ) -> list[Plugin]:
        out: list[Plugin] = []
        try:
            entries = list(iter_plugins(items))
        except ValueError as exc:
            raise ConfigurationError(f"{loaded.where(loc)}: {exc}") from None
        for index, name, options in entries:
            here = (*loc, index, name)
            cls = kinds.get(name) or _custom_plugin(name, loaded.where(here))
            if cls is None:
                known = ", ".join(sorted(kinds))
                raise ConfigurationError(
                    f"{loaded.where(here)}: unknown plugin {name!r}", hint=f"built-in plugins: {known}; or module:Class"
                )
            validated: BaseModel = validate_options(loaded, here, cls.Options, options)
            context = PluginContext(
                clock=self.clock, redis_url=loaded.config.redis, route=route, folder=str(loaded.folder)
            )
            built.contexts.append(context)
            try:
                plugin = cls(validated, context)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{loaded.where(here)}: {name}: {exc}", hint=exc.hint) from None
            except ValueError as exc:
                raise ConfigurationError(f"{loaded.where(here)}: {name}: {exc}") from None
            out.append(plugin)
            built.plugins.append(plugin)
            built.owners.append(route)
        return out

    async def _route(
        self,
        loaded: LoadedConfig,
        index: int,
        spec: RouteConfig,
        global_plugins: list[Plugin],
        kinds: Mapping[str, type[Plugin]],
        built: _Built,
    ) -> Route:
        where = loaded.where(("routes", index))
        try:
            matcher = PathMatcher.build(
                exact=spec.exact,
                prefix=spec.path,
                template=spec.template,
                case_insensitive=spec.case_insensitive,
                rewrite=spec.rewrite,
            )
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: routes[{index}] ({spec.name}): {exc}") from None
        conditions: list[tuple[str, re.Pattern[str] | None]] = []
        for name, value in spec.headers.items():
            if value.startswith("~"):
                try:
                    conditions.append((name.lower(), re.compile(value[1:])))
                except re.error as exc:
                    raise ConfigurationError(f"{where}: header condition {name}: bad pattern: {exc}") from None
            else:
                conditions.append((name.lower(), re.compile(re.escape(value))))
        key, client = await self._client(spec)
        built.clients.add(key)
        route_plugins = self._plugins(loaded, ("routes", index, "plugins"), spec.plugins, spec.name, kinds, built)
        route = Route(
            spec.name,
            matcher,
            upstream=Upstream(spec.service or ",".join(t.address for t in spec.targets or ()), client),
            hosts=frozenset(h.lower() for h in spec.hosts) if spec.hosts else None,
            methods=frozenset(spec.methods) if spec.methods else None,
            headers=tuple(conditions),
            plugins=tuple(route_plugins),
            timeout=spec.timeout,
            retries=spec.retries,
            breaker=_breaker(spec.name, spec.breaker) if spec.breaker is not False else None,
            max_concurrent=spec.max_concurrent,
            max_body=spec.max_body,
            preserve_host=spec.preserve_host,
            websocket=spec.websocket,
        )
        return route.compile(global_plugins)

    async def _client(self, target: _Target) -> tuple[str, ServiceClient]:
        """One client per (service or target list, balancer), kept across reloads while routes use it."""
        if target.service is not None:
            key = f"service:{target.service}:{target.balancer}"
        else:
            key = f"static:{_static_name(target)}:{target.balancer}"
        client = self._clients.get(key)
        if client is None:
            options = ClientOptions(balancer=target.balancer, retry=None, breaker=None, bulkhead=None)
            if target.service is not None:
                client = ServiceClient(target.service, self.registry, options=options)
            else:
                client = ServiceClient(await self._static_service(target), self._static, options=options)
            self._clients[key] = client
            with contextlib.suppress(Exception):
                await client.start(timeout=2.0)  # not fatal: the watch keeps trying; requests get 503 meanwhile
        return key, client

    async def _static_service(self, target: _Target) -> str:
        """The static targets as instances of a service of the gateway's own registry (weights as the ``weight``
        metadata the balancers honour); its name says the addresses and weights, so it is registered once."""
        name = _static_name(target)
        for t in target.targets or ():
            host, _, port = t.address.rpartition(":")
            metadata = {"weight": repr(t.weight)} if t.weight != 1 else {}
            instance = Instance(name, t.address, host.strip("[]"), int(port), metadata=metadata)
            if not any(i.id == t.address for i in await self._static.list(name, healthy_only=False)):
                await self._static.register(instance, ttl=10 * 365 * 86400.0, keepalive=False)
        return name

    def plugin_stats(self) -> list[PluginStats]:
        """The ``stats()`` of every plugin of the current config that has them (rate limits, caches...), in
        config order: global plugins first, then each route's. What ``/admin/stats`` serves."""
        built = self._built
        if built is None:
            return []
        out = []
        for index, (plugin, route) in enumerate(zip(built.plugins, built.owners, strict=True)):
            stats = getattr(plugin, "stats", None)
            if callable(stats):
                out.append(PluginStats(f"{plugin.name}#{index}", plugin.name, route, stats()))
        return out

    def _breaker_states(self) -> list[tuple[str, int]]:
        states = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
        return [(r.name, states[r.breaker.state]) for r in self.routes if r.breaker is not None]

    # -- the admin API ---------------------------------------------------------------------------------------

    def _admin_routes(self, token: str) -> list[Route]:
        expected = f"Bearer {token}".encode()

        def guarded(handler: Callable[[ProxyRequest, bytes], Awaitable[Reply]]) -> Any:
            async def check(req: ProxyRequest, body: bytes) -> Reply:
                given = (req.headers.get("authorization") or "").encode()
                if not hmac.compare_digest(given, expected):
                    return Reply.error(401, "the admin API needs Authorization: Bearer <admin token>")
                return await handler(req, body)

            return check

        handlers: dict[str, tuple[str, Callable[[ProxyRequest, bytes], Awaitable[Reply]]]] = {
            "/metrics": ("GET", self._admin_metrics),
            "/admin/routes": ("GET", self._admin_list_routes),
            "/admin/upstreams": ("GET", self._admin_upstreams),
            "/admin/breakers": ("GET", self._admin_breakers),
            "/admin/stats": ("GET", self._admin_stats),
            "/admin/cache/purge": ("POST", self._admin_purge),
            "/admin/reload": ("POST", self._admin_reload),
        }
        return [
            Route(path, PathMatcher.build(exact=path), handler=guarded(fn), methods=frozenset({method})).compile()
            for path, (method, fn) in handlers.items()
        ]

    async def _admin_metrics(self, req: ProxyRequest, body: bytes) -> Reply:
        reply = Reply(200, body=self.metrics.render())
        reply.headers.set("content-type", "text/plain; version=0.0.4; charset=utf-8")
        return reply

    async def _admin_list_routes(self, req: ProxyRequest, body: bytes) -> Reply:
        out = []
        for r in self.routes:
            out.append(
                {
                    "name": r.name,
                    "path": {r.path.kind: r.path.path},
                    "methods": sorted(r.methods) if r.methods else None,
                    "hosts": sorted(r.hosts) if r.hosts else None,
                    "upstream": r.upstream.name if r.upstream is not None else None,
                    "kind": "aggregation" if r.handler is not None else "proxy",
                    "plugins": [p.name for p in r.plugins],
                    "timeout": r.timeout,
                    "retries": r.retries,
                    "max_concurrent": r.max_concurrent,
                    "in_flight": r.in_flight if r.max_concurrent is not None else None,  # counted only then
                    "stats": {"bulkhead_full": 0, **r.stats},
                }
            )
        return Reply.json(200, {"routes": out, "reloads": self.reloads})

    async def _admin_upstreams(self, req: ProxyRequest, body: bytes) -> Reply:
        out = []
        seen: set[int] = set()
        for r in self.routes:
            if r.upstream is None or id(r.upstream.client) in seen:
                continue
            seen.add(id(r.upstream.client))
            client = r.upstream.client
            rotation = {i.id for i in client.rotation} if client.ready else set()
            registered = await client.registry.list(client.service, healthy_only=False) if client.ready else []
            out.append(
                {
                    "upstream": r.upstream.name,
                    "ready": client.ready,
                    "instances": [
                        {
                            "id": i.id,
                            "address": i.address,
                            "status": str(i.status),
                            "in_rotation": i.id in rotation,
                            "outstanding": client.outstanding.get(i.id, 0),
                        }
                        for i in registered
                    ],
                }
            )
        return Reply.json(200, {"upstreams": out})

    async def _admin_breakers(self, req: ProxyRequest, body: bytes) -> Reply:
        out = {}
        for r in self.routes:
            if r.breaker is not None:
                m = r.breaker.metrics()
                out[r.name] = {
                    "state": str(m.state),
                    "failure_rate": m.failure_rate,
                    "calls": m.calls,
                    "failed": m.failed_calls,
                    "not_permitted": m.not_permitted_calls,
                }
        return Reply.json(200, {"breakers": out})

    async def _admin_stats(self, req: ProxyRequest, body: bytes) -> Reply:
        return Reply.json(200, {"plugins": {s.key: s.stats for s in self.plugin_stats()}})

    async def _admin_purge(self, req: ProxyRequest, body: bytes) -> Reply:
        prefix = None
        for part in req.query.split("&"):
            key, _, value = part.partition("=")
            if key == "prefix" and value:
                from urllib.parse import unquote  # noqa: PLC0415

                prefix = unquote(value)
        removed = 0
        built = self._built
        for plugin in built.plugins if built is not None else []:
            purge = getattr(plugin, "purge", None)
            if callable(purge):
                removed += await purge(prefix)
        return Reply.json(200, {"purged": removed})

    async def _admin_reload(self, req: ProxyRequest, body: bytes) -> Reply:
        if await self.reload():
            return Reply.json(200, {"reloaded": True, "routes": len(self.routes)})
        return Reply.error(422, "the config file is not valid; the running config stays (see the gateway's log)")


def _static_name(target: _Target) -> str:
    """``static-10.0.0.1_80-10.0.0.2_80w3``: the service the static targets of ``target`` make."""
    parts = []
    for t in target.targets or ():
        weight = "" if t.weight == 1 else str(int(t.weight)) if t.weight.is_integer() else repr(t.weight)
        parts.append(t.address.replace(":", "_") + (f"w{weight}" if weight else ""))
    return "static-" + "-".join(parts)


def _breaker(route: str, spec: BreakerConfig) -> CircuitBreaker:
    return CircuitBreaker(
        name=f"route {route}",
        failure_rate_threshold=spec.failure_rate,
        window_size=spec.window,
        minimum_calls=min(spec.minimum_calls, spec.window),
        wait_in_open=spec.wait,
        half_open_calls=spec.half_open_calls,
    )


def _trusted(networks: list[str]) -> Any:
    if not networks:
        return None
    from meshkit.gateway.forwarded import TrustedProxies  # noqa: PLC0415

    return TrustedProxies(networks)


def _tls_context(spec: Any, folder: Path) -> ssl.SSLContext:
    def resolve(name: str) -> str:
        p = Path(name)
        return str(p if p.is_absolute() else folder / p)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(resolve(spec.cert), resolve(spec.key))
        if spec.client_ca:
            context.load_verify_locations(resolve(spec.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED if spec.require_client_cert else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the gateway's TLS files: {exc}") from exc
    context.set_alpn_protocols(alpn_protocols())  # ["h2", "http/1.1"]
    return context


def _custom_plugin(name: str, where: str) -> type[Plugin] | None:
    if ":" not in name:
        return None
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"{where}: cannot import plugin module {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise ConfigurationError(f"{where}: {name!r} is not a meshkit.gateway.Plugin subclass")
    return cls


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
