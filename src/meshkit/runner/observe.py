"""Tracing for a running system: the built-in collector, and a tracer provider per service.

With ``tracing.enabled`` (the default) and no ``tracing.endpoint``, ``meshkit run`` starts the built-in collector
in its own process (an OTLP/HTTP receiver over a SQLite store, ``.meshkit/traces.db``) and every service, the
gateway included, exports its spans there; with an endpoint (Jaeger, Tempo, any OpenTelemetry collector), they
export there instead and no collector is started. Children of processes mode learn the endpoint from the
``MESHKIT_TRACING__ENDPOINT`` variable the supervisor sets.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshkit._core.serving import bind, serve_asgi
from meshkit.discovery import Registry
from meshkit.messaging import Broker
from meshkit.runner.system import System

__all__ = ["Tracing", "breaker_rows", "edge_rows", "system_dashboard", "system_tracing"]

log = logging.getLogger(__name__)


@dataclass
class Tracing:
    """Where spans go (``endpoint``: an OTLP/HTTP traces URL, ``None``: tracing off) and the collector's store when
    this process runs the built-in one."""

    endpoint: str | None
    sample_ratio: float = 1.0
    store: Any = None  # meshkit.tracing.collector.TraceStore of the built-in collector
    collector_url: str | None = None
    _providers: list[Any] = field(default_factory=list)

    def tracer(self, service: str) -> Any:
        """A tracer whose spans carry ``service.name = service`` (``None`` when tracing is off)."""
        if self.endpoint is None:
            return None
        from meshkit.tracing.spans import provider  # noqa: PLC0415 - OpenTelemetry loads only when tracing is on

        made = provider(service, endpoint=self.endpoint, sample_ratio=self.sample_ratio)
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
        tracing = Tracing(settings.endpoint, settings.sample_ratio)
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
        tracing = Tracing(server.traces_endpoint, settings.sample_ratio, store, server.url)
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
    resilience: Callable[[], Awaitable[list[dict[str, Any]]]] | None,
    logs: Any,
) -> AsyncIterator[str | None]:
    """Serve the dashboard (its URL; ``None`` without the built-in collector's store, which it reads traces from)
    for the duration of the block."""
    if tracing.store is None:
        yield None
        return
    from meshkit.dashboard import DashboardApp  # noqa: PLC0415 - the web framework loads only when needed

    app = DashboardApp(
        tracing.store, registry=registry, services=services, broker=broker, resilience=resilience, logs=logs
    )
    serving = await serve_asgi(app, bind(host, 0, what="the dashboard"), "the dashboard", lifespan="on")
    try:
        yield serving.url
    finally:
        await serving.aclose()


def breaker_rows(gateway: Any) -> Callable[[], Awaitable[list[dict[str, Any]]]] | None:
    """The dashboard's resilience source: the gateway's route breakers (``None`` without a gateway)."""
    if gateway is None:
        return None

    async def rows() -> list[dict[str, Any]]:
        out = []
        for route in gateway.routes:
            if route.breaker is None:
                continue
            m = route.breaker.metrics()
            out.append(
                {
                    "name": route.name,
                    "kind": "gateway route",
                    "state": str(m.state),
                    "failure_rate": m.failure_rate,
                    "calls": m.calls,
                    "failed": m.failed_calls,
                    "not_permitted": m.not_permitted_calls,
                }
            )
        return out

    return rows


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
