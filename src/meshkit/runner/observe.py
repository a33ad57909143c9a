"""Tracing for a running system: the built-in collector, and a tracer provider per service.

With ``tracing.enabled`` (the default) and no ``tracing.endpoint``, ``meshkit run`` starts the built-in collector
in its own process (an OTLP/HTTP receiver over a SQLite store, ``.meshkit/traces.db``) and every service, the
gateway included, exports its spans there; with an endpoint (Jaeger, Tempo, any OpenTelemetry collector), they
export there instead and no collector is started. Children of processes mode learn the endpoint from the
``MESHKIT_TRACING__ENDPOINT`` variable the supervisor sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

from meshkit._core.database import connect_database
from meshkit._core.optional import require
from meshkit._core.serving import bind, serve_asgi
from meshkit._core.urls import redact
from meshkit.client import ServiceClient
from meshkit.discovery import Instance, Registry
from meshkit.errors import MeshkitError
from meshkit.messaging import Broker
from meshkit.runner.system import System
from meshkit.runtime import Service
from meshkit.runtime.metrics import BreakerGroup, PolicyLog, Watchable, breaker_json, client_policies, client_watches
from meshkit.runtime.service import RESILIENCE_PATH

if TYPE_CHECKING:
    from pathlib import Path

    from meshkit.gateway import Gateway
    from meshkit.gateway.server import Route

__all__ = [
    "GatewayPolicies",
    "Tracing",
    "edge_rows",
    "resilience_source",
    "system_dashboard",
    "system_tracing",
]

log = logging.getLogger(__name__)


@dataclass
class Tracing:
    """Where spans go (``endpoint``: an OTLP endpoint for ``protocol``, ``None``: tracing off) and the collector's
    store when this process runs the built-in one."""

    endpoint: str | None
    sample_ratio: float = 1.0
    _: KW_ONLY  # the rest by name: positions once sent a store where the protocol goes
    protocol: str = "http/protobuf"
    headers: Mapping[str, str] = field(default_factory=dict)
    store: Any = None  # meshkit.tracing.collector.TraceStore of the built-in collector
    collector_url: str | None = None
    _providers: list[Any] = field(default_factory=list)

    def tracer(self, service: str) -> Any:
        """A tracer whose spans carry ``service.name = service`` (``None`` when tracing is off)."""
        if self.endpoint is None:
            return None
        from meshkit.tracing.spans import provider  # noqa: PLC0415 - OpenTelemetry loads only when tracing is on

        made = provider(
            service,
            endpoint=self.endpoint,
            protocol=self.protocol,
            headers=self.headers,
            sample_ratio=self.sample_ratio,
        )
        self._providers.append(made)
        return made.get_tracer("meshkit")

    async def flush(self) -> None:
        """Export what the providers still hold and stop them (at the end of a run)."""
        providers, self._providers = self._providers, []
        for made in providers:
            try:
                made.shutdown()  # flushes the batch processor (bounded by the exporter's timeout)
            except Exception:
                log.exception("a tracer provider did not shut down cleanly")


@contextlib.asynccontextmanager
async def system_tracing(system: System, host: str, *, collector: bool = True) -> AsyncIterator[Tracing]:
    """The system's tracing for the duration of the block: the built-in collector when it is the destination
    (and ``collector`` is true: the supervisor runs it, children only export)."""
    settings = system.settings.tracing
    if not settings.enabled:
        yield Tracing(None)
        return
    if settings.endpoint is not None or not collector:
        tracing = Tracing(
            settings.endpoint, settings.sample_ratio, protocol=settings.protocol, headers=settings.headers
        )
        try:
            yield tracing
        finally:
            await tracing.flush()
        return
    from meshkit.tracing.collector import TraceStore  # noqa: PLC0415
    from meshkit.tracing.receiver import serve_collector  # noqa: PLC0415

    system.state_dir.mkdir(parents=True, exist_ok=True)
    store = await TraceStore.open(system.state_dir / "traces.db")
    try:
        server = await serve_collector(host, 0, store)
        tracing = Tracing(server.traces_endpoint, settings.sample_ratio, store=store, collector_url=server.url)
        try:
            yield tracing
        finally:
            await tracing.flush()
            await server.aclose()
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def system_dashboard(
    tracing: Tracing,
    host: str,
    *,
    registry: Registry,
    broker: Broker | None,
    services: Callable[[], Mapping[str, Any]],
    resilience: Callable[[], Awaitable[ResilienceReport]] | None,
    logs: Any,
    audit_path: Path | None = None,
    database_url: str | None = None,
) -> AsyncIterator[str | None]:
    """Serve the dashboard (its URL; ``None`` without the built-in collector's store, which it reads traces from)
    for the duration of the block. Its dead-letter audit is kept in ``audit_path`` (the runner's
    ``.meshkit/audit.jsonl``), so it outlives the run."""
    if tracing.store is None:
        yield None
        return
    from meshkit.dashboard import DashboardApp, DataSource  # noqa: PLC0415 - the web framework loads when needed

    database = None
    if database_url is not None:
        try:
            database = await connect_database(database_url)
        except MeshkitError as exc:  # the dashboard still shows everything else
            log.warning("the dashboard cannot read sagas and projections: %s", exc, extra={"url": redact(database_url)})
    app = DashboardApp(
        tracing.store,
        registry=registry,
        services=services,
        broker=broker,
        resilience=resilience,
        logs=logs,
        audit_path=audit_path,
        data=DataSource(database) if database is not None else None,
    )
    try:
        serving = await serve_asgi(app, bind(host, 0, what="the dashboard"), "the dashboard", lifespan="on")
        try:
            yield serving.url
        finally:
            await serving.aclose()
    finally:
        if database is not None:
            await database.aclose()


class GatewayPolicies:
    """The gateway's resilience as dashboard rows: its route breakers and ``max_concurrent`` refusals, the breakers
    and bulkheads of its BFF clients, and its ``rate_limit`` plugins' refusals (:meth:`Gateway.plugin_stats`, what
    the admin API's ``/admin/stats`` serves).

    Breaker transitions and rejection times are recorded from the moment a policy is first seen: :meth:`rows`
    looks for new ones (a reload builds new routes) before it reads. :meth:`close` stops listening.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.log = PolicyLog()
        self._watched: dict[int, tuple[object, Callable[[], None]]] = {}  # id(policy) -> (policy, unsubscribe)
        self.refresh()

    def _policies(self) -> list[tuple[str, Watchable | BreakerGroup]]:
        out: list[tuple[str, Watchable | BreakerGroup]] = []
        for route in self.gateway.routes:
            if route.breaker is not None:
                out.append((f"route {route.name}", route.breaker))
            clients = _bff_clients(route)
            if clients:
                out.extend(client_watches(f"bff {route.name}: ", clients))
        return out

    def refresh(self) -> None:
        """Listen to the policies of the current routes, and no longer to those a reload dropped."""
        current = {id(policy): (key, policy) for key, policy in self._policies()}
        for pid in [pid for pid in self._watched if pid not in current]:
            _, unsubscribe = self._watched.pop(pid)
            unsubscribe()
        for pid, (key, policy) in current.items():
            if pid not in self._watched:
                self._watched[pid] = (policy, self.log.watch(key, policy))
        self.log.retain({key for key, _ in current.values()})

    def close(self) -> None:
        watched, self._watched = self._watched, {}
        for _, unsubscribe in watched.values():
            unsubscribe()

    def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(breakers, rejections)``: rows shaped as a service's ``/_meshkit/resilience`` ones, ``service``
        ``gateway``."""
        self.refresh()
        breakers: list[dict[str, Any]] = []
        rejections: list[dict[str, Any]] = []
        for route in self.gateway.routes:
            where = {"service": "gateway", "instance": None, "route": route.name}
            if route.breaker is not None:
                breakers.append(
                    breaker_json(f"route {route.name}", route.breaker, self.log, name=route.name, kind="route", **where)
                )
            clients = _bff_clients(route)
            if clients:
                more, refused = client_policies(f"bff {route.name}: ", clients, self.log, kind="bff client", **where)
                breakers.extend(more)
                rejections.extend(refused)
        return breakers, rejections + _route_bulkheads(self.gateway) + _rate_limits(self.gateway)


def _bff_clients(route: Route) -> Mapping[str, ServiceClient] | None:
    """The clients of a BFF route's aggregation (by call name); ``None`` for a proxied route."""
    clients = getattr(route.handler, "clients", None)
    return clients if isinstance(clients, Mapping) else None


def _rate_limits(gateway: Gateway) -> list[dict[str, Any]]:
    """A row per ``rate_limit`` plugin (from :meth:`Gateway.plugin_stats`, as ``/admin/stats``): requests refused
    (``count``) and let through (``allowed``); ``route`` None for a global plugin (every route runs it)."""
    return [
        {
            "service": "gateway",
            "instance": None,
            "route": entry.route,
            "policy": "rate_limit",
            "kind": "rate_limited",
            "count": entry.stats.get("limited", 0),
            "allowed": entry.stats.get("allowed", 0),
            "last": None,
            "backend": entry.stats.get("backend"),
        }
        for entry in gateway.plugin_stats()
        if entry.plugin == "rate_limit"
    ]


def _route_bulkheads(gateway: Gateway) -> list[dict[str, Any]]:
    """A row per route with ``max_concurrent``: the requests it refused with 503 because that many were in flight
    (shaped as a client bulkhead's row)."""
    return [
        {
            "service": "gateway",
            "instance": None,
            "route": route.name,
            "policy": f"route {route.name} max_concurrent",
            "kind": "bulkhead_full",
            "count": route.stats.get("bulkhead_full", 0),
            "last": None,
            "in_flight": route.in_flight,
            "waiting": 0,
            "limit": route.max_concurrent,
        }
        for route in gateway.routes
        if route.max_concurrent is not None
    ]


ResilienceReport = dict[str, Any]


@contextlib.asynccontextmanager
async def resilience_source(
    gateway: Gateway | None,
    *,
    services: Sequence[Service] = (),
    registry: Registry | None = None,
    names: Sequence[str] = (),
    timeout: float = 2.0,
) -> AsyncIterator[Callable[[], Awaitable[ResilienceReport]]]:
    """The dashboard's resilience source for the duration of the block: the gateway's rows
    (:class:`GatewayPolicies`) and every service instance's :meth:`~meshkit.runtime.Service.resilience_report`,
    read in-process from ``services`` (monolith mode) or fetched from ``/_meshkit/resilience`` of every instance
    the ``registry`` lists for ``names`` (processes mode: the instances are other processes), ``timeout`` seconds
    each. An instance that does not answer is an ``errors`` row; the others still show."""
    policies = GatewayPolicies(gateway) if gateway is not None else None
    session: Any = None

    async def fetch(instance: Instance) -> ResilienceReport:
        async with session.get(f"http://{instance.address}{RESILIENCE_PATH}") as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            report = await response.json()
        if not isinstance(report, dict):
            raise ValueError("the answer is not a JSON object")  # noqa: TRY004 - reported as a row, not raised
        return report

    async def remote() -> tuple[list[ResilienceReport], list[dict[str, Any]]]:
        assert registry is not None
        instances = [i for name in names for i in await registry.list(name, healthy_only=False)]
        answers = await asyncio.gather(*(fetch(i) for i in instances), return_exceptions=True)
        reports: list[ResilienceReport] = []
        errors: list[dict[str, Any]] = []
        for instance, answer in zip(instances, answers, strict=True):
            if isinstance(answer, Exception):
                text = str(answer) or type(answer).__name__
                errors.append(
                    {"service": instance.service, "instance": instance.id, "address": instance.address, "error": text}
                )
            elif isinstance(answer, BaseException):
                raise answer
            else:
                reports.append(answer)
        return reports, errors

    async def source() -> ResilienceReport:
        reports = [s.resilience_report() for s in services]
        errors: list[dict[str, Any]] = []
        if session is not None:
            fetched, errors = await remote()
            reports += fetched
        breakers, rejections = policies.rows() if policies is not None else ([], [])
        for report in sorted(reports, key=lambda r: (str(r.get("service")), str(r.get("instance")))):
            breakers += report.get("breakers", [])
            rejections += report.get("rejections", [])
        return {"breakers": breakers, "rejections": rejections, "errors": errors}

    try:
        if registry is not None and names:
            aiohttp = require("aiohttp", "service")
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        yield source
    finally:
        if policies is not None:
            policies.close()
        if session is not None:
            await session.close()


def edge_rows(host: str, gateway: Any, tracing: Tracing, dashboard: str | None) -> list[tuple[str, str, str]]:
    """The ready table's rows after the services: the gateway, the collector's query API, the dashboard."""
    rows = []
    if gateway is not None:
        rows.append(("gateway", "", f"http://{host}:{gateway.port}"))
    if tracing.collector_url is not None:
        rows.append(("traces", "", f"{tracing.collector_url}/api/traces"))
    if dashboard is not None:
        rows.append(("dashboard", "", dashboard))
    return rows
