"""The dashboard: a web UI over a running system, served by the runtime, that works offline (no CDN, nothing fetched
from outside).

::

    logs = LogBuffer()
    logging.getLogger().addHandler(logs.handler())
    dashboard = DashboardApp(store, registry=registry, services=lambda: infos, broker=broker, logs=logs)
    # serve it: uvicorn.Config(dashboard, lifespan="on"), or Mount("/dashboard", app=dashboard) in another app
    ...
    await dashboard.aclose()

Pages (one static page, hash routes): Services, Traces (search, waterfall, flame chart, critical path, span
details), Topology (the service map: solid lines for calls, dashed for messages, with calls per second and error
rates over a chosen window), Resilience (circuit breakers of the gateway's routes and of every service's clients,
their recent transitions, the calls bulkheads and rate limits refused), Messaging (topics, consumer groups, dead
letters with replay / discard), Sagas (every saga with its step log and compensations, and the projections with
their lag: :class:`DataSource`, read from the services' database), Logs (filters and live tail). The JSON API
under ``/api/`` is documented in docs/dashboard.md, with the page's element ids.

The runner composes the dashboard from what it runs: the dashboard reads the trace store, the registry, the broker,
a resilience source (the runner's: the gateway's policies and each service's ``/_meshkit/resilience``) and a
:class:`LogBuffer`, and never imports the runner.
"""

from __future__ import annotations

from meshkit.dashboard._app import ASSETS, DashboardApp, ResilienceSource, ServicesSource
from meshkit.dashboard._data import DataSource
from meshkit.dashboard._logs import LEVELS, LogBuffer, LogEntry, LogPage
from meshkit.dashboard._model import ServiceInfo, TraceTree, critical_path, endpoints_from_openapi, topology
from meshkit.dashboard.audit import AuditEntry

__all__ = [
    "ASSETS",
    "LEVELS",
    "AuditEntry",
    "DashboardApp",
    "DataSource",
    "LogBuffer",
    "LogEntry",
    "LogPage",
    "ResilienceSource",
    "ServiceInfo",
    "ServicesSource",
    "TraceTree",
    "critical_path",
    "endpoints_from_openapi",
    "topology",
]
