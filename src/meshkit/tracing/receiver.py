"""The collector over HTTP: an OTLP/HTTP trace receiver and a JSON query API, as one plain ASGI 3 application.

:class:`CollectorApp` needs no framework, so it mounts into any ASGI server or router; :func:`serve_collector`
runs it under uvicorn on a port of its own (tests, ``meshkit collector`` later)::

    store = await TraceStore.open("traces.db")
    server = await serve_collector("127.0.0.1", 4318, store)
    ...  # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:4318/v1/traces
    await server.aclose()
    await store.aclose()

Ingest, as the OTLP/HTTP spec says: ``POST /v1/traces`` with ``Content-Type: application/x-protobuf`` or
``application/json`` (optionally ``Content-Encoding: gzip``). Success is ``200`` with an empty
``ExportTraceServiceResponse`` in the request's encoding; a malformed body is ``400`` with a ``google.rpc.Status``
(same encoding) saying why; another content type is ``415``; a body (compressed or not) over ``max_body_bytes`` is
``413``; a store that is behind or closed is ``503`` with ``Retry-After`` (exporters retry those).

Queries (``GET``, JSON)::

    /api/traces?service=&operation=&status=&min_duration_ms=&max_duration_ms=&since=&until=&attr.KEY=VALUE&limit=
    /api/traces/{trace_id}                       404 if the store has no span of it
    /api/services
    /api/services/{name}/operations
    /api/dependencies?since=&until=              (since defaults to one hour ago)

``since`` / ``until`` take Unix seconds (``1732400000.5``), an ISO 8601 time (``2026-11-23T10:00:00Z``; UTC when
it names no zone) or an age (``15m``: 15 minutes ago; units ``ms s m h d``). A bad parameter is ``400`` with
``{"error": "bad_request", "message": ...}``; every error of the API has that shape.

The event loop only moves bytes: bodies are decoded on the store's writer thread (see
:meth:`~meshkit.tracing.collector.TraceStore.ingest` for why there), and gzip bodies over 64 KiB are inflated in a
worker thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import re
import zlib
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote_to_bytes

from meshkit._core.serving import Serving, bind, serve_asgi
from meshkit.errors import ConfigurationError, Unavailable
from meshkit.tracing.collector import STATUS_CODES, OtlpDecodeError, TraceStore

__all__ = ["DEFAULT_MAX_BODY_BYTES", "CollectorApp", "CollectorServer", "serve_collector"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The largest request body accepted, compressed and uncompressed (the OTel Collector's default is 20 MiB).
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
_THREAD_GUNZIP_BYTES = 64 * 1024  # gzip bodies larger than this are inflated off the event loop
_MAX_LIMIT = 1000
_DEFAULT_DEPENDENCY_WINDOW_NS = 3600 * 10**9
_PROTOBUF_TYPES: Final = frozenset({"application/x-protobuf", "application/protobuf"})
_JSON_TYPE = "application/json"
_INVALID_ARGUMENT = 3  # google.rpc.Code
_UNAVAILABLE = 14
_RESOURCE_EXHAUSTED = 8
_TRACES_PARAMS: Final = frozenset(
    {"service", "operation", "status", "min_duration_ms", "max_duration_ms", "since", "until", "limit"}
)
_AGE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_AGE_UNITS: Final = {"ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9, "d": 86400e9}
_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")


class _HttpError(Exception):
    """Answer the request with ``status`` and this message (as JSON, or as an OTLP Status on /v1/traces)."""

    def __init__(self, status: int, error: str, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = list(headers)


def _bad_request(message: str) -> _HttpError:
    return _HttpError(400, "bad_request", message)


class CollectorApp:
    """The collector's ASGI 3 application over ``store`` (which it does not own: close the store yourself).

    ``max_body_bytes`` bounds an ingest request's body, before and after gzip.
    """

    def __init__(self, store: TraceStore, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_body_bytes < 1:
            raise ConfigurationError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.store = store
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        # Nothing to start or stop: the store is opened and closed by its owner.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _relative(scope["path"], scope.get("root_path", ""))
        method = scope["method"]
        try:
            await self._route(scope, receive, send, path, method)
        except _HttpError as exc:
            await _respond_json_error(send, exc)
        except Unavailable as exc:
            await _respond_json_error(send, _unavailable(exc))
        except Exception:
            log.exception("the collector failed to answer", extra={"path": path, "method": method})
            await _respond_json_error(send, _HttpError(500, "internal_error", "the collector failed; see its log"))

    async def _route(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> None:
        if path == "/v1/traces":
            await self._ingest(scope, receive, send, method)
            return
        if not path.startswith("/api/"):
            raise _HttpError(404, "not_found", f"no such endpoint: {path}")
        if method != "GET":
            raise _HttpError(405, "method_not_allowed", "the query API answers GET", [(b"allow", b"GET")])
        body = await self._query(scope, path)
        await _respond(send, 200, json.dumps(body, ensure_ascii=False).encode(), _JSON_TYPE)

    # -- ingest --------------------------------------------------------------------------------------------------

    async def _ingest(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        if method != "POST":
            raise _HttpError(405, "method_not_allowed", "POST spans to /v1/traces", [(b"allow", b"POST")])
        headers = _headers(scope)
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type in _PROTOBUF_TYPES:
            as_json = False
        elif content_type == _JSON_TYPE:
            as_json = True
        else:
            raise _HttpError(
                415,
                "unsupported_media_type",
                f"send spans as application/x-protobuf or application/json, not {content_type or 'no content type'}",
            )
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", ""):
            error = _HttpError(415, "unsupported_media_type", f"unsupported Content-Encoding {encoding!r} (use gzip)")
            await _respond_otlp_error(send, error, as_json, _INVALID_ARGUMENT)
            return
        try:
            body = await self._body(headers, receive)
            if body is None:
                return  # the client went away
            if encoding == "gzip":
                if len(body) > _THREAD_GUNZIP_BYTES:  # zlib lets go of the GIL: this runs beside the loop
                    body = await asyncio.to_thread(_gunzip, body, self.max_body_bytes)
                else:
                    body = _gunzip(body, self.max_body_bytes)
            await self.store.ingest(body, json=as_json)
        except _HttpError as exc:
            await _respond_otlp_error(send, exc, as_json, _INVALID_ARGUMENT)
            return
        except OtlpDecodeError as exc:
            log.info("rejected an OTLP request", extra={"reason": str(exc), "client": _client(scope)})
            await _respond_otlp_error(send, _bad_request(str(exc)), as_json, _INVALID_ARGUMENT)
            return
        except Unavailable as exc:
            log.warning("the trace store refused spans", extra={"reason": str(exc)})
            await _respond_otlp_error(send, _unavailable(exc), as_json, _UNAVAILABLE)
            return
        # An empty ExportTraceServiceResponse: no partial_success, every span was accepted.
        if as_json:
            await _respond(send, 200, b"{}", _JSON_TYPE)
        else:
            await _respond(send, 200, b"", "application/x-protobuf")

    async def _body(self, headers: dict[str, str], receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # -- queries -------------------------------------------------------------------------------------------------

    async def _query(self, scope: Scope, path: str) -> dict[str, Any]:
        params = _query_params(scope.get("query_string", b""))
        segments = _segments(scope, path)
        if segments == ["api", "traces"]:
            return await self._search(params)
        if len(segments) == 3 and segments[:2] == ["api", "traces"]:
            _only(params, ())
            trace_id = segments[2]
            if not _TRACE_ID.match(trace_id):
                raise _bad_request(f"a trace id is 32 hex digits, got {trace_id!r}")
            try:
                spans = await self.store.trace(trace_id)
            except ValueError as exc:  # all zeros
                raise _bad_request(str(exc)) from exc
            if not spans:
                raise _HttpError(404, "not_found", f"no spans of trace {trace_id.lower()} in the store")
            return {"trace_id": trace_id.lower(), "spans": [s.to_json() for s in spans]}
        if segments == ["api", "services"]:
            _only(params, ())
            return {"services": await self.store.services()}
        if len(segments) == 4 and segments[:2] == ["api", "services"] and segments[3] == "operations":
            _only(params, ())
            return {"service": segments[2], "operations": await self.store.operations(segments[2])}
        if segments == ["api", "dependencies"]:
            _only(params, ("since", "until"))
            now = _now_ns(self.store)
            since = _time(params, "since", now)
            until = _time(params, "until", now)
            since = since if since is not None else now - _DEFAULT_DEPENDENCY_WINDOW_NS
            found = await self.store.dependencies(since, until)
            return {"dependencies": [d._asdict() for d in found]}
        raise _HttpError(404, "not_found", f"no such endpoint: {path}")

    async def _search(self, params: dict[str, str]) -> dict[str, Any]:
        attributes = {k[5:]: v for k, v in params.items() if k.startswith("attr.")}
        _only(params, _TRACES_PARAMS, prefixed="attr.")
        for key in attributes:
            if not key or '"' in key:
                raise _bad_request(f"attr.KEY needs a non-empty KEY without '\"', got {'attr.' + key!r}")
        status = params.get("status")
        if status is not None and status not in STATUS_CODES:
            raise _bad_request(f"status must be one of {', '.join(STATUS_CODES)}, got {status!r}")
        min_ns = _duration_ms(params, "min_duration_ms")
        max_ns = _duration_ms(params, "max_duration_ms")
        if min_ns is not None and max_ns is not None and min_ns > max_ns:
            raise _bad_request("min_duration_ms is larger than max_duration_ms")
        now = _now_ns(self.store)
        since = _time(params, "since", now)
        until = _time(params, "until", now)
        if since is not None and until is not None and since > until:
            raise _bad_request("since is later than until")
        limit = _integer(params, "limit", 50, 1, _MAX_LIMIT)
        found = await self.store.traces(
            service=params.get("service"),
            operation=params.get("operation"),
            status=status,
            min_duration_ns=min_ns,
            max_duration_ns=max_ns,
            since_ns=since,
            until_ns=until,
            attributes=attributes or None,
            limit=limit,
        )
        return {"traces": [t.to_json() for t in found], "limit": limit}


# -- request parsing -----------------------------------------------------------------------------------------------


def _relative(path: str, root_path: str) -> str:
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path


def _segments(scope: Scope, path: str) -> list[str]:
    """The path's segments, percent-decoded one by one (a service name may hold an encoded ``/``)."""
    raw = scope.get("raw_path")
    root = scope.get("root_path", "").encode()
    if raw is None or not raw.startswith(root):
        return [s for s in path.split("/") if s]
    try:
        return [unquote_to_bytes(s).decode() for s in raw[len(root) :].split(b"/") if s]
    except UnicodeDecodeError:
        raise _bad_request("the path is not UTF-8") from None


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def _query_params(raw: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(raw.decode(), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise _bad_request("the query string is not UTF-8") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise _bad_request(f"the query parameter {key!r} is given twice")
        if value != "" or key.startswith("attr."):  # an empty form field means "no filter"
            params[key] = value
    return params


def _only(params: dict[str, str], allowed: Iterable[str], prefixed: str | None = None) -> None:
    allowed = set(allowed)
    for key in params:
        if key not in allowed and not (prefixed and key.startswith(prefixed)):
            expected = ", ".join(sorted(allowed)) + (f", {prefixed}KEY" if prefixed else "")
            raise _bad_request(f"unknown query parameter {key!r}" + (f" (expected {expected})" if allowed else ""))


def _integer(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise _bad_request(f"{name} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise _bad_request(f"{name} must be between {low} and {high}, got {value}")
    return value


def _duration_ms(params: dict[str, str], name: str) -> int | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _bad_request(f"{name} must be a number of milliseconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise _bad_request(f"{name} must be a non-negative number of milliseconds, got {text!r}")
    return round(value * 1e6)


def _now_ns(store: TraceStore) -> int:
    return int(store.clock.wall() * 1e9)


def _time(params: dict[str, str], name: str, now_ns: int) -> int | None:
    """Unix seconds, an ISO 8601 time, or an age like ``15m``, as Unix nanoseconds."""
    text = params.get(name)
    if text is None:
        return None
    age = _AGE.match(text)
    if age:
        return now_ns - round(float(age.group(1)) * _AGE_UNITS[age.group(2)])
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise _bad_request(f"{name} must be a time, got {text!r}")
        return round(seconds * 1e9)
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _bad_request(f"{name} must be Unix seconds, an ISO 8601 time or an age like 15m, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def _gunzip(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _bad_request(f"the body is not valid gzip: {exc}") from exc
    if len(data) > limit or inflater.unconsumed_tail:
        raise _too_large(limit, "uncompressed ")
    if not inflater.eof:
        raise _bad_request("the gzip body is truncated")
    return data


def _too_large(limit: int, what: str = "") -> _HttpError:
    return _HttpError(413, "payload_too_large", f"the {what}body is over the limit of {limit} bytes")


def _unavailable(exc: Unavailable) -> _HttpError:
    retry = max(1, math.ceil(exc.retry_after or 1))
    return _HttpError(503, "unavailable", str(exc), [(b"retry-after", str(retry).encode())])


# -- responses -----------------------------------------------------------------------------------------------------


async def _respond(
    send: Send, status: int, body: bytes, content_type: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _respond_json_error(send: Send, exc: _HttpError) -> None:
    body = json.dumps({"error": exc.error, "message": exc.message}, ensure_ascii=False).encode()
    await _respond(send, exc.status, body, _JSON_TYPE, exc.headers)


async def _respond_otlp_error(send: Send, exc: _HttpError, as_json: bool, code: int) -> None:
    """An OTLP error response: a ``google.rpc.Status`` in the request's encoding."""
    if exc.status == 413:
        code = _RESOURCE_EXHAUSTED
    if as_json:
        body = json.dumps({"code": code, "message": exc.message}, ensure_ascii=False).encode()
        await _respond(send, exc.status, body, _JSON_TYPE, exc.headers)
    else:
        await _respond(send, exc.status, _status_protobuf(code, exc.message), "application/x-protobuf", exc.headers)


def _status_protobuf(code: int, message: str) -> bytes:
    """``google.rpc.Status{code, message}`` in the protobuf wire format (two fields: no need for the classes)."""
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# -- serving -------------------------------------------------------------------------------------------------------


@dataclass
class CollectorServer:
    """A running collector (:func:`serve_collector`); ``await server.aclose()`` stops it."""

    app: CollectorApp
    serving: Serving

    @property
    def host(self) -> str:
        return self.serving.host

    @property
    def port(self) -> int:
        return self.serving.port

    @property
    def url(self) -> str:
        return self.serving.url

    @property
    def traces_endpoint(self) -> str:
        """The URL for ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``."""
        return f"{self.url}/v1/traces"

    async def aclose(self) -> None:
        """Stop accepting, finish the requests in flight, stop. Idempotent."""
        await self.serving.aclose()

    async def __aenter__(self) -> CollectorServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def serve_collector(
    host: str,
    port: int,
    store: TraceStore,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    graceful_timeout: float = 5.0,
    reuse_port: bool = False,
) -> CollectorServer:
    """Serve a :class:`CollectorApp` over ``store`` with uvicorn on ``host:port`` (``0``: a free port, see
    ``.port``) in the running event loop; returns once it accepts connections. uvicorn's signal handlers are off:
    the caller decides when to stop (``await server.aclose()``).

    ``reuse_port=True`` (``SO_REUSEPORT``) lets several processes serve one port, each with a store of its own on
    the same file: the kernel spreads connections over them. One process ingests on one core (its GIL); two use
    two (see ``docs/collector.md``)."""
    app = CollectorApp(store, max_body_bytes=max_body_bytes)
    sock = bind(host, port, what="the trace collector", reuse_port=reuse_port)
    try:
        serving = await serve_asgi(app, sock, "the trace collector", lifespan="on", graceful=graceful_timeout)
    except BaseException:
        sock.close()
        raise
    return CollectorServer(app, serving)
