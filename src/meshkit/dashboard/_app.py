"""The dashboard as an ASGI application: a JSON API under ``/api/`` and a static one-page UI, served by the runtime.

:class:`DashboardApp` reads the sources a runner hands it (the trace store, the registry, the broker, the
resilience reports, the log buffer) on each request; it owns none of them and closes only its own HTTP session (for
OpenAPI documents). docs/dashboard.md describes the API and the page.

Errors are JSON ``{"error": <code>, "message": <text>}``: 400 ``bad_request`` / ``confirmation_required``,
404 ``not_found``, 405 ``method_not_allowed``, 413 ``too_large``, 415 ``unsupported_media_type``, 503
``unavailable`` (a source cannot be read now), 500 ``internal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from meshkit._core.clock import Clock, MonotonicClock
from meshkit._core.optional import require
from meshkit._version import __version__
from meshkit.dashboard._data import SAGA_STATUSES, DataSource
from meshkit.dashboard._logs import LogBuffer
from meshkit.dashboard._model import ServiceInfo, TraceTree, topology
from meshkit.dashboard._openapi import OpenApiCache
from meshkit.dashboard.audit import AuditEntry, append_audit, read_audit
from meshkit.discovery import Instance, Registry
from meshkit.errors import ConfigurationError, Unavailable
from meshkit.messaging import Broker, GroupNotFound, Message
from meshkit.tracing.collector import STATUS_CODES, SpanRecord, TraceStore

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import Receive, Scope, Send

__all__ = ["ASSETS", "DashboardApp", "ResilienceSource", "ServicesSource"]

log = logging.getLogger(__name__)

#: What ``services=`` gives: the runner's view of each service, by name.
ServicesSource = Callable[[], Mapping[str, ServiceInfo]]
#: What ``resilience=`` gives: ``{"breakers": [...], "rejections": [...], "errors": [...]}``, one dict per circuit
#: breaker, per policy that refuses calls (bulkhead, rate limit) and per instance that could not be read (see
#: docs/dashboard.md for the keys the page shows); a plain list is the breakers alone.
ResilienceSource = Callable[[], Awaitable[Mapping[str, Any] | list[dict[str, Any]]]]

#: The static files of the page (``static/`` in this package) and their content types.
ASSETS: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# Everything the page loads comes from the dashboard itself: the policy makes a CDN reference fail loudly.
_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_SECURITY_HEADERS: Final = {
    "content-security-policy": _CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
_TRACE_ID: Final = re.compile(r"[0-9a-f]{32}")
_TRACEPARENT: Final = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_ABSOLUTE: Final = re.compile(r"^https?://", re.IGNORECASE)
_REASONS: Final = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}
_MAX_BODY = 256 * 1024  # bytes of a POST body
_MAX_DATA_TEXT = 20_000  # characters of a dead letter's data shown
_UNREAD: Final = object()
_LAG_CONCURRENCY = 8  # consumer groups whose lag is asked of the broker at once


class _ApiError(Exception):
    def __init__(self, status: int, message: str, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error or _REASONS.get(status, "error")
        self.message = message


class DashboardApp:
    """The dashboard's ASGI app (see the module docstring and docs/dashboard.md).

    Only ``store`` is required; a page whose source was not given says so. ``services`` is called on each request
    and returns the runner's :class:`ServiceInfo` by name. ``clock`` times caches, uptimes and the audit log.
    OpenAPI documents are cached ``openapi_ttl`` seconds per service; the service map ``topology_ttl`` seconds, and
    it reads ``topology_sample`` recent traces per called service to tell calls from messages. Listing or settling
    dead letters handles at most ``dlq_limit`` messages per request; the audit log keeps ``audit_size`` entries.
    With ``audit_path``, every audit entry is also appended to that file (JSON lines, flushed to disk before the
    request answers, :mod:`meshkit.dashboard.audit`) and the file's last ``audit_size`` entries are read back here,
    so the audit outlives the process; ``/api/audit`` reads the file again when it changed, so what others append
    (``meshkit dlq replay|discard``) shows too. A line that is not an entry is skipped with a warning, a file that
    cannot be read at the start raises :class:`~meshkit.errors.ConfigurationError`.

    Serve it like any ASGI app (``uvicorn.Config(dashboard, lifespan="on")``) or mount it under a path; close it
    with :meth:`aclose` (its lifespan shutdown does that too).
    """

    def __init__(
        self,
        store: TraceStore,
        *,
        registry: Registry | None = None,
        services: ServicesSource | None = None,
        broker: Broker | None = None,
        resilience: ResilienceSource | None = None,
        logs: LogBuffer | None = None,
        clock: Clock | None = None,
        title: str = "meshkit",
        openapi_ttl: float = 10.0,
        openapi_timeout: float = 3.0,
        topology_ttl: float = 5.0,
        topology_sample: int = 5,
        dlq_limit: int = 1000,
        audit_size: int = 1000,
        audit_path: Path | None = None,
        data: DataSource | None = None,
    ) -> None:
        if dlq_limit < 1 or audit_size < 1 or topology_sample < 0:
            raise ValueError("dlq_limit and audit_size must be at least 1, topology_sample at least 0")
        self.store = store
        self.registry = registry
        self.broker = broker
        self.logs = logs
        self.data = data
        self.clock = clock or MonotonicClock()
        self.title = title
        self._services_source = services
        self._resilience = resilience
        self._openapi = OpenApiCache(self.clock, ttl=openapi_ttl, timeout=openapi_timeout)
        self._topology_ttl = topology_ttl
        self._topology_sample = topology_sample
        self._topology_cache: dict[float | None, tuple[float, dict[str, Any]]] = {}
        self._dlq_limit = dlq_limit
        self._audit: deque[AuditEntry] = deque(maxlen=audit_size)
        self._audit_path = audit_path
        # appends run on worker threads: the asyncio lock keeps them in order, the thread lock keeps one that
        # outlives its cancelled request from interleaving with the next
        self._audit_order = asyncio.Lock()
        self._audit_file_lock = threading.Lock()
        self._audit_seen: object = _UNREAD  # the audit file's (inode, size, mtime) when it was last read
        self._unwritten: deque[AuditEntry] = deque(maxlen=audit_size)  # entries the file refused, kept here
        if audit_path is not None:
            self._audit.extend(self._read_audit_file(audit_path) or ())
        self._dlq_locks: dict[str, asyncio.Lock] = {}
        self._assets: dict[str, tuple[bytes, str]] = {}
        self._closed = False
        self._app = self._build()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._closed

    @property
    def audit(self) -> list[AuditEntry]:
        """The replays and discards done through the dashboard, oldest first; with ``audit_path``, those in the
        file as it was last read (at the start, and by ``/api/audit`` when it changed)."""
        return list(self._audit)

    async def aclose(self) -> None:
        """Close the dashboard's own resources (the sources it was given stay open), after the audit entry being
        written, if any. Idempotent."""
        self._closed = True
        async with self._audit_order:
            pass
        await self._openapi.aclose()

    # -- the app ---------------------------------------------------------------------------------------------------

    def _build(self) -> Any:
        applications = require("starlette.applications", "service")
        exceptions = require("starlette.exceptions", "service")
        routing = require("starlette.routing", "service")
        route, api = routing.Route, self._api
        routes = [
            route("/", self._index, methods=["GET", "HEAD"]),
            route("/static/{name}", self._asset, methods=["GET", "HEAD"]),
            route("/api/info", api(self._info)),
            route("/api/services", api(self._services)),
            route("/api/services/{name}/endpoints", api(self._endpoints)),
            route("/api/operations", api(self._operations)),
            route("/api/traces", api(self._traces)),
            route("/api/traces/{trace_id}", api(self._trace)),
            route("/api/topology", api(self._topology)),
            route("/api/resilience", api(self._resilience_api)),
            route("/api/messaging", api(self._messaging)),
            route("/api/messaging/{topic:path}/dlq", api(self._dlq)),
            route("/api/messaging/{topic:path}/dlq/replay", api(self._replay), methods=["POST"]),
            route("/api/messaging/{topic:path}/dlq/discard", api(self._discard), methods=["POST"]),
            route("/api/audit", api(self._audit_api)),
            route("/api/logs", api(self._logs_api)),
            route("/api/sagas", api(self._sagas_api)),
            route("/api/sagas/{saga_id:path}", api(self._saga_api)),
            route("/api/projections", api(self._projections_api)),
        ]
        return applications.Starlette(
            routes=routes,
            exception_handlers={exceptions.HTTPException: self._http_error},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.aclose()

    def _api(self, handler: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                body = await handler(request)
            except _ApiError as exc:
                return self._error(exc.status, exc.error, exc.message)
            except Unavailable as exc:
                return self._error(503, "unavailable", str(exc))
            except Exception:
                log.exception("a dashboard API request failed", extra={"path": request.url.path})
                return self._error(500, "internal", "the dashboard could not answer; its log says why")
            return self._json(200, body)

        return endpoint

    def _json(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
        responses = require("starlette.responses", "service")
        text = _dumps(body, separators=(",", ":"))
        response: Response = responses.Response(
            text.encode(),
            status_code=status,
            media_type="application/json",
            headers={**_SECURITY_HEADERS, "cache-control": "no-store", **(headers or {})},
        )
        return response

    def _error(self, status: int, error: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
        return self._json(status, {"error": error, "message": message}, headers)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "") or ""
        if status == 404:
            detail = f"nothing at {request.url.path}"
        headers = getattr(exc, "headers", None)
        return self._error(status, _REASONS.get(status, "http_error"), str(detail), headers)

    # -- the page --------------------------------------------------------------------------------------------------

    async def _index(self, request: Request) -> Response:
        return self._static(request, "index.html")

    async def _asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return self._error(404, "not_found", f"no static file {name!r}")
        return self._static(request, name)

    def _static(self, request: Request, name: str) -> Response:
        responses = require("starlette.responses", "service")
        cached = self._assets.get(name)
        if cached is None:
            body = resources.files("meshkit.dashboard").joinpath("static", name).read_bytes()
            cached = self._assets[name] = (body, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
        body, etag = cached
        headers = {**_SECURITY_HEADERS, "cache-control": "no-cache", "etag": etag}
        if request.headers.get("if-none-match") == etag:
            not_modified: Response = responses.Response(status_code=304, headers=headers)
            return not_modified
        response: Response = responses.Response(body, media_type=ASSETS[name], headers=headers)
        return response

    # -- services --------------------------------------------------------------------------------------------------

    def _infos(self) -> dict[str, ServiceInfo]:
        return dict(self._services_source()) if self._services_source is not None else {}

    async def _instances(self, name: str) -> tuple[list[Instance], str | None]:
        if self.registry is None:
            return [], None
        try:
            return await self.registry.list(name, healthy_only=False), None
        except Unavailable as exc:
            return [], str(exc)

    async def _info(self, request: Request) -> dict[str, Any]:
        return {
            "title": self.title,
            "version": __version__,
            "now": self.clock.wall(),
            "features": {
                "registry": self.registry is not None,
                "services": self._services_source is not None,
                "broker": self.broker is not None,
                "resilience": self._resilience is not None,
                "logs": self.logs is not None,
                "data": self.data is not None,
            },
        }

    async def _services(self, request: Request) -> dict[str, Any]:
        infos = self._infos()
        names = sorted(set(infos) | set(await self.store.services()))
        now = self.clock.wall()
        entries = await asyncio.gather(*(self._service_entry(n, infos.get(n), now) for n in names))
        return {"services": list(entries)}

    async def _service_entry(self, name: str, info: ServiceInfo | None, now: float) -> dict[str, Any]:
        instances, problem = await self._instances(name)
        entry: dict[str, Any] = {
            "name": name,
            "managed": info is not None,
            "instances": [_instance_json(i, now) for i in instances],
            "healthy": sum(1 for i in instances if i.healthy),
            "restarts": info.restarts if info else 0,
            "started_at": info.started_at if info and info.started_at else None,
            "uptime_s": max(now - info.started_at, 0.0) if info and info.started_at else None,
            "subscriptions": [{"topic": t, "group": g} for t, g in info.subscriptions] if info else [],
            "openapi": info is not None and info.openapi_url is not None,
        }
        if problem is not None:
            entry["registry_error"] = problem
        return entry

    async def _endpoints(self, request: Request) -> dict[str, Any]:
        name = request.path_params["name"]
        info = self._infos().get(name)
        if info is None:
            raise _ApiError(404, f"no service named {name!r}")
        if info.openapi_url is None:
            return {"service": name, "endpoints": [], "source": None}
        if _ABSOLUTE.match(info.openapi_url):
            urls = [info.openapi_url]
        else:
            instances, problem = await self._instances(name)
            if problem is not None:
                raise Unavailable(problem)
            path = info.openapi_url if info.openapi_url.startswith("/") else "/" + info.openapi_url
            instances.sort(key=lambda i: not i.healthy)  # healthy ones first
            urls = [f"http://{i.address}{path}" for i in instances]
        endpoints, source = await self._openapi.endpoints(name, urls)
        return {"service": name, "endpoints": endpoints, "source": source}

    # -- traces ----------------------------------------------------------------------------------------------------

    async def _operations(self, request: Request) -> dict[str, Any]:
        names = await self.store.services()
        operations = await asyncio.gather(*(self.store.operations(n) for n in names))
        return {"services": dict(zip(names, operations, strict=True))}

    async def _traces(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        status = q.get("status") or None
        if q.get("errors", "").lower() in ("1", "true", "yes", "on"):
            status = "error"
        if status is not None and status not in STATUS_CODES:
            raise _ApiError(400, f"status must be one of {', '.join(STATUS_CODES)}, got {status!r}")
        min_ms = _float_param(q, "min_duration_ms")
        limit = _int_param(q, "limit", 50, 1, 1000)
        summaries = await self.store.traces(
            service=q.get("service") or None,
            operation=q.get("operation") or None,
            status=status,
            min_duration_ns=None if min_ms is None else int(min_ms * 1e6),
            limit=limit,
        )
        return {"traces": [s.to_json() for s in summaries]}

    async def _trace(self, request: Request) -> dict[str, Any]:
        trace_id = request.path_params["trace_id"].lower()
        if not _TRACE_ID.fullmatch(trace_id):
            raise _ApiError(400, f"a trace id is 32 hex digits, got {trace_id!r}")
        try:
            spans = await self.store.trace(trace_id)
        except ValueError as exc:  # all zeros
            raise _ApiError(400, str(exc)) from exc
        if not spans:
            raise _ApiError(404, f"no trace {trace_id} in the store (never received, or past retention)")
        return trace_json(trace_id, spans)

    async def _topology(self, request: Request) -> dict[str, Any]:
        since_s = _float_param(request.query_params, "since_s")
        cached = self._topology_cache.get(since_s)
        now = self.clock.now()
        if cached is not None and cached[0] > now:
            return cached[1]
        # a window is [now - since_s, now]: rates are its counts divided by its length
        wall = self.clock.wall()
        since_ns = None if since_s is None else int((wall - since_s) * 1e9)
        until_ns = None if since_s is None else int(wall * 1e9)
        dependencies = await self.store.dependencies(since_ns=since_ns, until_ns=until_ns)
        samples: list[list[SpanRecord]] = []
        seen: set[str] = set()
        if self._topology_sample:
            for callee in sorted({d.callee for d in dependencies}):
                for summary in await self.store.traces(service=callee, since_ns=since_ns, limit=self._topology_sample):
                    if summary.trace_id not in seen and len(summary.services) > 1:
                        seen.add(summary.trace_id)
                        samples.append(await self.store.trace(summary.trace_id))
        infos = self._infos()
        result = topology(dependencies, samples, set(infos) | set(await self.store.services()), window_s=since_s)
        for node in result["nodes"]:
            node["managed"] = node["name"] in infos
            if node["managed"] and self.registry is not None:
                instances, _ = await self._instances(node["name"])
                node["instances"] = len(instances)
                node["healthy"] = sum(1 for i in instances if i.healthy)
        result["sampled_traces"] = len(samples)
        if len(self._topology_cache) > 64:
            self._topology_cache.clear()
        self._topology_cache[since_s] = (now + self._topology_ttl, result)
        return result

    # -- resilience ------------------------------------------------------------------------------------------------

    async def _resilience_api(self, request: Request) -> dict[str, Any]:
        if self._resilience is None:
            return {"available": False, "breakers": [], "rejections": [], "errors": []}
        got = await self._resilience()
        if not isinstance(got, Mapping):
            got = {"breakers": got}
        return {
            "available": True,
            "breakers": list(got.get("breakers", ())),
            "rejections": list(got.get("rejections", ())),
            "errors": list(got.get("errors", ())),
        }

    # -- sagas and projections ---------------------------------------------------------------------------------------

    async def _sagas_api(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        status = q.get("status") or None
        if status is not None and status not in SAGA_STATUSES:
            raise _ApiError(400, f"unknown saga status {status!r}; one of {', '.join(SAGA_STATUSES)}")
        limit = _int_param(q, "limit", 100, 1, 1000)
        if self.data is None:
            return {"available": False, "sagas": []}
        found = await self.data.sagas(status=status, name=q.get("name") or None, limit=limit)
        return {"available": True, "sagas": found}

    async def _saga_api(self, request: Request) -> dict[str, Any]:
        saga_id = request.path_params["saga_id"]
        found = await self.data.saga(saga_id) if self.data is not None else None
        if found is None:
            raise _ApiError(404, f"no saga {saga_id!r}")
        return found

    async def _projections_api(self, request: Request) -> dict[str, Any]:
        if self.data is None:
            return {"available": False, "projections": []}
        return {"available": True, "projections": await self.data.projections()}

    # -- messaging -------------------------------------------------------------------------------------------------

    def _topics(self) -> dict[str, list[dict[str, Any]]]:
        topics: dict[str, list[dict[str, Any]]] = {}
        for name, info in sorted(self._infos().items()):
            for topic, group in info.subscriptions:
                topics.setdefault(topic, []).append({"group": group, "service": name})
        return dict(sorted(topics.items()))

    def _dlq_lock(self, topic: str) -> asyncio.Lock:
        # Listing and settling share the broker's admin consumer group: one at a time per topic.
        return self._dlq_locks.setdefault(topic, asyncio.Lock())

    async def _dead_letters(self, topic: str, limit: int) -> list[Message]:
        assert self.broker is not None
        async with self._dlq_lock(topic):
            return await self.broker.dead_letters(topic).list(limit)

    async def _messaging(self, request: Request) -> dict[str, Any]:
        out = []
        topics = self._topics()
        if self.broker is not None:
            await self._lags(topics)
        for topic, groups in topics.items():
            row: dict[str, Any] = {"topic": topic, "groups": groups, "dlq": None, "dlq_truncated": False}
            if self.broker is not None:
                try:
                    size = len(await self._dead_letters(topic, self._dlq_limit))
                except Unavailable as exc:
                    row["dlq_error"] = str(exc)
                else:
                    row["dlq"] = size
                    row["dlq_truncated"] = size >= self._dlq_limit
            out.append(row)
        return {"broker": self.broker is not None, "topics": out}

    async def _lags(self, topics: Mapping[str, list[dict[str, Any]]]) -> None:
        """Add :meth:`_lag` to every group of ``topics``, asking the broker about up to ``_LAG_CONCURRENCY`` groups
        at once. An error :meth:`_lag` does not turn into a ``lag_error`` is raised once every question is
        answered (none is left running)."""
        bound = asyncio.Semaphore(_LAG_CONCURRENCY)

        async def one(topic: str, group: dict[str, Any]) -> None:
            async with bound:
                group.update(await self._lag(topic, group["group"]))

        done = await asyncio.gather(
            *(one(topic, group) for topic, groups in topics.items() for group in groups), return_exceptions=True
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _lag(self, topic: str, group: str) -> dict[str, Any]:
        """``lag``: how far ``group`` is behind on ``topic`` (``waiting``, ``in_flight``, ``total``; None for what
        the broker cannot tell), or None with a ``lag_error`` when it cannot be asked now."""
        assert self.broker is not None
        try:
            lag = await self.broker.lag(topic, group)
        except GroupNotFound:
            return {"lag": None, "lag_error": "the broker does not know this group yet"}
        except Unavailable as exc:
            return {"lag": None, "lag_error": str(exc)}
        return {"lag": {"waiting": lag.waiting, "in_flight": lag.in_flight, "total": lag.total}}

    def _check_topic(self, topic: str) -> Broker:
        if topic not in self._topics():
            raise _ApiError(404, f"no service subscribes to a topic named {topic!r}")
        if self.broker is None:
            raise _ApiError(404, "the dashboard was given no broker", "no_broker")
        return self.broker

    async def _dlq(self, request: Request) -> dict[str, Any]:
        topic = request.path_params["topic"]
        self._check_topic(topic)
        limit = _int_param(request.query_params, "limit", self._dlq_limit, 1, self._dlq_limit)
        messages = await self._dead_letters(topic, limit)
        return {
            "topic": topic,
            "messages": [dead_letter_json(m) for m in messages],
            "truncated": len(messages) >= limit,
        }

    async def _replay(self, request: Request) -> dict[str, Any]:
        return await self._settle(request, "replay")

    async def _discard(self, request: Request) -> dict[str, Any]:
        return await self._settle(request, "discard")

    async def _settle(self, request: Request, action: str) -> dict[str, Any]:
        topic = request.path_params["topic"]
        broker = self._check_topic(topic)
        ids = await self._settle_ids(request)
        client = request.client.host if request.client else None
        dead = broker.dead_letters(topic)
        try:
            async with self._dlq_lock(topic):
                if action == "replay":
                    count = await dead.replay(ids, limit=self._dlq_limit)
                else:
                    count = await dead.discard(ids, limit=self._dlq_limit)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            await self._record(AuditEntry(self.clock.wall(), action, topic, tuple(ids), 0, error, client))
            raise
        await self._record(AuditEntry(self.clock.wall(), action, topic, tuple(ids), count, client=client))
        log.info(
            "dead letters settled from the dashboard",
            extra={"action": action, "topic": topic, "requested": len(ids), "count": count},
        )
        return {"action": action, "topic": topic, "requested": len(ids), "count": count}

    async def _settle_ids(self, request: Request) -> list[str]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise _ApiError(415, "send the request as JSON (content-type: application/json)")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > _MAX_BODY:
                raise _ApiError(413, f"the request body is larger than {_MAX_BODY} bytes")
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise _ApiError(400, f"the body is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise _ApiError(400, 'the body must be a JSON object: {"ids": [...], "confirm": true}')
        ids = document.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise _ApiError(400, '"ids" must be a non-empty list of dead letter ids')
        if len(ids) > self._dlq_limit:
            raise _ApiError(400, f"at most {self._dlq_limit} ids per request")
        if document.get("confirm") is not True:
            raise _ApiError(400, 'this changes the broker: send "confirm": true', "confirmation_required")
        return list(dict.fromkeys(ids))

    async def _audit_api(self, request: Request) -> dict[str, Any]:
        if self._audit_path is not None:
            await self._reread_audit(self._audit_path)
        return {"entries": [e.to_json() for e in reversed(self._audit)]}

    async def _reread_audit(self, path: Path) -> None:
        """Read the audit file again if it changed since it was last read (another process appends to it too),
        keeping the entries this dashboard could not write to it. A file that cannot be read now leaves the audit
        as it was."""
        async with self._audit_order:  # not halfway through an append of ours
            try:
                read = await asyncio.to_thread(self._read_audit_file, path)
            except (OSError, ConfigurationError) as exc:
                log.debug("cannot read the audit file again: %s", exc, extra={"path": str(path)})
                return
            if read is not None:
                merged = sorted(dict.fromkeys([*read, *self._unwritten]), key=lambda e: e.time)
                self._audit.clear()
                self._audit.extend(merged)

    def _read_audit_file(self, path: Path) -> list[AuditEntry] | None:
        """The file's last entries, or None when it is as it was last read (blocking: the file is read)."""
        try:
            found = path.stat()
        except FileNotFoundError:
            seen: tuple[int, int, int] | None = None
        else:
            seen = (found.st_ino, found.st_size, found.st_mtime_ns)
        if seen == self._audit_seen:
            return None
        entries = read_audit(path, self._audit.maxlen or 1)
        self._audit_seen = seen
        return entries

    async def _record(self, entry: AuditEntry) -> None:
        """Keep ``entry`` and append it to the audit file. The action is done by now: a file that cannot be
        written is logged as an error rather than failing the request (the entry stays in memory)."""
        if self._audit_path is None:
            self._audit.append(entry)
            return
        async with self._audit_order:  # kept and written in one step: a re-read of the file cannot come between
            self._audit.append(entry)
            try:
                await asyncio.to_thread(append_audit, self._audit_path, entry, self._audit_file_lock)
            except OSError:
                self._unwritten.append(entry)
                log.exception(
                    "could not write to the dashboard's audit file",
                    extra={"path": str(self._audit_path), "action": entry.action, "topic": entry.topic},
                )

    # -- logs ------------------------------------------------------------------------------------------------------

    async def _logs_api(self, request: Request) -> dict[str, Any]:
        if self.logs is None:
            return {"available": False, "records": [], "cursor": 0, "truncated": False, "services": []}
        q = request.query_params
        since = _int_param(q, "since", 0, 0, 2**63 - 1)
        limit = _int_param(q, "limit", 500, 1, 5000)
        try:
            page = self.logs.query(
                service=q.get("service") or None,
                level=q.get("level") or None,
                trace_id=q.get("trace_id") or None,
                text=q.get("q") or None,
                since=since,
                limit=limit,
            )
        except ValueError as exc:
            raise _ApiError(400, str(exc)) from exc
        return {
            "available": True,
            "records": [e.to_json() for e in page.entries],
            "cursor": page.cursor,
            "truncated": page.truncated,
            "services": self.logs.services(),
        }


# -- shaping -------------------------------------------------------------------------------------------------------


def trace_json(trace_id: str, spans: list[SpanRecord]) -> dict[str, Any]:
    """The ``/api/traces/{id}`` document: the trace's extent and its spans in depth-first order, each with its
    ``depth``, ``offset_ns`` (from the trace's start), ``descendants`` (rows of its subtree) and ``critical``."""
    tree = TraceTree(spans)
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    path = tree.critical_path()
    on_path = set(path)
    rows = []
    for span in tree.rows:
        row = span.to_json()
        row["depth"] = tree.depth[span.span_id]
        row["offset_ns"] = span.start_ns - start
        row["descendants"] = tree.descendants[span.span_id]
        row["critical"] = span.span_id in on_path
        rows.append(row)
    return {
        "trace_id": trace_id,
        "start_ns": start,
        "end_ns": end,
        "duration_ns": max(end - start, 0),
        "span_count": len(rows),
        "error_count": sum(1 for s in tree.rows if s.status_code == "error"),
        "services": sorted({s.service for s in tree.rows}),
        "max_depth": max(tree.depth.values()),
        "critical_path": path,
        "spans": rows,
    }


def dead_letter_json(message: Message) -> dict[str, Any]:
    """One dead letter as the DLQ table shows it (the ``dlq*`` headers the consumer runtime set, the data)."""
    h = message.headers
    try:
        deliveries = int(h.get("dlqdeliveries", "0"))
    except ValueError:
        deliveries = 0
    data = message.data
    if isinstance(data, bytes | bytearray):
        data = bytes(data).decode("utf-8", "replace")
    text = _dumps(data)
    truncated = len(text) > _MAX_DATA_TEXT
    traceparent = _TRACEPARENT.match(h.get("traceparent", ""))
    return {
        "id": message.id,
        "original_id": h.get("dlqid"),
        "group": h.get("dlqgroup"),
        "deliveries": deliveries,
        "reason": h.get("dlqreason"),
        "time": message.time.isoformat(),
        "type": message.type,
        "key": message.key,
        "trace_id": traceparent[1] if traceparent else None,
        "headers": dict(h),
        "data": text[:_MAX_DATA_TEXT] + "…" if truncated else data,
        "data_truncated": truncated,
    }


def _instance_json(instance: Instance, now: float) -> dict[str, Any]:
    return {
        "id": instance.id,
        "address": instance.address,
        "host": instance.host,
        "port": instance.port,
        "status": str(instance.status),
        "healthy": instance.healthy,
        "version": instance.version,
        "tags": list(instance.tags),
        "metadata": dict(instance.metadata),
        "registered": instance.registered,
        "last_seen": instance.last_seen,
        "uptime_s": max(now - instance.registered, 0.0) if instance.registered else None,
    }


def _dumps(value: Any, **options: Any) -> str:
    """``value`` as JSON; non-finite floats (JSON has none; the page could not parse NaN) become null. Most bodies
    have none, so the walk that replaces them runs only when a first attempt finds one (it was most of the time
    a 10,000-span trace took to serialise)."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str, allow_nan=False, **options)
    except ValueError:
        return json.dumps(_finite(value), ensure_ascii=False, default=str, **options)


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (JSON has no NaN; the page could not parse it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _ApiError(400, f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise _ApiError(400, f"{name} must be between {low} and {high}, got {value}")
    return value


def _float_param(query: Mapping[str, str], name: str) -> float | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _ApiError(400, f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise _ApiError(400, f"{name} must be a finite number >= 0, got {raw!r}")
    return value
