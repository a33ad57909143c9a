"""Route matching: host, path (exact, prefix, template), method, headers; first match in config order wins.

A prefix matches whole segments: ``/api/orders`` matches ``/api/orders`` and ``/api/orders/7``, not
``/api/ordersX``. A template names segments: ``/orders/{id}`` matches ``/orders/7`` (``params = {"id": "7"}``);
``{rest:path}`` as the last segment takes the rest of the path, slashes included. Paths are matched after the
server normalised them (see ``_http.normalise_path``), case-sensitively unless the route says otherwise.

The rewrite of a route: for a prefix route, the matched prefix is replaced by it (``rewrite: /`` strips the
prefix); for an exact or template route, it is a template filled with the params (``/v2/orders/{id}``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meshkit.errors import ConfigurationError

__all__ = ["Match", "PathMatcher", "Router"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path|segment))?\}")


@dataclass(frozen=True, slots=True)
class PathMatcher:
    """One route's path condition and rewrite, compiled."""

    kind: Literal["exact", "prefix", "template"]
    path: str
    case_insensitive: bool = False
    rewrite: str | None = None
    _regex: re.Pattern[str] | None = field(default=None, repr=False)
    _params: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def build(
        cls,
        *,
        exact: str | None = None,
        prefix: str | None = None,
        template: str | None = None,
        case_insensitive: bool = False,
        rewrite: str | None = None,
    ) -> PathMatcher:
        given = [(k, v) for k, v in (("exact", exact), ("prefix", prefix), ("template", template)) if v is not None]
        if len(given) != 1:
            raise ConfigurationError("a route's path needs exactly one of exact, prefix, template")
        kind, path = given[0]
        if not path.startswith("/"):
            raise ConfigurationError(f"a route's path must start with '/': {path!r}")
        params: tuple[str, ...] = ()
        regex = None
        flags = re.IGNORECASE if case_insensitive else 0
        if kind == "template":
            parts: list[str] = []
            names: list[str] = []
            last = 0
            for m in _PARAM.finditer(path):
                parts.append(re.escape(path[last : m.start()]))
                name = m.group(1)
                if name in names:
                    raise ConfigurationError(f"the template {path!r} names {{{name}}} twice")
                names.append(name)
                if m.group(2) == "path":
                    if m.end() != len(path):
                        raise ConfigurationError(f"{{{name}:path}} must be the last part of the template {path!r}")
                    parts.append(f"(?P<{name}>.*)")
                else:
                    parts.append(f"(?P<{name}>[^/]+)")
                last = m.end()
            rest = path[last:]
            literal = _PARAM.sub("", path)
            if "{" in literal or "}" in literal:
                raise ConfigurationError(f"the template {path!r} has a brace that is not a {{name}}")
            parts.append(re.escape(rest))
            regex = re.compile("".join(parts), flags)
            params = tuple(names)
        elif kind == "prefix" and path != "/":
            path = path.rstrip("/")
        if rewrite is not None:
            if not rewrite.startswith("/"):
                raise ConfigurationError(f"a rewrite must start with '/': {rewrite!r}")
            unknown = {m.group(1) for m in _PARAM.finditer(rewrite)} - set(params)
            if unknown:
                raise ConfigurationError(
                    f"the rewrite {rewrite!r} uses {', '.join(sorted(unknown))}, which the route's path does not name"
                )
        return cls(kind, path, case_insensitive, rewrite, regex, params)  # type: ignore[arg-type]

    def match(self, path: str) -> dict[str, str] | None:
        """The template params (empty for exact / prefix) if ``path`` matches, else None."""
        if self.kind == "prefix":
            mine = self.path
            candidate = path.lower() if self.case_insensitive else path
            probe = mine.lower() if self.case_insensitive else mine
            if mine == "/" or candidate == probe or candidate.startswith(probe + "/"):
                return {}
            return None
        if self.kind == "exact":
            same = path.lower() == self.path.lower() if self.case_insensitive else path == self.path
            return {} if same else None
        assert self._regex is not None
        m = self._regex.fullmatch(path)
        return m.groupdict() if m is not None else None

    def rewritten(self, path: str, params: Mapping[str, str]) -> str:
        """The path the upstream receives."""
        rewrite = self.rewrite
        if rewrite is None:
            return path
        if self.kind == "prefix":
            rest = path[len(self.path) :] if self.path != "/" else path
            if rewrite.endswith("/") and rest.startswith("/"):
                rest = rest[1:]
            joined = rewrite + rest
            return joined if joined else "/"
        return _PARAM.sub(lambda m: params[m.group(1)], rewrite)


@dataclass(frozen=True, slots=True)
class Match:
    """A matched route and its path params."""

    route: Any
    params: dict[str, str]


class Router:
    """Routes in config order; :meth:`match` returns the first that matches, or the status that explains why none
    did (404: no route for the path; 405: a route for the path, not for the method)."""

    __slots__ = ("_routes", "by_host")

    def __init__(self, routes: Sequence[Any]) -> None:
        # each route has .hosts (frozenset | None), .methods (frozenset | None), .headers (tuple of
        # (name, pattern | None)), .path (PathMatcher)
        self._routes = tuple(routes)
        #: whether any route matches on the host (else the server need not work out the host name)
        self.by_host = any(r.hosts is not None for r in self._routes)

    @property
    def routes(self) -> tuple[Any, ...]:
        return self._routes

    def match(self, host: str, method: str, path: str, headers: Any) -> Match | int:
        status = 404
        for route in self._routes:
            params = route.path.match(path)
            if params is None:
                continue
            if route.hosts is not None and host not in route.hosts:
                continue
            conditions = route.headers
            if conditions and not all(_header_ok(headers, name, pattern) for name, pattern in conditions):
                continue
            if route.methods is not None and method not in route.methods:
                status = 405
                continue
            return Match(route, params)
        return status


def _header_ok(headers: Any, name: str, pattern: re.Pattern[str] | None) -> bool:
    value = headers.get(name)
    if value is None:
        return False
    return pattern is None or pattern.fullmatch(value) is not None
