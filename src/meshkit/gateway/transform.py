"""Request and response transformation plugins: headers, query parameters and JSON bodies.

Three plugins, each configured per route (or globally) in the gateway's YAML::

    plugins:
      - headers:
          request:  {set: {X-Consumer: "{consumer}"}, remove: [X-Debug]}
          response: {add: {X-Served-By: gateway}, rename: {X-Upstream-Time: X-Backend-Time}}
      - query: {set: {api_version: "2"}, remove: [debug]}
      - json_body:
          response: {remove: [password, card.number], set: {source: gateway}}

- :class:`HeaderTransform` (``headers``) edits request and response headers. Operations run in the order
  ``remove``, ``rename``, ``set``, ``add``. Values are templates: ``{consumer}``, ``{client}``, ``{route}`` and
  ``{param.<name>}`` (a path template parameter) are replaced per request; ``{{`` and ``}}`` are literal braces.
  A template whose placeholder has no value for a request (no consumer, no such parameter) or whose value holds a
  CR, LF or NUL is not applied: ``set`` then removes the header (so a client can never supply it itself) and
  ``add`` adds nothing. Header names must be RFC 9110 tokens; ``Content-Length`` and ``Transfer-Encoding``
  belong to the gateway and cannot be touched.
- :class:`QueryTransform` (``query``) edits the query string with the same four operations and templates.
  Parameters no operation touches are kept byte for byte, in order, repeats included; new values are
  percent-encoded (a space is ``%20``).
- :class:`JsonBodyTransform` (``json_body``) edits JSON bodies (``application/json`` or any ``+json`` type;
  other bodies pass through untouched). Operations run in the order ``select``, ``rename``, ``remove``, ``set``
  and name fields by dotted paths into nested objects (``card.number``). When a path crosses an array, the
  operation applies to each element of it (``items.price`` reaches the ``price`` of every item; a body that is an
  array is crossed the same way). A request body that is not valid JSON is refused with a 400
  (:class:`BodyRejected`); a response body that is not valid JSON is sent on unchanged.

Configuration mistakes (an unknown placeholder, a bad header name, a value with a line break, an empty path)
are reported when the config is loaded, never per request.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from typing import Any, ClassVar
from urllib.parse import quote, unquote_plus

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshkit.errors import ConfigurationError, MeshkitError
from meshkit.gateway.plugin import Headers, Plugin, PluginContext, ProxyRequest, Reply, ResponseHead

__all__ = [
    "BodyRejected",
    "HeaderOperations",
    "HeaderTransform",
    "JsonBodyTransform",
    "JsonOperations",
    "QueryTransform",
]

log = logging.getLogger(__name__)

# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
#: framing is the gateway's business: a plugin that changed these would desynchronise the connection
_FRAMING = frozenset({"content-length", "transfer-encoding"})


class BodyRejected(MeshkitError):
    """A request body a plugin refuses (``json_body``: not valid JSON). The gateway answers it with :meth:`reply`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def reply(self) -> Reply:
        """The gateway's JSON error reply for this rejection."""
        return Reply.error(self.status, self.message)


# -- templates ----------------------------------------------------------------------------------------------------

#: one compiled template: literal strings and placeholders (``("consumer",)``, ``("param", "id")``, ...)
_Part = str | tuple[str, ...]
_Template = tuple[_Part, ...]


def _compile_template(text: str, where: str) -> _Template | str:
    """``text`` as a static string (no placeholders) or a tuple of parts; an unknown placeholder is a config error."""
    parts: list[_Part] = []
    literal: list[str] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        literal.append(text[pos : match.start()])
        pos = match.end()
        found = match.group(0)
        if found == "{{":
            literal.append("{")
            continue
        if found == "}}":
            literal.append("}")
            continue
        name = match.group(1)
        if name is None:
            raise ConfigurationError(
                f"{where}: unbalanced brace in {text!r}", hint="write a literal brace as '{{' or '}}'"
            )
        name = name.strip()
        if name in ("consumer", "client", "route"):
            part: _Part = (name,)
        elif name.startswith("param.") and len(name) > len("param."):
            part = ("param", name[len("param.") :])
        else:
            raise ConfigurationError(
                f"{where}: unknown placeholder {{{name}}} in {text!r}",
                hint="use {consumer}, {client}, {route} or {param.<name>}",
            )
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(part)
    literal.append(text[pos:])
    tail = "".join(literal)
    if not parts:
        return tail
    if tail:
        parts.append(tail)
    return tuple(parts)


def _render(template: _Template | str, req: ProxyRequest) -> str | None:
    """The template's value for ``req``; ``None`` when a placeholder has no value or the value is unsafe."""
    if isinstance(template, str):
        return template
    out: list[str] = []
    for part in template:
        if isinstance(part, str):
            out.append(part)
            continue
        kind = part[0]
        value: str | None
        if kind == "consumer":
            value = req.consumer
        elif kind == "client":
            value = req.client
        elif kind == "route":
            value = req.route
        else:
            value = req.params.get(part[1])
        if value is None:
            return None
        out.append(value)
    result = "".join(out)
    if _BAD_VALUE.search(result) is not None:
        log.debug("template value refused: it holds CR, LF or NUL", extra={"route": req.route})
        return None
    return result


def _check_template_values(values: dict[str, str], where: str) -> dict[str, str]:
    for key, value in values.items():
        try:
            _compile_template(value, f"{where}.{key}")
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
    return values


# -- headers ------------------------------------------------------------------------------------------------------


def _check_header_name(name: str) -> str:
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not a valid header name (RFC 9110 token characters only)")
    if name.lower() in _FRAMING:
        raise ValueError(f"{name!r} is managed by the gateway and cannot be transformed")
    return name


def _check_header_value(value: str) -> str:
    if _BAD_VALUE.search(value) is not None:
        raise ValueError(f"header value {value!r} holds a CR, LF or NUL character")
    return value


class HeaderOperations(BaseModel):
    """What to do to one direction's headers; applied in the order remove, rename, set, add."""

    model_config = ConfigDict(extra="forbid")

    #: headers to add (after any that are there already); values are templates
    add: dict[str, str] = Field(default_factory=dict)
    #: headers to replace (every existing field of that name goes); values are templates
    set: dict[str, str] = Field(default_factory=dict)
    #: headers to drop
    remove: list[str] = Field(default_factory=list)
    #: headers to rename ``{old: new}``: ``new`` gets the values of ``old`` (replacing its own)
    rename: dict[str, str] = Field(default_factory=dict)

    @field_validator("add", "set")
    @classmethod
    def _values(cls, values: dict[str, str]) -> dict[str, str]:
        for name, value in values.items():
            _check_header_name(name)
            _check_header_value(value)
        return _check_template_values(values, "header")

    @field_validator("remove")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            _check_header_name(name)
        return names

    @field_validator("rename")
    @classmethod
    def _renames(cls, renames: dict[str, str]) -> dict[str, str]:
        for old, new in renames.items():
            _check_header_name(old)
            _check_header_name(new)
        return renames


class _HeaderPlan:
    """One direction's operations, compiled: names lower-cased, templates parsed."""

    __slots__ = ("add", "empty", "remove", "rename", "set")

    def __init__(self, ops: HeaderOperations, where: str) -> None:
        for name in (*ops.add, *ops.set, *ops.remove, *ops.rename, *ops.rename.values()):
            try:
                _check_header_name(name)
            except ValueError as exc:
                raise ConfigurationError(f"{where}: {exc}") from None
        for value in (*ops.add.values(), *ops.set.values()):
            if _BAD_VALUE.search(value) is not None:
                raise ConfigurationError(f"{where}: header value {value!r} holds a CR, LF or NUL character")
        self.remove = tuple(name.lower() for name in ops.remove)
        self.rename = tuple((old.lower(), new.lower()) for old, new in ops.rename.items())
        self.set = tuple((k.lower(), _compile_template(v, f"{where}.set.{k}")) for k, v in ops.set.items())
        self.add = tuple((k.lower(), _compile_template(v, f"{where}.add.{k}")) for k, v in ops.add.items())
        self.empty = not (self.remove or self.rename or self.set or self.add)

    def apply(self, headers: Headers, req: ProxyRequest) -> None:
        for name in self.remove:
            headers.remove(name)
        for old, new in self.rename:
            values = headers.get_all(old)
            if values:
                headers.remove(old)
                headers.remove(new)
                for value in values:
                    headers.add(new, value)
        for name, template in self.set:
            rendered = _render(template, req)
            if rendered is None:
                headers.remove(name)
            else:
                headers.set(name, rendered)
        for name, template in self.add:
            rendered = _render(template, req)
            if rendered is not None:
                headers.add(name, rendered)


class HeaderTransform(Plugin):
    """``headers``: add, set, remove and rename request and response headers (values may be templates).

    YAML: ``- headers: {request: {set: {X-User: "{consumer}"}}, response: {remove: [Server]}}``.
    """

    name: ClassVar[str] = "headers"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        #: operations on the request sent upstream
        request: HeaderOperations = Field(default_factory=HeaderOperations)
        #: operations on the response sent to the client
        response: HeaderOperations = Field(default_factory=HeaderOperations)

    def __init__(self, options: Any = None, context: PluginContext | None = None) -> None:
        opts = options if options is not None else self.Options()
        self._request = _HeaderPlan(opts.request, "headers.request")
        self._response = _HeaderPlan(opts.response, "headers.response")

    def request(self, req: ProxyRequest) -> None:
        if not self._request.empty:
            self._request.apply(req.headers, req)

    def response(self, req: ProxyRequest, resp: ResponseHead) -> None:
        if not self._response.empty:
            self._response.apply(resp.headers, req)


# -- query --------------------------------------------------------------------------------------------------------


def _check_param_names(names: list[str] | dict[str, str]) -> None:
    for name in names:
        if not name:
            raise ValueError("a query parameter name cannot be empty")


class QueryTransform(Plugin):
    """``query``: add, set, remove and rename query parameters of the request sent upstream.

    Applied in the order remove, rename, set, add. ``set`` replaces every occurrence (the new one takes the place
    of the first; appended when there was none); ``add`` appends; ``rename`` keeps each value (still encoded as the
    client sent it) under the new name, replacing the new name's own values. Values are templates as in
    ``headers``; a template with no value for a request removes (``set``) or adds nothing (``add``).

    YAML: ``- query: {set: {version: "2"}, remove: [debug], rename: {q: search}}``.
    """

    name: ClassVar[str] = "query"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        add: dict[str, str] = Field(default_factory=dict)
        set: dict[str, str] = Field(default_factory=dict)
        remove: list[str] = Field(default_factory=list)
        rename: dict[str, str] = Field(default_factory=dict)

        @field_validator("add", "set")
        @classmethod
        def _values(cls, values: dict[str, str]) -> dict[str, str]:
            _check_param_names(values)
            return _check_template_values(values, "query")

        @field_validator("remove")
        @classmethod
        def _names(cls, names: list[str]) -> list[str]:
            _check_param_names(names)
            return names

        @field_validator("rename")
        @classmethod
        def _renames(cls, renames: dict[str, str]) -> dict[str, str]:
            _check_param_names(renames)
            _check_param_names(list(renames.values()))
            return renames

    def __init__(self, options: Any = None, context: PluginContext | None = None) -> None:
        opts = options if options is not None else self.Options()
        for name in (*opts.add, *opts.set, *opts.remove, *opts.rename, *opts.rename.values()):
            if not name:
                raise ConfigurationError("query: a query parameter name cannot be empty")
        self._remove = frozenset(opts.remove)
        self._rename = tuple((old, new, quote(new, safe="")) for old, new in opts.rename.items())
        self._set = tuple((k, quote(k, safe=""), _compile_template(v, f"query.set.{k}")) for k, v in opts.set.items())
        self._set_names = frozenset(opts.set)
        self._add = tuple((k, quote(k, safe=""), _compile_template(v, f"query.add.{k}")) for k, v in opts.add.items())
        # names whose presence in the query makes us rewrite it (otherwise only set/add can change it)
        self._touched = self._remove | frozenset(opts.rename) | self._set_names

    def request(self, req: ProxyRequest) -> None:
        query = req.query
        if not query and not self._set and not self._add:
            return
        # (decoded name, raw piece) for every parameter, as sent; empty pieces (a=1&&b=2) are dropped
        pieces: list[tuple[str, str]] = []
        touched = False
        if query:
            for piece in query.split("&"):
                if not piece:
                    continue
                raw_name = piece.partition("=")[0]
                name = unquote_plus(raw_name) if ("%" in raw_name or "+" in raw_name) else raw_name
                pieces.append((name, piece))
                if name in self._touched:
                    touched = True
        if not touched and not self._set and not self._add:
            return
        if self._remove:
            pieces = [(n, p) for n, p in pieces if n not in self._remove]
        for old, new, encoded in self._rename:
            if any(n == old for n, _ in pieces):
                renamed: list[tuple[str, str]] = []
                for n, p in pieces:
                    if n == old:
                        _, eq, raw_value = p.partition("=")
                        renamed.append((new, encoded + eq + raw_value))
                    elif n != new:
                        renamed.append((n, p))
                pieces = renamed
        for name, encoded, template in self._set:
            value = _render(template, req)
            first = next((i for i, (n, _) in enumerate(pieces) if n == name), -1)
            pieces = [(n, p) for n, p in pieces if n != name]
            if value is None:
                continue
            new_piece = (name, f"{encoded}={quote(value, safe='')}")
            if first < 0:
                pieces.append(new_piece)
            else:
                pieces.insert(first, new_piece)
        for name, encoded, template in self._add:
            value = _render(template, req)
            if value is not None:
                pieces.append((name, f"{encoded}={quote(value, safe='')}"))
        req.query = "&".join(p for _, p in pieces)


# -- JSON bodies --------------------------------------------------------------------------------------------------

_Path = tuple[str, ...]


def _parse_path(path: str, where: str) -> _Path:
    parts = tuple(path.split("."))
    if not path or any(not p for p in parts):
        raise ConfigurationError(f"{where}: {path!r} is not a valid dotted path", hint="write fields as a.b.c")
    return parts


def _check_paths(paths: list[str] | dict[str, Any]) -> None:
    for path in paths:
        if not path or any(not p for p in path.split(".")):
            raise ValueError(f"{path!r} is not a valid dotted path (write fields as a.b.c)")


class JsonOperations(BaseModel):
    """What to do to one direction's JSON body; applied in the order select, rename, remove, set."""

    model_config = ConfigDict(extra="forbid")

    #: ``{"a.b": "c"}``: move a field (the part both paths share is walked first, element-wise through arrays)
    rename: dict[str, str] = Field(default_factory=dict)
    #: fields to delete
    remove: list[str] = Field(default_factory=list)
    #: fields to set to a JSON value (missing objects on the way are created)
    set: dict[str, Any] = Field(default_factory=dict)
    #: fields to keep (everything else goes); empty: keep everything
    select: list[str] = Field(default_factory=list)

    @field_validator("remove", "select")
    @classmethod
    def _paths(cls, paths: list[str]) -> list[str]:
        _check_paths(paths)
        return paths

    @field_validator("rename")
    @classmethod
    def _renames(cls, renames: dict[str, str]) -> dict[str, str]:
        _check_paths(renames)
        _check_paths(list(renames.values()))
        return renames

    @field_validator("set")
    @classmethod
    def _sets(cls, values: dict[str, Any]) -> dict[str, Any]:
        _check_paths(values)
        try:
            json.dumps(values)  # a value that is not JSON fails at load, not per request
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a value is not JSON: {exc}") from None
        return values


#: the selection tree: ``True`` keeps the whole value, a dict keeps the listed members of an object
_Selection = dict[str, "_Selection | bool"]


def _selection(paths: list[_Path]) -> _Selection:
    tree: _Selection = {}
    for path in paths:
        node = tree
        for i, key in enumerate(path):
            last = i == len(path) - 1
            current = node.get(key)
            if current is True:
                break  # a shorter path keeps it all already
            if last:
                node[key] = True
                break
            if not isinstance(current, dict):
                current = node[key] = {}
            node = current
    return tree


def _select(value: Any, tree: _Selection) -> tuple[Any, bool]:
    """``value`` with only the selected members; and whether anything was dropped."""
    if isinstance(value, list):
        changed = False
        out = []
        for item in value:
            kept, dropped = _select(item, tree)
            out.append(kept)
            changed = changed or dropped
        return out, changed
    if not isinstance(value, dict):
        return value, False
    result: dict[str, Any] = {}
    changed = False
    for key, member in value.items():
        sub = tree.get(key)
        if sub is None:
            changed = True
        elif sub is True:
            result[key] = member
        else:
            assert isinstance(sub, dict)
            kept, dropped = _select(member, sub)
            result[key] = kept
            changed = changed or dropped
    return result, changed


def _objects_at(value: Any, path: _Path) -> list[dict[str, Any]]:
    """Every object reached by walking ``path`` from ``value``, crossing arrays element-wise."""
    current: list[Any] = [value]
    for key in path:
        nxt: list[Any] = []
        for node in _flatten(current):
            if isinstance(node, dict) and key in node:
                nxt.append(node[key])
        current = nxt
    return [node for node in _flatten(current) if isinstance(node, dict)]


def _flatten(nodes: list[Any]) -> list[Any]:
    """Arrays replaced by their elements (recursively): a path crosses arrays."""
    out: list[Any] = []
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        else:
            out.append(node)
    return out


def _remove(value: Any, path: _Path) -> bool:
    changed = False
    for obj in _objects_at(value, path[:-1]):
        if path[-1] in obj:
            del obj[path[-1]]
            changed = True
    return changed


def _set(value: Any, path: _Path, new: Any) -> bool:
    changed = False
    mutable = isinstance(new, dict | list)
    for obj in _objects_or_created(value, path[:-1]):
        obj[path[-1]] = copy.deepcopy(new) if mutable else new
        changed = True
    return changed


def _objects_or_created(value: Any, path: _Path) -> list[dict[str, Any]]:
    """Like :func:`_objects_at`, creating missing members as empty objects (never replacing a non-object)."""
    current: list[dict[str, Any]] = [n for n in _flatten([value]) if isinstance(n, dict)]
    for key in path:
        nxt: list[dict[str, Any]] = []
        for obj in current:
            if key not in obj:
                obj[key] = {}
            nxt.extend(n for n in _flatten([obj[key]]) if isinstance(n, dict))
        current = nxt
    return current


def _rename(value: Any, shared: _Path, source: _Path, target: _Path) -> bool:
    """Move ``shared + source`` to ``shared + target`` in each object reached by ``shared``.

    Past the shared part, ``source`` and ``target`` walk objects only (an array there: that object is skipped).
    """
    changed = False
    for obj in _objects_at(value, shared):
        holder: Any = obj
        for key in source[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or source[-1] not in holder:
            continue
        dest: Any = obj
        for key in target[:-1]:
            if not isinstance(dest, dict):
                break
            if key not in dest:
                dest[key] = {}
            dest = dest[key]
        if not isinstance(dest, dict):
            continue
        dest[target[-1]] = holder.pop(source[-1])
        changed = True
    return changed


class _JsonPlan:
    __slots__ = ("empty", "remove", "rename", "select", "set")

    def __init__(self, ops: JsonOperations, where: str) -> None:
        select = [_parse_path(p, f"{where}.select") for p in ops.select]
        self.select: _Selection | None = _selection(select) if select else None
        self.rename: list[tuple[_Path, _Path, _Path]] = []
        for old, new in ops.rename.items():
            src, dst = _parse_path(old, f"{where}.rename"), _parse_path(new, f"{where}.rename")
            if src == dst:
                continue
            common = 0
            while common < min(len(src), len(dst)) - 1 and src[common] == dst[common]:
                common += 1
            if src[: len(dst)] == dst or dst[: len(src)] == src:
                raise ConfigurationError(f"{where}.rename: {old!r} and {new!r} contain one another")
            self.rename.append((src[:common], src[common:], dst[common:]))
        self.remove = [_parse_path(p, f"{where}.remove") for p in ops.remove]
        self.set = [(_parse_path(p, f"{where}.set"), v) for p, v in ops.set.items()]
        try:
            json.dumps(ops.set)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}.set: a value is not JSON: {exc}") from None
        self.empty = self.select is None and not (self.rename or self.remove or self.set)

    def apply(self, data: Any) -> tuple[Any, bool]:
        changed = False
        if self.select is not None:
            data, changed = _select(data, self.select)
        for shared, source, target in self.rename:
            changed = _rename(data, shared, source, target) or changed
        for path in self.remove:
            changed = _remove(data, path) or changed
        for path, value in self.set:
            changed = _set(data, path, value) or changed
        return data, changed


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(body: bytes) -> Any:
    return json.loads(body, parse_constant=_no_constants)


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


class JsonBodyTransform(Plugin):
    """``json_body``: rename, remove, set and select fields of JSON request and response bodies.

    Only bodies whose ``Content-Type`` is ``application/json`` or ``application/*+json`` are touched. An empty body
    passes through. A request body that is not valid JSON raises :class:`BodyRejected` (400); a response body that
    is not valid JSON is sent on unchanged. A body no operation changes is forwarded byte for byte; a changed one is
    re-encoded as compact UTF-8 JSON (the gateway recomputes the framing of buffered bodies).

    YAML: ``- json_body: {response: {remove: [password], rename: {"user.mail": email}, set: {source: gateway}}}``.
    """

    name: ClassVar[str] = "json_body"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        request: JsonOperations = Field(default_factory=JsonOperations)
        response: JsonOperations = Field(default_factory=JsonOperations)

    def __init__(self, options: Any = None, context: PluginContext | None = None) -> None:
        opts = options if options is not None else self.Options()
        self._request = _JsonPlan(opts.request, "json_body.request")
        self._response = _JsonPlan(opts.response, "json_body.response")

    def uses(self, hook: str) -> bool:
        """Only the directions with operations buffer their bodies."""
        if hook == "request_body":
            return not self._request.empty
        if hook == "response_body":
            return not self._response.empty
        return super().uses(hook)

    def request_body(self, req: ProxyRequest, body: bytes) -> bytes:
        plan = self._request
        if plan.empty or not body or not _is_json(req.headers.get("content-type")):
            return body
        try:
            data = _loads(body)
        except (ValueError, RecursionError) as exc:
            raise BodyRejected(400, f"the request body is not valid JSON: {exc}") from exc
        data, changed = plan.apply(data)
        return _dumps(data) if changed else body

    def response_body(self, req: ProxyRequest, resp: ResponseHead, body: bytes) -> bytes:
        plan = self._response
        if plan.empty or not body or not _is_json(resp.headers.get("content-type")):
            return body
        try:
            data = _loads(body)
        except (ValueError, RecursionError) as exc:
            log.debug(
                "response body is not valid JSON; sent unchanged",
                extra={"route": req.route, "status": resp.status, "error": str(exc)},
            )
            return body
        data, changed = plan.apply(data)
        return _dumps(data) if changed else body
