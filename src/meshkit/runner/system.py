"""A system: the folder ``meshkit run`` is pointed at, its ``meshkit.toml``, and the services it lists.

::

    # examples/shop/meshkit.toml
    [services.orders]
    app = "orders:service"        # module:attribute, the module found in this folder
    replicas = 2                  # processes mode

    [broker]
    url = "sqlite:///.meshkit/broker.db"   # relative SQLite paths are relative to this folder

Defaults: processes mode uses the settings' broker and registry (SQLite files under ``.meshkit/`` of the folder,
shared by the processes); monolith mode uses ``memory://`` for both unless ``meshkit.toml`` or ``MESHKIT_*``
sets them. Each service keeps its files in ``.meshkit/data/<service>/``; the data patterns (outbox, sagas, event store,
read models) of every service share ``[database] url``, by default ``sqlite:///.meshkit/data.db`` in both modes.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from meshkit._core.settings import DEFAULT_FILE, ServiceEntry, Settings, load_settings
from meshkit.dashboard.audit import STATE_DIR, audit_file
from meshkit.errors import ConfigurationError
from meshkit.runtime import Service

__all__ = ["Mode", "System", "load_system"]

Mode = Literal["monolith", "processes"]


@dataclass(frozen=True)
class System:
    folder: Path
    settings: Settings

    @property
    def services(self) -> dict[str, ServiceEntry]:
        return self.settings.services

    @property
    def state_dir(self) -> Path:
        return self.folder / STATE_DIR

    @property
    def audit_file(self) -> Path:
        return audit_file(self.folder)

    def data_dir(self, service: str) -> Path:
        return self.state_dir / "data" / service

    def _url(self, key: str, url: str, mode: Mode) -> str:
        if mode == "monolith" and self.settings.source_of(key) == "default":
            return "memory://"
        if mode == "processes" and url.startswith("memory:"):
            raise ConfigurationError(
                f"{key} = {url!r} lives inside one process, and processes mode runs one process per service",
                hint="use a shared one (the default sqlite:///.meshkit/...), or run with --mode monolith",
            )
        return anchored(url, self.folder)

    def broker_url(self, mode: Mode) -> str:
        return self._url("broker.url", self.settings.broker.url, mode)

    def registry_url(self, mode: Mode) -> str:
        return self._url("registry.url", self.settings.registry.url, mode)

    def database_url(self) -> str:
        """The database of the services' outbox, sagas, event store and read models (``[database] url``): the
        embedded SQLite file under ``.meshkit/`` by default, in either mode (several processes share it)."""
        return anchored(self.settings.database.url, self.folder)

    def load(self, name: str) -> Service:
        """Import the service ``name`` (``module:attribute`` from its entry), with the folder importable."""
        entry = self.services.get(name)
        if entry is None:
            raise ConfigurationError(
                f"{self.folder / DEFAULT_FILE} lists no service {name!r}",
                hint=f"it lists: {', '.join(self.services) or 'none'}",
            )
        module_name, _, attribute = entry.app.partition(":")
        folder = str(self.folder)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigurationError(
                f"cannot import {module_name!r} for service {name!r}: {exc}",
                hint=f"services.{name}.app names a module in {self.folder} (or an installed one)",
            ) from exc
        service = getattr(module, attribute, None)
        if not isinstance(service, Service):
            raise ConfigurationError(
                f"{entry.app} is {type(service).__name__ if service is not None else 'missing'}, not a meshkit.Service",
                hint=f"define {attribute} = Service({name!r}) in {module_name}",
            )
        if service.name != name:
            raise ConfigurationError(
                f"services.{name}.app = {entry.app!r} is the service {service.name!r}",
                hint=f"name the table [services.{service.name}] or the Service {name!r}",
            )
        return service


def anchored(url: str, folder: Path) -> str:
    """``url`` with a relative SQLite path made absolute against ``folder`` (other URLs as they are)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith("/"):
        return prefix + str((folder / url[len(prefix) :]).resolve())
    return url


def load_system(path: str | Path) -> System:
    """The system in ``path`` (a folder holding ``meshkit.toml``, or the file itself)."""
    where = Path(path)
    if where.is_dir():
        where = where / DEFAULT_FILE
    if not where.is_file():
        raise ConfigurationError(
            f"no {DEFAULT_FILE} at {where}",
            hint="point meshkit run at a folder with a meshkit.toml that lists [services.<name>] app = 'module:attr'",
        )
    settings = load_settings(where)
    if not settings.services:
        raise ConfigurationError(
            f"{where} lists no services",
            hint='add a table per service, e.g. [services.orders] with app = "orders:service"',
        )
    return System(where.parent.resolve(), settings)
