"""One service: its HTTP app, its message handlers, its clients to other services, its lifecycle and health.

A :class:`Service` is declared at import time (routes, handlers, clients) and does nothing until a runner starts
it with a :class:`RunContext`: the broker, the registry and the transport its clients use. The lifecycle::

    await service.start(ctx)          # on_start hooks, clients, message subscriptions
    ... the runner serves service.asgi on a port ...
    await service.register(host, port)  # join the registry (a TTL lease, heartbeated)
    ... running ...
    await service.deregister()        # leave the registry first: clients stop choosing this instance
    ... the runner stops the HTTP server, which finishes the requests in flight ...
    await service.stop()              # subscriptions drain their handlers, on_stop hooks, clients close

``service.asgi`` is the app to serve: ``/healthz`` (liveness: the process answers), ``/readyz`` (readiness:
started, registered, broker open, every readiness check passing), ``/metrics`` (Prometheus) and
``/_meshkit/resilience`` (its clients' breakers, their recent transitions and the calls their bulkheads refused,
as JSON: :meth:`Service.resilience_report`) in front of the service's own app, and every
request runs inside the trace context its ``traceparent`` header carries, so the calls and messages it makes
join the caller's trace.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from meshkit._core.database import Database, connect_database
from meshkit._core.optional import require
from meshkit.client import ClientOptions, Response, ServiceClient, Transport
from meshkit.discovery import Instance, Lease, Registry
from meshkit.errors import ConfigurationError, MissingDependency
from meshkit.messaging import Broker, Message, Subscription, SubscriptionOptions
from meshkit.runtime.data import DataPatterns, EventsHandle, OutboxHandle, ProjectionsHandle, SagasHandle
from meshkit.runtime.metrics import DLQ_COUNT_LIMIT, PolicyLog, ServiceMetrics, client_policies, client_watches
from meshkit.tracing import TRACE_HEADERS, extracted
from meshkit.tracing.spans import current_links, server_span, span, status_code_error

if TYPE_CHECKING:
    from fastapi import FastAPI

    from meshkit.projections import Projection
    from meshkit.saga import Saga

__all__ = ["RESILIENCE_PATH", "Downstream", "RunContext", "Service"]

log = logging.getLogger("meshkit.runtime")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]
Check = Callable[[], Awaitable[None]]
MessageHandler = Callable[[Message], Awaitable[None]]
H = TypeVar("H", bound=Callable[..., Awaitable[None]])
D = TypeVar("D")

#: Where every service answers :meth:`Service.resilience_report` as JSON.
RESILIENCE_PATH = "/_meshkit/resilience"
_OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", RESILIENCE_PATH})


@dataclass(frozen=True)
class RunContext:
    """What a runner gives a service to run with. The runner owns (opens and closes) every one of these."""

    broker: Broker
    registry: Registry
    transport: Transport  # how this service's clients reach instances: HTTP, or in-process in monolith mode
    data_dir: Path  # where the service keeps its files (its SQLite databases)
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    ttl: float = 10.0  # the registry lease; heartbeats every ttl / 3
    client_options: ClientOptions | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)  # added to the instance's (e.g. mode, replica)
    tracer: Any = None  # an OpenTelemetry tracer of this service (meshkit.tracing.provider); None: no spans
    # the database of the service's outbox, sagas, event store and projections (opened only if it declares one);
    # None: the file data.db in data_dir
    database_url: str | None = None


@dataclass(frozen=True)
class _Subscription:
    topic: str
    group: str
    handler: MessageHandler
    options: SubscriptionOptions | None


class Downstream:
    """Another service, as this one calls it: ``payments = orders.client("payments")`` at import time, then
    ``await payments.post("/charges", json=...)`` while the service runs. Each call resolves an instance through
    the registry and goes through the client's balancing and resilience (see :mod:`meshkit.client`)."""

    def __init__(self, owner: Service, name: str, options: ClientOptions | None) -> None:
        self.name = name
        self._owner = owner
        self._options = options
        self._client: ServiceClient | None = None

    @property
    def client(self) -> ServiceClient:
        if self._client is None:
            raise ConfigurationError(
                f"service {self._owner.name!r} is not running, so its client to {self.name!r} cannot call yet",
                hint="call other services from handlers, routes and hooks (after the service started)",
            )
        return self._client

    def _bind(self, ctx: RunContext) -> None:
        options = self._options or ctx.client_options
        self._client = ServiceClient(
            self.name, ctx.registry, options=options, transport=ctx.transport, tracer=ctx.tracer
        )

    async def _unbind(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Response:
        return await self.client.request(method, path, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> Response:
        return await self.client.get(path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Response:
        return await self.client.post(path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> Response:
        return await self.client.put(path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> Response:
        return await self.client.patch(path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Response:
        return await self.client.delete(path, **kwargs)


class Service:
    """A named service: ``Service("orders", version="1.2.0")``. See the module docstring for its lifecycle."""

    def __init__(
        self,
        name: str,
        *,
        version: str = "",
        http: ASGIApp | None = None,
        metadata: Mapping[str, str] | None = None,
        tags: tuple[str, ...] = (),
    ) -> None:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigurationError(
                f"invalid service name {name!r}", hint="use letters, digits, '-', '_' or '.', e.g. 'orders'"
            )
        self.name = name
        self.version = version
        self.metadata = dict(metadata or {})
        self.tags = tuple(tags)
        self._http: ASGIApp | None = http
        self._subscriptions: list[_Subscription] = []
        self._downstreams: dict[str, Downstream] = {}
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        self._checks: dict[str, Check] = {}
        self._ctx: RunContext | None = None
        self._start_request: Any = None  # see start()
        self._running: list[Subscription] = []
        self._lease: Lease | None = None
        self._stopping = False
        self._metrics: ServiceMetrics | None = None
        self._policies = PolicyLog()  # its clients' breaker transitions and rejections, for resilience_report()
        self._unwatch: list[Callable[[], None]] = []
        self._data = DataPatterns(name)
        self._database: Database | None = None
        self.asgi: ASGIApp = self._serve

    # -- declaring -------------------------------------------------------------------------------------------------

    @property
    def http(self) -> FastAPI:
        """The service's FastAPI app (created on first use), for routes as usual: ``@service.http.get("/x")``.

        A service made with ``Service(name, http=app)`` serves that ASGI app instead; ``http`` then returns it
        only if it is a FastAPI app.
        """
        fastapi = require("fastapi", "service")
        if self._http is None:
            self._http = _fastapi_app(fastapi, self.name, self.version or "0")
        if not isinstance(self._http, fastapi.FastAPI):
            raise ConfigurationError(
                f"service {self.name!r} serves an ASGI app that is not FastAPI",
                hint="add routes to the app you attached, or create the Service without http= to get a FastAPI app",
            )
        return cast("FastAPI", self._http)

    def subscribe(
        self, topic: str, *, group: str | None = None, options: SubscriptionOptions | None = None
    ) -> Callable[[H], H]:
        """Handle ``topic``'s messages: ``@service.subscribe("order.created")``. ``group`` defaults to the
        service's name, so the replicas of one service share the work and every other service gets its own
        copy of each message (pub/sub between services, work queue within one)."""

        def register(handler: H) -> H:
            checked: Any = handler  # (iscoroutinefunction would narrow H away)
            if not inspect.iscoroutinefunction(checked):
                raise ConfigurationError(
                    f"the handler {getattr(handler, '__name__', handler)!r} of {topic!r} is not async",
                    hint="declare it with 'async def'",
                )
            self._subscriptions.append(_Subscription(topic, group or self.name, handler, options))
            return handler

        return register

    def client(self, name: str, *, options: ClientOptions | None = None) -> Downstream:
        """The client to another service (one per name; asking twice gives the same one)."""
        downstream = self._downstreams.get(name)
        if downstream is None:
            downstream = self._downstreams[name] = Downstream(self, name, options)
        return downstream

    def on_start(self, hook: Hook) -> Hook:
        """Run ``hook`` when the service starts, before it subscribes and registers (e.g. create tables)."""
        self._on_start.append(hook)
        return hook

    def on_stop(self, hook: Hook) -> Hook:
        """Run ``hook`` when the service stops, after its requests and handlers finished."""
        self._on_stop.append(hook)
        return hook

    def readiness(self, name: str) -> Callable[[Check], Check]:
        """A readiness check: ``/readyz`` answers 503 while it raises (e.g. the database is unreachable)."""

        def register(check: Check) -> Check:
            self._checks[name] = check
            return check

        return register

    # -- data patterns (meshkit.runtime.data) ------------------------------------------------------------------------

    @property
    def outbox(self) -> OutboxHandle:
        """The transactional outbox: ``async with service.outbox.transaction() as tx:`` business rows and
        ``tx.publish(...)`` commit together, and the relay publishes after the commit. Naming it at import time
        declares it, so the relay runs from the service's start (and relays what a crash left)."""
        self._data.outbox = self._declared(self._data.outbox, OutboxHandle, "service.outbox")
        return self._data.outbox

    def saga(self, saga: Saga) -> Saga:
        """Declare an orchestrated saga this service runs (``await service.sagas.run(saga, data)``); the service
        recovers the ones a crash interrupted when it starts."""
        return self.sagas.declare(saga)

    @property
    def sagas(self) -> SagasHandle:
        """Runs this service's sagas (see :meth:`saga`)."""
        self._data.sagas = self._declared(self._data.sagas, SagasHandle, "service.saga(...)")
        return self._data.sagas

    @property
    def events(self) -> EventsHandle:
        """The event store (append, load, snapshots, ``repository(Aggregate)``)."""
        self._data.events = self._declared(self._data.events, EventsHandle, "service.events")
        return self._data.events

    def projection(self, projection: Projection) -> Projection:
        """Declare a read model this service keeps up to date from the event store."""
        return self.projections.declare(projection)

    @property
    def projections(self) -> ProjectionsHandle:
        """The service's projections: their status, and waiting for them to catch up."""
        self._data.projections = self._declared(self._data.projections, ProjectionsHandle, "service.projection(...)")
        return self._data.projections

    def _declared(self, handle: D | None, make: Callable[[str], D], what: str) -> D:
        """A data pattern's handle, made (declared) on first use; first used while running, it was not started."""
        if handle is not None:
            return handle
        if self._ctx is not None:
            raise self._data.late(what)
        return make(self.name)

    @property
    def database(self) -> Database:
        """The database of the service's data patterns, for its own tables too (open while the service runs, when
        it declares an outbox, a saga, the event store or a projection)."""
        if self._database is None:
            raise ConfigurationError(
                f"service {self.name!r} has no database open",
                hint="it is open while the service runs, when it declares service.outbox, a saga, service.events or"
                " a projection",
            )
        return self._database

    # -- while running ---------------------------------------------------------------------------------------------

    @property
    def context(self) -> RunContext:
        if self._ctx is None:
            raise ConfigurationError(
                f"service {self.name!r} is not running",
                hint="use the broker, the registry and data_dir from handlers, routes and hooks",
            )
        return self._ctx

    @property
    def broker(self) -> Broker:
        return self.context.broker

    @property
    def data_dir(self) -> Path:
        return self.context.data_dir

    @property
    def subscriptions(self) -> list[tuple[str, str]]:
        """``(topic, group)`` of every handler this service declared."""
        return [(sub.topic, sub.group) for sub in self._subscriptions]

    @property
    def instance(self) -> Instance | None:
        """This instance as registered (None until :meth:`register`)."""
        return self._lease.instance if self._lease is not None else None

    async def publish(self, topic: str, data: Any, *, key: str | None = None, **kwargs: Any) -> str:
        """Publish through the service's broker (the message id is returned), in a producer span: the message
        carries its context, so the handlers' spans are its children."""
        tracer = self._ctx.tracer if self._ctx is not None else None
        if tracer is None:
            return await self.broker.publish(topic, data, key=key, **kwargs)
        attributes = {
            "messaging.system": "meshkit",
            "messaging.destination.name": topic,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
        }
        with span(tracer, f"{topic} publish", kind="producer", attributes=attributes) as current:
            message_id = await self.broker.publish(topic, data, key=key, **kwargs)
            current.set_attribute("messaging.message.id", message_id)
            return message_id

    # -- lifecycle (called by the runner) --------------------------------------------------------------------------

    async def start(self, ctx: RunContext) -> None:
        if self._ctx is not None:
            raise ConfigurationError(f"service {self.name!r} is already running")
        self._ctx = ctx
        self._stopping = False
        # a meshkit recorder's tracer starts a request's span from its ASGI headers (None: through server_span)
        self._start_request = getattr(ctx.tracer, "start_request_span", None)
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        for downstream in self._downstreams.values():
            downstream._bind(ctx)
        watched = client_watches("", self._clients())
        self._unwatch = [self._policies.watch(key, policy) for key, policy in watched]
        try:
            if self._data.declared:
                url = ctx.database_url or f"sqlite:///{ctx.data_dir / 'data.db'}"
                self._database = await connect_database(url)
            for hook in self._on_start:
                await hook()
            if self._database is not None:
                await self._data.start(self._database, ctx.broker, ctx.tracer)
            self._metrics = _metrics_for(self.name)
            if self._metrics is not None:
                self._metrics.breakers = self._breaker_states
            for sub in self._subscriptions:
                handler = sub.handler if ctx.tracer is None else _traced_handler(ctx.tracer, sub)
                if self._metrics is not None:
                    handler = _measured_handler(self._metrics, sub, handler)
                self._running.append(
                    await ctx.broker.subscribe(sub.topic, handler, group=sub.group, options=sub.options)
                )
        except BaseException:
            await self.stop()
            raise
        log.info("service started", extra={"service": self.name, "subscriptions": len(self._running)})

    async def register(self, host: str, port: int) -> Instance:
        """Join the registry at ``host:port`` with a heartbeated lease."""
        ctx = self.context
        instance = Instance(
            self.name,
            f"{self.name}-{ctx.instance_id}",
            host,
            port,
            version=self.version,
            metadata={**self.metadata, **ctx.metadata},
            tags=self.tags,
        )
        self._lease = await ctx.registry.register(instance, ttl=ctx.ttl)
        log.info(
            "service registered", extra={"service": self.name, "instance": instance.id, "address": instance.address}
        )
        return self._lease.instance

    async def deregister(self) -> None:
        """Leave the registry (the first step of a graceful stop: clients stop choosing this instance)."""
        self._stopping = True
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.aclose()

    async def stop(self) -> None:
        """Drain and close what :meth:`start` opened; safe to call twice or after a failed start."""
        await self.deregister()
        running, self._running = self._running, []
        for subscription in running:
            try:
                await subscription.aclose()
            except Exception:
                log.exception("a subscription did not close cleanly", extra={"service": self.name})
        if self._ctx is not None:
            for hook in self._on_stop:
                try:
                    await hook()
                except Exception:
                    log.exception("an on_stop hook failed", extra={"service": self.name})
        try:
            await self._data.stop()
        except Exception:
            log.exception("a data pattern did not stop cleanly", extra={"service": self.name})
        database, self._database = self._database, None
        if database is not None:
            try:
                await database.aclose()
            except Exception:
                log.exception("the database did not close cleanly", extra={"service": self.name})
        unwatch, self._unwatch = self._unwatch, []
        for stop_watching in unwatch:
            stop_watching()
        for downstream in self._downstreams.values():
            await downstream._unbind()
        self._ctx = None
        self._start_request = None
        log.info("service stopped", extra={"service": self.name})

    # -- health and the served app ---------------------------------------------------------------------------------

    async def readiness_report(self) -> tuple[bool, dict[str, str]]:
        """``(ready, {check: "ok" | what failed})``: started, registered, broker open, every readiness check."""
        report: dict[str, str] = {}
        report["started"] = "ok" if self._ctx is not None else "not started"
        report["registered"] = "ok" if self._lease is not None and not self._stopping else "not registered"
        if self._ctx is not None:
            report["broker"] = "ok" if not self._ctx.broker.closed else "closed"
        checks = dict(self._checks)
        database = self._database
        if database is not None:  # the data patterns' database answers (a check the service declared wins)

            async def database_answers() -> None:
                await database.fetch("SELECT 1")

            checks.setdefault("database", database_answers)
        for name, check in checks.items():
            try:
                await asyncio.wait_for(check(), timeout=5.0)
            except Exception as exc:
                report[name] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                report[name] = "ok"
        return all(v == "ok" for v in report.values()), report

    def _clients(self) -> dict[str, ServiceClient]:
        return {name: d._client for name, d in self._downstreams.items() if d._client is not None}

    def resilience_report(self) -> dict[str, Any]:
        """What ``/_meshkit/resilience`` answers: ``service``, ``instance`` (its id once registered), ``breakers``
        (each downstream's circuit breaker: state, failure rate, counts, recent ``transitions``) and
        ``rejections`` (each downstream's bulkhead: calls refused, when the last was). docs/dashboard.md has the
        keys; the dashboard shows these rows with the gateway's."""
        instance = self.instance.id if self.instance is not None else None
        breakers, rejections = client_policies(
            "", self._clients(), self._policies, service=self.name, instance=instance
        )
        return {"service": self.name, "instance": instance, "breakers": breakers, "rejections": rejections}

    def _breaker_states(self) -> list[tuple[str, Any]]:
        out = []
        for name, downstream in self._downstreams.items():
            client = downstream._client
            if client is not None and client.breaker is not None:
                out.append((name, client.breaker.state))
        return out

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition of this service's metrics (dead letters and consumer lag counted now)."""
        metrics = self._metrics
        if metrics is None:
            return b""
        if self._ctx is not None and self._subscriptions:
            subs = self._subscriptions
            topics = list(dict.fromkeys(sub.topic for sub in subs))  # each topic's dead letters listed once
            listed = await asyncio.gather(*(self._dead_letters(topic) for topic in topics))
            dead = dict(zip(topics, listed, strict=True))
            for sub in subs:
                messages = dead[sub.topic]
                if messages is not None:  # else the gauge keeps its last value
                    metrics.dead_letters[(sub.topic, sub.group)] = sum(
                        1 for m in messages if m.headers.get("dlqgroup") in (None, sub.group)
                    )
            await asyncio.gather(*(self._count_lag(metrics, sub.topic, sub.group) for sub in subs))
        return metrics.render()

    async def _dead_letters(self, topic: str) -> list[Message] | None:
        assert self._ctx is not None
        try:
            return await self._ctx.broker.dead_letters(topic).list(DLQ_COUNT_LIMIT)
        except Exception:  # a broker that cannot list them now
            log.debug("cannot count the dead letters of %s", topic, exc_info=True)
            return None

    async def _count_lag(self, metrics: ServiceMetrics, topic: str, group: str) -> None:
        assert self._ctx is not None
        try:
            lag = await self._ctx.broker.lag(topic, group)
        except Exception:  # not joined yet, or a broker that cannot tell now: the gauge keeps its last values
            log.debug("cannot ask the lag of %s/%s", topic, group, exc_info=True)
            return
        known = {"waiting": lag.waiting, "in_flight": lag.in_flight}
        if lag.waiting is None and lag.in_flight is None:
            known = {"total": lag.total}
        for state, value in known.items():
            if value is not None:
                metrics.lag[(topic, group, state)] = value

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in _OWN_PATHS:
            if scope["path"] == "/healthz":
                await _json(send, 200, {"status": "ok", "service": self.name})
            elif scope["path"] == "/metrics":
                await _text(send, 200, await self.metrics_text(), b"text/plain; version=0.0.4; charset=utf-8")
            elif scope["path"] == RESILIENCE_PATH:
                await _json(send, 200, self.resilience_report())
            else:
                ready, report = await self.readiness_report()
                await _json(send, 200 if ready else 503, {"ready": ready, "service": self.name, "checks": report})
            return
        metrics = self._metrics
        if metrics is None or scope["type"] != "http":
            await self._dispatch(scope, receive, send, None)
            return
        started = time.perf_counter()
        status, send_status = _status_recorder(send)
        try:
            await self._dispatch(scope, receive, send_status, status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.request(scope.get("method", "GET"), route, status[0], time.perf_counter() - started)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, status: list[int] | None) -> None:
        """Serve ``scope`` (traced when the service has a tracer); ``status`` is where ``send`` already records
        the response status, if it does."""
        app = self._http
        if app is None:
            app = self.http  # creates the FastAPI app: a service with no routes still answers 404s properly
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        tracer = self._ctx.tracer if self._ctx is not None else None
        if tracer is None:
            raw = scope.get("headers", ())
            if any(k == b"traceparent" for k, _ in raw):  # the common untraced request builds no dict
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}  # ASGI names are lower-case
                with extracted(headers):
                    await app(scope, receive, send)
            else:
                await app(scope, receive, send)
            return
        # The request in a server span, a child of the caller's traceparent (here, not in a helper coroutine: one
        # coroutine less per traced request).
        method = scope.get("method", "GET")
        attributes = {"http.request.method": method, "url.path": scope.get("path", ""), "url.scheme": "http"}
        raw = scope.get("headers", ())
        if not isinstance(raw, list | tuple):  # read twice below (the short path, then perhaps the general one)
            raw = list(raw)
        start = self._start_request
        made = start(raw, method, attributes) if start is not None else None
        if made is None:
            carrier: dict[str, str] = {}  # only the trace headers: extraction reads nothing else
            for k, v in raw:
                key = _TRACE_KEYS.get(k)
                if key is not None:
                    carrier[key] = v.decode("latin-1")
            made = server_span(tracer, method, carrier, attributes)
        if status is None:  # nothing records the status yet (no metrics): record it here
            status, send = _status_recorder(send)
        with made as current:
            try:
                await app(scope, receive, send)
            finally:
                template = getattr(scope.get("route"), "path", None)
                if template:
                    current.update_name(f"{method} {template}")
                    current.set_attribute("http.route", template)
                current.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    current.set_status(status_code_error(), f"HTTP {status[0]}")


_TRACE_KEYS = {k.encode(): k for k in TRACE_HEADERS}  # a trace header's ASGI name -> its name


def _fastapi_app(fastapi: Any, title: str, version: str) -> Any:
    """The FastAPI app meshkit makes for a service. FastAPI's own telemetry (newer FastAPIs: a server span, request
    metrics and exception logs whenever a global OpenTelemetry provider is set) is off: the service makes the server
    span and the request metrics itself, FastAPI's would be a second span per request beside it, and even off its
    check of the global providers costs every request. An app given with ``Service(name, http=app)`` keeps its own
    settings."""
    if "telemetry" in inspect.signature(fastapi.FastAPI).parameters:
        off = {"tracing": False, "metrics": False, "logs": False}
        return fastapi.FastAPI(title=title, version=version, telemetry=off)
    return fastapi.FastAPI(title=title, version=version)


def _status_recorder(send: Send) -> tuple[list[int], Send]:
    """``send`` wrapped to record the response's status in the list returned with it (500 until it is sent)."""
    status = [500]

    async def send_status(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status[0] = int(message["status"])
        await send(message)

    return status, send_status


def _traced_handler(tracer: Any, sub: _Subscription) -> MessageHandler:
    """The handler inside a consumer span: a child of the publish span the message came from, and linked to it."""
    handler = sub.handler

    async def traced(message: Message) -> None:
        links = current_links()
        attributes = {
            "messaging.system": "meshkit",
            "messaging.destination.name": sub.topic,
            "messaging.consumer.group.name": sub.group,
            "messaging.operation.type": "process",
            "messaging.message.id": message.id,
        }
        with span(tracer, f"{sub.topic} process", kind="consumer", attributes=attributes, links=links):
            await handler(message)

    return traced


def _metrics_for(service: str) -> ServiceMetrics | None:
    """The service's metrics (None when prometheus_client is not installed: /metrics then answers empty)."""
    try:
        return ServiceMetrics(service)
    except MissingDependency:
        return None


def _measured_handler(metrics: ServiceMetrics, sub: _Subscription, handler: MessageHandler) -> MessageHandler:
    async def measured(message: Message) -> None:
        started = time.perf_counter()
        ok = False
        try:
            await handler(message)
            ok = True
        finally:
            metrics.message(sub.topic, sub.group, ok, time.perf_counter() - started)

    return measured


async def _text(send: Send, status: int, payload: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _json(send: Send, status: int, body: object) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
