"""Settings: defaults < ``meshkit.toml`` < environment ``MESHKIT_*`` < explicit arguments.

::

    # meshkit.toml
    [broker]
    url = "redis://localhost:6379/0"

    MESHKIT_BROKER__URL=nats://localhost:4222      # env: prefix MESHKIT_, nesting with __
    load_settings(overrides={"broker.url": "memory://"})   # arguments win (also broker__url, {"broker": {...}})

Every mistake is a :class:`~meshkit.errors.SettingsError` naming the key, where its value came from
(``meshkit.toml:3``, ``env MESHKIT_BROKR__URL``, ``argument``) and, for an unknown key, the nearest known one.
pydantic validates (every section forbids unknown keys); pydantic-settings' ``EnvSettingsSource`` parses the
environment; the layering, the positions and the wording of errors are meshkit's, so a mistake never surfaces as a
raw pydantic traceback.

Adding a section: write a :class:`Section` subclass here and add a field for it to :class:`Settings`. Nothing else
changes: unknown keys, line numbers, environment variables and ``meshkit config`` follow the models. Sections are
plain models, so lists of models (``[[services]]``) and dicts of models work too.
"""

from __future__ import annotations

import collections.abc
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import EnvSettingsSource
from pydantic_settings import SettingsError as PydanticSettingsError
from typing_extensions import TypeIs

from meshkit.errors import SettingsError

__all__ = [
    "DEFAULT_FILE",
    "ENV_PREFIX",
    "SWITCHES",
    "BrokerSettings",
    "DatabaseSettings",
    "GatewayEntry",
    "LogSettings",
    "RegistrySettings",
    "Section",
    "ServiceEntry",
    "Settings",
    "TracingSettings",
    "load_settings",
    "settings_file",
]

ENV_PREFIX = "MESHKIT_"
#: ``MESHKIT_*`` variables that are process switches, not settings (never reported as unknown).
SWITCHES = frozenset({"MESHKIT_DEBUG", "MESHKIT_SOAK", "MESHKIT_CONFIG"})
DEFAULT_FILE = "meshkit.toml"

Loc = tuple[str | int, ...]


# -- the models ---------------------------------------------------------------------------------------------------


def _url_with_scheme(value: str, schemes: tuple[str, ...]) -> str:
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme not in schemes:
        shown = f"unknown scheme {scheme!r}" if scheme else "no scheme"
        raise ValueError(f"{shown} in {value!r}; use one of: {', '.join(s + '://' for s in schemes)}")
    return value


class Section(BaseModel):
    """A table of ``meshkit.toml``: frozen, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class BrokerSettings(Section):
    """Where messages go (see docs/messaging.md)."""

    url: str = "sqlite:///.meshkit/broker.db"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        return _url_with_scheme(v, ("memory", "sqlite", "redis", "rediss", "nats", "amqp", "amqps", "kafka"))


class RegistrySettings(Section):
    """Where services register (service discovery)."""

    url: str = "sqlite:///.meshkit/registry.db"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        return _url_with_scheme(v, ("memory", "sqlite", "redis", "rediss", "etcd"))


class DatabaseSettings(Section):
    """Where the outbox, sagas, event store and read models live."""

    url: str = "sqlite:///.meshkit/data.db"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        return _url_with_scheme(v, ("sqlite", "postgresql", "postgres"))


class LogSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("format", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v


class TracingSettings(Section):
    """Where spans go (see docs/tracing.md): the built-in collector, or any OTLP endpoint (Jaeger, Tempo, ...)."""

    enabled: bool = True
    # how spans reach `endpoint`: OTLP/HTTP (port 4318) or OTLP/gRPC (port 4317); the built-in collector speaks
    # OTLP/HTTP whatever this says. Declared before `endpoint`, whose check depends on it.
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    # None: the built-in collector. http/protobuf: http(s)://host:4318/v1/traces; grpc: http://host:4317
    # (plaintext), https://host:4317 or host:4317 (TLS)
    endpoint: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)  # sent with every export, e.g. a hosted backend's API key
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("endpoint", mode="before")
    @classmethod
    def _endpoint(cls, v: object, info: ValidationInfo) -> object:
        if v == "":  # MESHKIT_TRACING__ENDPOINT= means "no endpoint", as unset
            return None
        if not isinstance(v, str):
            return v
        if info.data.get("protocol") != "grpc":
            return _url_with_scheme(v, ("http", "https"))
        # meshkit.tracing.export checks the rest when the exporter is made; the likely slip is caught here
        if "://" in v:
            _url_with_scheme(v, ("http", "https"))
        if urlsplit(v if "://" in v else f"//{v}").path not in ("", "/"):
            raise ValueError(
                "an OTLP/gRPC endpoint has no path: write host:port, http://host:port or https://host:port "
                '(/v1/traces belongs to protocol = "http/protobuf")'
            )
        return v


_APP_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ServiceEntry(Section):
    """One service of a system run by ``meshkit run``: ``[services.<name>]`` in ``meshkit.toml``."""

    app: str  # "module:attribute" of the meshkit.Service, the module found in the folder of meshkit.toml
    replicas: int = Field(default=1, ge=1, le=64)  # processes mode: how many instances
    port: int | None = Field(default=None, ge=1, le=65535)  # the first instance's port (default: a free one)

    @field_validator("app")
    @classmethod
    def _reference(cls, v: str) -> str:
        if not _APP_REF.match(v):
            raise ValueError(f"{v!r} is not 'module:attribute' (e.g. 'orders:service' or 'shop.orders:service')")
        return v


class GatewayEntry(Section):
    """The gateway ``meshkit run`` puts in front of a system's services: ``[gateway]`` in ``meshkit.toml``."""

    config: str = "gateway.yaml"  # the gateway's YAML, relative to the folder of meshkit.toml
    port: int | None = Field(default=None, ge=0, le=65535)  # overrides the YAML's listen.port (0: a free port)


class Settings(Section):
    """The effective settings. Read a value with attributes (``settings.broker.url``), every value by dotted key
    with :meth:`flat`, and where one came from with :meth:`source_of`."""

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    services: dict[str, ServiceEntry] = Field(default_factory=dict)
    gateway: GatewayEntry | None = None

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """Every setting by dotted key, as JSON-ready values: ``{"broker.url": "...", ...}``."""
        return dict(_flat(self, self.model_dump(mode="json")))

    def source_of(self, key: str) -> str:
        """Where ``key``'s value came from.

        ``"default"``, ``"meshkit.toml:3"``, ``"environment variable MESHKIT_LOG__LEVEL"`` or ``"argument"``.
        An unknown key raises ``KeyError``.
        """
        if key not in self._sources and key not in self.flat():
            raise KeyError(key)
        return self._sources.get(key, "default")


def _flat(model: BaseModel, dumped: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _flat(value, dumped[name], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", dumped[name]


# -- walking the models by key ------------------------------------------------------------------------------------


def _is_model(tp: object) -> TypeIs[type[BaseModel]]:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _without_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def _type_at(loc: Loc) -> Any | None:
    """The annotation of the value at ``loc`` under :class:`Settings`, or None if no such key exists."""
    tp: Any = Settings
    for part in loc:
        tp = _without_none(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if _is_model(tp) and isinstance(part, str):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        elif origin in _SEQUENCES and isinstance(part, int):
            tp = args[0] if args else Any
        elif origin in _MAPPINGS and isinstance(part, str):
            tp = args[1] if len(args) == 2 else Any
        else:
            return None
    return _without_none(tp)


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _section_paths(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key a plain environment variable can set (sections are walked into; lists and dicts are values)."""
    for name, field in model.model_fields.items():
        tp = _without_none(field.annotation)
        if _is_model(tp):
            yield from _section_paths(tp, (*prefix, name))
        else:
            yield (*prefix, name)


def _suggest(loc: Loc) -> str | None:
    """A did-you-mean for the unknown key at ``loc`` (its parent is known)."""
    parent, name = loc[:-1], loc[-1]
    model = _type_at(parent)
    if not _is_model(model) or not isinstance(name, str):
        return None
    candidates = list(model.model_fields)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"did you mean {_dotted((*parent, close[0]))!r}?"
    if parent == ():  # a key of a section written at the top: `url = ...` without `[broker]`
        homes = [".".join(p) for p in _section_paths() if p[-1] == name]
        if homes:
            return f"did you mean {' or '.join(repr(h) for h in homes)}? (a key of a section goes under its table)"
    return f"known keys here: {', '.join(candidates)}" if candidates else None


# -- where a value came from ---------------------------------------------------------------------------------------


_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r"\"(?:[^\"\\]|\\.)*\"|'[^']*'"
_DOTTED = rf"\s*(?:{_BARE}|{_QUOTED})\s*(?:\.\s*(?:{_BARE}|{_QUOTED})\s*)*"
_ARRAY_HEADER = re.compile(rf"\s*\[\[({_DOTTED})\]\]")
_HEADER = re.compile(rf"\s*\[({_DOTTED})\]")
_ASSIGN = re.compile(rf"({_DOTTED})=")
_PART = re.compile(rf"{_BARE}|{_QUOTED}")


def _parts(raw: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _PART.findall(raw))


def _skip_value(text: str, string: str | None, depth: int) -> tuple[str | None, int]:
    """Lex the rest of a line of a value: (the still-open multi-line string delimiter, the open bracket depth)."""
    i = 0
    while i < len(text):
        if string is not None:
            end = text.find(string, i)
            if end < 0:
                return string, depth
            i, string = end + 3, None
            continue
        if text.startswith(('"""', "'''"), i):
            string, i = text[i : i + 3], i + 3
            continue
        char = text[i]
        if char == "#":
            break
        if char in "\"'":
            i += 1
            while i < len(text) and text[i] != char:
                i += 2 if char == '"' and text[i] == "\\" else 1
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        i += 1
    return string, max(depth, 0)


class _TomlLines:
    """The line where each key of a TOML text is set. tomllib keeps no positions, so this scans the text: table and
    array-of-table headers, ``key =`` and dotted keys; inside inline tables and arrays the line of the key that opens
    them is the answer."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Loc, int] = {}
        table: Loc = ()
        arrays: dict[Loc, int] = {}  # [[x]] path -> index of its latest element
        string: str | None = None
        depth = 0
        for number, line in enumerate(text.splitlines(), start=1):
            if string is not None or depth:
                string, depth = _skip_value(line, string, depth)
            elif match := _ARRAY_HEADER.match(line):
                parent = self._resolve(_parts(match[1]), arrays)
                arrays[parent] = arrays.get(parent, -1) + 1
                table = (*parent, arrays[parent])
                self._mark(table, number)
            elif match := _HEADER.match(line):
                table = self._resolve(_parts(match[1]), arrays)
                self._mark(table, number)
            elif match := _ASSIGN.match(line):
                self._mark((*table, *_parts(match[1])), number)
                string, depth = _skip_value(line[match.end() :], None, 0)

    @staticmethod
    def _resolve(parts: tuple[str, ...], arrays: Mapping[Loc, int]) -> Loc:
        """``[a.b]`` after ``[[a]]`` means the ``b`` of a's latest element."""
        loc: Loc = ()
        for i, part in enumerate(parts):
            loc = (*loc, part)
            if i < len(parts) - 1 and loc in arrays:
                loc = (*loc, arrays[loc])
        return loc

    def _mark(self, loc: Loc, number: int) -> None:
        for end in range(1, len(loc) + 1):
            self._lines.setdefault(loc[:end], number)

    def line_of(self, loc: Loc) -> int | None:
        for end in range(len(loc), 0, -1):
            if (line := self._lines.get(loc[:end])) is not None:
                return line
        return None


@dataclass(frozen=True)
class _Origin:
    kind: Literal["file", "env", "argument"]
    name: str = ""  # the file as given, or the variable
    lines: _TomlLines | None = None

    def describe(self, loc: Loc) -> str:
        if self.kind == "env":
            return f"environment variable {self.name}"
        if self.kind == "argument":
            return "argument"
        # the file's name, not its folder: short enough to read in an error line (the folder is the one in use)
        name = Path(self.name).name
        line = self.lines.line_of(loc) if self.lines is not None else None
        return f"{name}:{line}" if line else name


class _Layers:
    """The merged layers and, for every key set, the layer that set it."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origins: dict[Loc, _Origin] = {}

    def add(self, data: Mapping[str, Any], origin: _Origin | Mapping[Loc, _Origin]) -> None:
        self._merge(self.data, data, (), origin)

    def _merge(self, into: dict[str, Any], data: Mapping[str, Any], prefix: Loc, origin: Any) -> None:
        for key, value in data.items():
            loc = (*prefix, key)
            if isinstance(value, Mapping):
                if not isinstance(into.get(key), dict):
                    self._forget(loc)
                    into[key] = {}
                if not value:  # an empty table: placed, so that an unknown one is still reported
                    self.origins[loc] = self._origin(origin, loc)
                self._merge(into[key], value, loc, origin)
            else:
                self._forget(loc)
                into[key] = value
                self.origins[loc] = self._origin(origin, loc)

    @staticmethod
    def _origin(origin: _Origin | Mapping[Loc, _Origin], loc: Loc) -> _Origin:
        if isinstance(origin, _Origin):
            return origin
        for end in range(len(loc), 0, -1):
            if (found := origin.get(loc[:end])) is not None:
                return found
        raise AssertionError(f"no origin for {loc}")  # pragma: no cover - every env key is named by a variable

    def _forget(self, loc: Loc) -> None:
        for stale in [known for known in self.origins if known[: len(loc)] == loc]:
            del self.origins[stale]

    def source_of(self, loc: Loc) -> str:
        for end in range(len(loc), 0, -1):
            if (origin := self.origins.get(loc[:end])) is not None:
                return origin.describe(loc)
        below = [origin for known, origin in self.origins.items() if known[: len(loc)] == loc]
        return below[0].describe(loc) if below else "default"


# -- the layers ----------------------------------------------------------------------------------------------------


def _read_file(path: Path, shown: str) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SettingsError(
            f"settings file {shown} does not exist",
            key="",
            source=shown,
            hint="create it, or leave it out to use the defaults",
        ) from exc
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {shown}: {exc.strerror or exc}", key="", source=shown) from exc
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SettingsError(
            f"{shown} is not UTF-8 text (line {line}, byte {exc.start})",
            key="",
            source=f"{path.name}:{line}",
            hint="save it as UTF-8",
        ) from exc
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        reason = str(exc)[: where.start()].strip() if where else str(exc)
        source = f"{path.name}:{where[1]}" if where else path.name
        at = f" at line {where[1]}, column {where[2]}" if where else ""
        raise SettingsError(f"{shown} is not valid TOML{at}: {reason}", key="", source=source) from exc


class _Env(EnvSettingsSource):
    """pydantic-settings' parsing of ``MESHKIT_*`` (``__`` nesting, JSON for lists and dicts) over a mapping we
    choose instead of ``os.environ`` itself, so tests and callers can pass their own."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._mapping = env
        super().__init__(
            Settings,  # type: ignore[arg-type]  # a BaseModel works: the source only reads its fields
            case_sensitive=False,
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
        )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {key.lower(): value for key, value in self._mapping.items()}


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[Loc, _Origin]]:
    known = {path: ENV_PREFIX + "__".join(p.upper() for p in path) for path in _section_paths()}
    origins: dict[Loc, _Origin] = {}
    for var in sorted(environ):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in SWITCHES:
            continue
        path = tuple(upper[len(ENV_PREFIX) :].lower().split("__"))
        source = f"environment variable {var}"
        if path in known:
            origins[path] = _Origin("env", var)
            continue
        if _is_model(_type_at(path)):
            keys = ", ".join(v for p, v in known.items() if p[: len(path)] == path)
            raise SettingsError(
                f"{var} names a section, not a setting", key=".".join(path), source=source,
                hint=f"set one of its keys: {keys}",
            )  # fmt: skip
        close = difflib.get_close_matches(upper, known.values(), n=1, cutoff=0.6)
        raise SettingsError(
            f"unknown environment variable {var}",
            key=".".join(path),
            source=source,
            hint=f"did you mean {close[0]}?" if close else f"known variables: {', '.join(known.values())}",
        )
    if not origins:
        return {}, origins
    try:
        return dict(_Env(environ)()), origins
    except PydanticSettingsError as exc:  # a list or dict value that is not JSON
        field = re.search(r'field "([^"]+)"', str(exc))
        var = next((o.name for p, o in origins.items() if field and p[-1] == field[1]), "MESHKIT_*")
        raise SettingsError(
            f"invalid value for {field[1] if field else 'a setting'} (environment variable {var}): not valid JSON",
            key=field[1] if field else "",
            source=f"environment variable {var}",
            hint="lists and tables are written as JSON in environment variables",
        ) from exc


def _argument_layer(overrides: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = [p for p in re.split(r"\.|__", key) if p]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value.model_dump() if isinstance(value, BaseModel) else value
    return tree


def _problem(error: Any, layers: _Layers) -> tuple[Loc, str, str, str | None]:
    """One pydantic error as (its key, where it came from, the message, a hint)."""
    raw: Loc = tuple(error["loc"])
    loc = raw
    while loc and _type_at(loc) is None and error["type"] != "extra_forbidden":
        loc = loc[:-1]  # drop union member names that pydantic adds to the location
    key, source = _dotted(loc), layers.source_of(loc)
    if error["type"] == "extra_forbidden":
        return loc, source, f"unknown setting {key!r} ({source})", _suggest(loc)
    if error["type"] == "missing":
        return loc, source, f"missing setting {key} ({source})", None
    reason = str(error["msg"]).removeprefix("Value error, ")
    hint = None
    if _is_model(section := _type_at(loc)):
        hint = f"{key} is a table: set its keys ({', '.join(section.model_fields)})"
    return loc, source, f"invalid value for {key} ({source}): {reason}; got {error.get('input')!r}", hint


def settings_file(env: Mapping[str, str] | None = None) -> str | None:
    """The settings file :func:`load_settings` reads when it is named none: ``$MESHKIT_CONFIG`` if set, else
    ``./meshkit.toml`` if it exists, else None (``env`` defaults to ``os.environ``)."""
    environ = os.environ if env is None else env
    if environ.get("MESHKIT_CONFIG"):
        return environ["MESHKIT_CONFIG"]
    return DEFAULT_FILE if Path(DEFAULT_FILE).is_file() else None


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load the effective settings: defaults < ``meshkit.toml`` < ``MESHKIT_*`` < ``overrides``.

    - ``path``: a ``meshkit.toml``. ``None`` means ``$MESHKIT_CONFIG`` if set, else ``./meshkit.toml`` if it exists.
      A file named explicitly (either way) must exist.
    - ``env``: where to read ``MESHKIT_*`` from (default ``os.environ``).
    - ``overrides``: explicit values; they win. Keys are dotted (``{"broker.url": "memory://"}``) or nested with
      ``__`` (``{"broker__url": ...}``); a value may be a whole section (``{"broker": {"url": ...}}`` or a model).

    Raises :class:`~meshkit.errors.SettingsError` naming the key, its source and what is wrong.
    """
    environ = os.environ if env is None else env
    layers = _Layers()

    shown = str(path) if path is not None else settings_file(environ)
    if shown is not None:
        data, text = _read_file(Path(shown), shown)
        layers.add(data, _Origin("file", shown, _TomlLines(text)))

    env_data, env_origins = _env_layer(environ)
    layers.add(env_data, env_origins)
    layers.add(_argument_layer(overrides or {}), _Origin("argument"))

    try:
        settings = Settings.model_validate(layers.data)
    except ValidationError as exc:
        problems = [_problem(error, layers) for error in exc.errors()]
        # unknown keys first (a typo explains the rest), then in the order of the file
        problems.sort(key=lambda p: ("unknown setting" not in p[2], _line_number(p[1])))
        loc, source, message, hint = problems[0]
        more = len(problems) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        # from None: the message says all pydantic said; a chained ValidationError would only repeat it, raw
        raise SettingsError(message, key=_dotted(loc), source=source, hint=hint) from None
    settings._sources.update({key: layers.source_of(tuple(key.split("."))) for key in settings.flat()})
    return settings


def _line_number(source: str) -> int:
    number = source.rpartition(":")[2]
    return int(number) if number.isdigit() else 0
