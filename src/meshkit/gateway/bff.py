"""Backend-for-frontend aggregation routes: one client call fans out to several services in parallel; the answer
is shaped for one client type (see :class:`~meshkit.gateway.config.BffRoute`)."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

from meshkit.client import ServiceClient
from meshkit.errors import ConfigurationError, MeshkitError
from meshkit.gateway.config import BffCall, BffRoute
from meshkit.gateway.plugin import ProxyRequest, Reply
from meshkit.gateway.router import PathMatcher
from meshkit.tracing import TRACE_HEADERS

__all__ = ["Aggregation", "CustomHandler"]

log = logging.getLogger(__name__)

CustomHandler = Callable[[ProxyRequest, dict[str, Any]], Awaitable[Reply | dict[str, Any]]]
_MISSING = object()


class Aggregation:
    """The handler of one BFF route: ``await aggregation(request, body) -> Reply``."""

    def __init__(self, spec: BffRoute, clients: Mapping[str, ServiceClient]) -> None:
        self.spec = spec
        self.clients = dict(clients)  # call name -> client
        self.custom: CustomHandler | None = _import(spec.handler) if spec.handler else None
        # call paths are templates over the route's params
        self._paths = {name: call.path for name, call in spec.calls.items()}
        self._needs = {name: _dependencies(spec, name) for name in spec.calls}
        _check_acyclic(spec.name, self._needs)

    async def __call__(self, req: ProxyRequest, body: bytes) -> Reply:
        spec = self.spec
        names = list(spec.calls)
        tasks: dict[str, asyncio.Future[Any]] = {}
        for name in _in_order(self._needs):
            needed = {dep: tasks[dep] for dep in self._needs[name]}
            tasks[name] = asyncio.ensure_future(self._call(name, spec.calls[name], req, needed))
        _, pending = await asyncio.wait(tasks.values(), timeout=spec.timeout)
        for task in pending:
            task.cancel()
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        for name in names:
            task = tasks[name]
            if task in pending:
                failures[name] = f"no answer within {spec.timeout:g}s"
                continue
            outcome = task.result()
            if isinstance(outcome, _Failed):
                failures[name] = outcome.reason
            else:
                results[name] = outcome
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        required = [n for n in failures if spec.calls[n].required]
        if failures and (spec.on_error == "fail" or required):
            return Reply.error(502, "the aggregation could not be completed", failed=failures, route=spec.name)
        if self.custom is not None:
            shaped = await self.custom(req, results)
            if isinstance(shaped, Reply):
                return shaped
            data: dict[str, Any] = dict(shaped)
        elif spec.shape is not None:
            data = {}
            for field, source in spec.shape.items():
                value = _lookup(results, source)
                if value is not _MISSING:
                    data[field] = value
        else:
            data = dict(results)
        if failures:
            data["_missing"] = sorted(failures)
        return Reply.json(200, data)

    async def _call(
        self, name: str, call: BffCall, req: ProxyRequest, needed: Mapping[str, asyncio.Future[Any]]
    ) -> Any:
        values: dict[str, Any] = dict(req.params)
        for dep, future in needed.items():
            result = await future
            if isinstance(result, _Failed):
                return _Failed(f"needs {dep!r}, which failed")
            values[dep] = result
        try:
            path = _PLACEHOLDER.sub(lambda m: _fill(m.group(1), values), self._paths[name])
        except LookupError as exc:
            return _Failed(f"the call's path needs {{{exc.args[0]}}}, which is not there")
        headers = {h: v for h in call.forward_headers if (v := req.headers.get(h)) is not None}
        headers.update((h, v) for h in TRACE_HEADERS if (v := req.headers.get(h)) is not None)
        try:
            response = await self.clients[name].request(call.method, path, headers=headers, timeout=self.spec.timeout)
        except MeshkitError as exc:
            return _Failed(str(exc))
        if response.status >= 400:
            return _Failed(f"answered {response.status}")
        try:
            return json.loads(response.content) if response.content else None
        except ValueError:
            return _Failed("answered a body that is not JSON")


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")


def _fill(reference: str, values: Mapping[str, Any]) -> str:
    head, _, rest = reference.partition(".")
    if head not in values:
        raise LookupError(reference)
    value = _lookup({head: values[head]}, reference) if rest else values[head]
    if value is _MISSING or value is None or isinstance(value, dict | list):
        raise LookupError(reference)
    return quote(str(value), safe="")


def _dependencies(spec: BffRoute, name: str) -> set[str]:
    needs = set()
    for m in _PLACEHOLDER.finditer(spec.calls[name].path):
        head, dot, _ = m.group(1).partition(".")
        if dot:
            if head not in spec.calls or head == name:
                raise ConfigurationError(
                    f"BFF route {spec.name!r}: call {name!r} uses {{{m.group(1)}}}, but {head!r} is not another call"
                )
            needs.add(head)
    return needs


def _check_acyclic(route: str, needs: Mapping[str, set[str]]) -> None:
    try:
        _in_order(needs)
    except ValueError:
        raise ConfigurationError(f"BFF route {route!r}: its calls depend on each other in a cycle") from None


def _in_order(needs: Mapping[str, set[str]]) -> list[str]:
    """Call names, each after the calls it needs (ValueError on a cycle)."""
    done: list[str] = []
    left = dict(needs)
    while left:
        ready = [n for n, deps in left.items() if deps <= set(done)]
        if not ready:
            raise ValueError("cycle")
        for n in ready:
            done.append(n)
            del left[n]
    return done


class _Failed:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lookup(results: Mapping[str, Any], path: str) -> Any:
    node: Any = results
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _import(reference: str) -> CustomHandler:
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"handler {reference!r} must be 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import the BFF handler module {module_name!r}: {exc}") from exc
    handler = getattr(module, attr, None)
    if handler is None or not callable(handler):
        raise ConfigurationError(f"{module_name!r} has no callable {attr!r} (BFF handler {reference!r})")
    return handler  # type: ignore[no-any-return]


def bff_matcher(spec: BffRoute) -> PathMatcher:
    """BFF paths are templates (``/bff/mobile/orders/{id}``)."""
    return PathMatcher.build(template=spec.path)
