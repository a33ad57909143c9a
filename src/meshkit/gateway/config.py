"""The gateway's YAML configuration: models, loading with errors that name the key and the line, JSON Schema.

A minimal file::

    listen: {port: 8080}
    routes:
      - name: orders
        path: /api/orders          # a prefix (whole segments); or exact: / template:
        service: orders            # resolved through the registry; or targets: ["127.0.0.1:9000"]
        rewrite: /orders
        plugins:
          - rate_limit: {limit: 100, window: 1s}

Durations are seconds or strings with a unit (``250ms``, ``10s``, ``5m``, ``1h``); sizes are bytes or strings
(``512KiB``, ``1MB``). ``meshkit gateway schema`` prints the JSON Schema (editors validate and complete with
it); docs/gateway.md is the reference.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from meshkit._core.optional import require
from meshkit.errors import ConfigurationError

__all__ = [
    "AdminConfig",
    "BffCall",
    "BffRoute",
    "BreakerConfig",
    "ByteSize",
    "Duration",
    "GatewayConfig",
    "ListenConfig",
    "RouteConfig",
    "StaticTarget",
    "load_config",
    "parse_config",
    "parse_seconds",
    "parse_size",
    "to_bytes",
    "to_seconds",
]

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_SIZES = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_seconds(value: object) -> float:
    """Seconds from a number or a string: ``30``, ``"2.5"``, ``"250ms"``, ``"10s"``, ``"5m"``, ``"1h"``, ``"1d"``.
    The one duration syntax of the gateway's YAML (routes, limits and every plugin's options)."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")  # noqa: TRY004 - pydantic turns ValueError into its error
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)) is not None:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration (use seconds, or a number with ms, s, m, h or d)")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration: it must be finite and not negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a number or a string: ``1024``, ``"10KB"`` (1000s), ``"512KiB"`` / ``"512K"`` (1024s), ``"1MB"``,
    ``"1MiB"``, ``"1GB"``...; units are case-insensitive. The one size syntax of the gateway's YAML."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")  # noqa: TRY004 - pydantic turns ValueError into its error
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and (m := _SIZE.fullmatch(value)) is not None and m.group(2).lower() in _SIZES:
        return int(float(m.group(1)) * _SIZES[m.group(2).lower()])
    raise ValueError(f"{value!r} is not a size (use bytes, or a number with KB, KiB, MB, MiB, GB, GiB)")


def to_seconds(value: object) -> object:
    """For pydantic: strings become seconds (:func:`parse_seconds`); other values are pydantic's to check."""
    return parse_seconds(value) if isinstance(value, str) else value


def to_bytes(value: object) -> object:
    """For pydantic: strings become bytes (:func:`parse_size`); other values are pydantic's to check."""
    return parse_size(value) if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(to_seconds), Field(gt=0)]
ByteSize = Annotated[int, BeforeValidator(to_bytes), Field(gt=0)]
PluginList = list[dict[str, dict[str, Any] | None]]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Model):
    """TLS termination: ``cert`` / ``key`` (PEM files); ``client_ca`` asks clients for a certificate signed by it
    (``require_client_cert`` refuses those without one)."""

    cert: str
    key: str
    client_ca: str | None = None
    require_client_cert: bool = False


class ListenConfig(_Model):
    """Where clients connect. With ``tls``, HTTP/2 is negotiated (ALPN); without it, ``h2c: true`` also accepts
    cleartext HTTP/2 with prior knowledge beside HTTP/1.1 (for a TLS-terminating load balancer in front that
    speaks h2c)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tls: TlsConfig | None = None
    h2c: bool = False

    @model_validator(mode="after")
    def _h2c_without_tls(self) -> ListenConfig:
        if self.h2c and self.tls is not None:
            raise ValueError("h2c is cleartext HTTP/2: with tls, HTTP/2 is negotiated by ALPN already; drop h2c")
        return self


class AdminConfig(_Model):
    """The admin API (routes, upstream health, breakers, rate-limit stats, cache purge, /metrics), on its own
    port. Every request needs ``Authorization: Bearer <token>``; the token comes from ``token`` or the environment
    variable ``token_env``."""

    host: str = "127.0.0.1"
    port: int = Field(default=9901, ge=0, le=65535)
    token: str | None = None
    token_env: str | None = None


class LimitsConfig(_Model):
    max_header_bytes: ByteSize = 32 * 1024
    header_timeout: Duration = 10.0
    keepalive_timeout: Duration = 60.0
    max_body: ByteSize = 10 * 1024 * 1024
    websocket_idle_timeout: Duration = 300.0
    send_timeout: Duration = 60.0  # a client that reads nothing of its response for this long is disconnected


class BreakerConfig(_Model):
    """A route's circuit breaker: opens when ``failure_rate`` % of the last ``window`` calls failed (errors and
    5xx), once ``minimum_calls`` are in; after ``wait`` it lets ``half_open_calls`` probes through."""

    failure_rate: float = Field(default=50.0, gt=0, le=100)
    window: int = Field(default=20, ge=1)
    minimum_calls: int = Field(default=10, ge=1)
    wait: Duration = 10.0
    half_open_calls: int = Field(default=3, ge=1)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return value


class StaticTarget(_Model):
    """One static target: ``address`` (``host:port``) and its ``weight`` (it gets about ``weight`` times the
    requests of a target of weight 1, as an instance's ``weight`` metadata in the registry does). In YAML a plain
    ``"host:port"`` string is a target of weight 1."""

    address: str
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return _host_port(value)


def _static_target(value: object) -> object:
    """For pydantic: ``"host:port"`` is ``{address: "host:port"}`` (checked here, so its error names the item)."""
    if isinstance(value, str):
        return StaticTarget(address=_host_port(value))
    if not isinstance(value, dict | StaticTarget):
        hint = 'use "host:port" or {address: "host:port", weight: 2}'
        raise ValueError(f"{value!r} is not a target: {hint}")  # noqa: TRY004 - pydantic reports ValueErrors
    return value


TargetItem = Annotated[StaticTarget, BeforeValidator(_static_target, json_schema_input_type=str | StaticTarget)]


class _Target(_Model):
    """Where a route or a BFF call goes: a ``service`` name (the registry) or static ``targets`` (``"host:port"``
    strings, or ``{address: "host:port", weight: 3}`` mappings)."""

    service: str | None = None
    targets: list[TargetItem] | None = None
    balancer: Literal["p2c", "round_robin", "random", "least_outstanding"] = "p2c"

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[StaticTarget] | None) -> list[StaticTarget] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("targets needs at least one host:port")
        seen: set[str] = set()
        for target in value:
            if target.address in seen:
                raise ValueError(f"{target.address!r} is listed twice (give it a weight instead)")
            seen.add(target.address)
        return value


class RouteConfig(_Target):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    path: str | None = None
    exact: str | None = None
    template: str | None = None
    case_insensitive: bool = False
    methods: list[str] | None = None
    hosts: list[str] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    rewrite: str | None = None
    timeout: Duration = 30.0
    retries: int = Field(default=1, ge=0, le=5)
    breaker: BreakerConfig | Literal[False] = Field(default_factory=BreakerConfig)
    max_concurrent: int | None = Field(default=None, ge=1)
    max_body: ByteSize | None = None
    preserve_host: bool = False
    websocket: bool = Field(
        default=False,
        description="forward WebSocket handshakes (GET with Upgrade: websocket); once the upstream answers 101 the "
        "connection carries frames both ways, closed after limits.websocket_idle_timeout with nothing sent",
    )
    plugins: PluginList = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_path_one_target(self) -> RouteConfig:
        paths = [p for p in (self.path, self.exact, self.template) if p is not None]
        if len(paths) != 1:
            raise ValueError("a route needs exactly one of path (a prefix), exact, template")
        if (self.service is None) == (self.targets is None):
            raise ValueError("a route needs exactly one of service (a name in the registry) or targets")
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        upper = [m.upper() for m in value]
        for m in upper:
            if not re.fullmatch(r"[A-Z]+", m):
                raise ValueError(f"{m!r} is not an HTTP method")
        return upper


class BffCall(_Target):
    """One call of an aggregation route: ``path`` may use the route's ``{params}``; ``required`` calls fail the
    whole answer when they fail (whatever ``on_error`` says)."""

    path: str
    method: Literal["GET", "POST"] = "GET"
    required: bool = False
    forward_headers: list[str] = Field(default_factory=lambda: ["authorization", "x-consumer-id", "accept-language"])

    @model_validator(mode="after")
    def _one_target(self) -> BffCall:
        if (self.service is None) == (self.targets is None):
            raise ValueError("a BFF call needs exactly one of service or targets")
        return self


class BffRoute(_Model):
    """An aggregation route: one client call, several upstream calls in parallel, one shaped answer.

    ``shape`` maps output fields to dotted paths into the calls' JSON (``{"status": "order.status"}``); without
    it, the answer is ``{call name: body}``. ``on_error``: ``fail`` (502 when any call fails) or ``degrade``
    (the answer is built from what arrived, with ``"_missing": [names]``). ``handler``: ``module:function``, an
    ``async def f(request, results) -> Reply | dict`` for what config cannot express."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    path: str
    methods: list[str] = Field(default_factory=lambda: ["GET"])
    calls: dict[str, BffCall]
    shape: dict[str, str] | None = None
    on_error: Literal["fail", "degrade"] = "degrade"
    timeout: Duration = 5.0
    handler: str | None = None
    plugins: PluginList = Field(default_factory=list)


class GatewayConfig(_Model):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    admin: AdminConfig | None = None
    registry: str | None = None
    redis: str | None = None
    trusted_proxies: list[str] = Field(default_factory=list)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    plugins: PluginList = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    bff: list[BffRoute] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> GatewayConfig:
        seen: set[str] = set()
        for name in [r.name for r in self.routes] + [b.name for b in self.bff]:
            if name in seen:
                raise ValueError(f"two routes are named {name!r}; names must be unique (metrics and logs use them)")
            seen.add(name)
        return self


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config and where it came from (for messages and for reloads)."""

    config: GatewayConfig
    source: str
    folder: Path
    lines: Mapping[tuple[str | int, ...], int]

    def where(self, loc: tuple[str | int, ...]) -> str:
        return _where(self.source, self.lines, loc)


def parse_config(text: str, source: str = "gateway.yaml", folder: Path | None = None) -> LoadedConfig:
    """Validate a YAML text; :class:`~meshkit.errors.ConfigurationError` lists every problem as
    ``source:line: key: message``."""
    yaml = require("yaml", "gateway")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigurationError(f"{source}{at}: not valid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"{source}:1: the gateway config must be a mapping (listen:, routes:, ...)")
    lines: dict[tuple[str | int, ...], int] = {}
    if node is not None:
        _collect_lines(node, (), lines)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc, source, lines, ()), hint="see docs/gateway.md") from None
    return LoadedConfig(config, source, folder or Path("."), lines)


def load_config(path: str | Path) -> LoadedConfig:
    """Read and validate a gateway YAML file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(
            f"no gateway config at {file}", hint="pass --config PATH (see docs/gateway.md for an example)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the gateway config {file}: {exc}") from None
    return parse_config(text, file.name, file.resolve().parent)


def validate_options(
    loaded: LoadedConfig, loc: tuple[str | int, ...], model: type[BaseModel], options: Mapping[str, Any] | None
) -> BaseModel:
    """Validate one plugin's options with its model; errors name the plugin's key and line."""
    try:
        return model.model_validate(dict(options or {}))
    except ValidationError as exc:
        raise ConfigurationError(
            _describe(exc, loaded.source, loaded.lines, loc), hint="see the plugin's options in docs/gateway.md"
        ) from None


def _describe(
    exc: ValidationError, source: str, lines: Mapping[tuple[str | int, ...], int], prefix: tuple[str | int, ...]
) -> str:
    problems = []
    for error in exc.errors():
        loc = prefix + tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        loc = tuple(p for p in loc if p not in ("literal[False]", "BreakerConfig"))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{_where(source, lines, loc)}: {_dotted(loc) or '(top level)'}: {message}")
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in {source}:\n  " + "\n  ".join(problems)


def _where(source: str, lines: Mapping[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> str:
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return f"{source}:{line}"
    return source


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _collect_lines(node: Any, loc: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    kind = type(node).__name__
    if kind == "MappingNode":
        for key, value in node.value:
            here = (*loc, key.value)
            lines[here] = key.start_mark.line + 1
            _collect_lines(value, here, lines)
    elif kind == "SequenceNode":
        for index, item in enumerate(node.value):
            _collect_lines(item, (*loc, index), lines)


def iter_plugins(items: list[dict[str, dict[str, Any] | None]]) -> Iterator[tuple[int, str, dict[str, Any] | None]]:
    """``(index, name, options)`` of a plugin list whose items are one-key mappings."""
    for index, item in enumerate(items):
        if len(item) != 1:
            names = ", ".join(item) or "nothing"
            raise ValueError(f"item {index} must name one plugin (``- name: {{options}}``), not {names}")
        ((name, options),) = item.items()
        yield index, name, options


def json_schema(plugin_options: Mapping[str, type[BaseModel]]) -> str:
    """The JSON Schema of the gateway config, with each built-in plugin's options."""
    schema = GatewayConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    variants = []
    for name, model in sorted(plugin_options.items()):
        sub = model.model_json_schema()
        for key, value in sub.pop("$defs", {}).items():
            defs.setdefault(key, value)
        defs[f"plugin_{name}"] = sub
        variants.append(
            {
                "type": "object",
                "properties": {name: {"$ref": f"#/$defs/plugin_{name}"}},
                "required": [name],
                "additionalProperties": False,
            }
        )
    plugin_item = {"anyOf": [*variants, {"type": "object", "description": "module:Class of a custom plugin"}]}

    def patch(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "plugins" and isinstance(value, dict) and value.get("type") == "array":
                    value["items"] = plugin_item
                else:
                    patch(value)
        elif isinstance(node, list):
            for item in node:
                patch(item)

    patch(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "meshkit gateway configuration"
    return json.dumps(schema, indent=2, sort_keys=True)
