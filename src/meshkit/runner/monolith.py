"""Monolith mode: every service of a system in one process and one event loop.

Each service still gets its own HTTP server and port (so URLs look as in processes mode), and still registers in
the registry; but a call from one service to another goes through an in-process ASGI transport: the same client
API, balancing, resilience and trace propagation, without an HTTP hop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from meshkit import discovery, messaging
from meshkit.client import AsgiTransport
from meshkit.dashboard import LogBuffer, ServiceInfo
from meshkit.runner.edge import front_gateway
from meshkit.runner.observe import edge_rows, resilience_source, system_dashboard, system_tracing
from meshkit.runner.serve import Served, bind, bring_down, bring_up
from meshkit.runner.system import System
from meshkit.runtime import RunContext
from meshkit.tracing.spans import TraceLogFilter

__all__ = ["Ready", "run_monolith"]

#: (service, instance id, URL) of each running instance, for the ready table
Ready = list[tuple[str, str, str]]


async def run_monolith(
    system: System, stop: asyncio.Event, *, host: str = "127.0.0.1", on_ready: Callable[[Ready], None] | None = None
) -> None:
    """Run every service until ``stop`` is set, then stop them gracefully."""
    services = [system.load(name) for name in system.services]
    logs = LogBuffer()
    handler = logs.handler()
    handler.addFilter(TraceLogFilter())  # records carry their trace: the dashboard's logs filter by it
    logging.getLogger().addHandler(handler)  # the dashboard's Logs page: every service runs in this process
    transport = AsgiTransport({s.name: s.asgi for s in services})
    served: list[Served] = []
    try:
        async with (
            messaging.connect(system.broker_url("monolith")) as broker,
            discovery.connect(system.registry_url("monolith")) as registry,
            system_tracing(system, host) as tracing,
        ):
            try:
                for service in services:
                    entry = system.services[service.name]
                    ctx = RunContext(
                        broker=broker,
                        registry=registry,
                        transport=transport,
                        data_dir=system.data_dir(service.name),
                        metadata={"mode": "monolith"},
                        tracer=tracing.tracer(service.name),
                        database_url=system.database_url(),
                    )
                    served.append(await bring_up(service, ctx, host, bind(host, entry.port or 0)))
                started = time.time()
                infos = {
                    s.name: ServiceInfo(s.name, subscriptions=tuple(s.subscriptions), started_at=started)
                    for s in services
                }
                async with (
                    front_gateway(system, registry, tracing.tracer("gateway")) as gateway,
                    resilience_source(gateway, services=services) as resilience,  # read in-process
                    system_dashboard(
                        tracing,
                        host,
                        registry=registry,
                        broker=broker,
                        services=lambda: infos,
                        resilience=resilience,
                        logs=logs,
                        audit_path=system.audit_file,
                        database_url=system.database_url(),
                    ) as dashboard,
                ):
                    if on_ready is not None:
                        rows = [
                            (s.service.name, s.service.instance.id if s.service.instance else "", s.url) for s in served
                        ]
                        on_ready(rows + edge_rows(host, gateway, tracing, dashboard))
                    await stop.wait()
            finally:
                await bring_down(served)
    finally:
        await transport.aclose()
        logging.getLogger().removeHandler(handler)
