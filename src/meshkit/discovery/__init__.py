"""Service discovery: a registry of service instances held by TTL leases, with health checks.

::

    async with meshkit.discovery.connect("sqlite:///registry.db") as registry:
        async with await registry.register(Instance("orders", "orders-1", "127.0.0.1", 8001), ttl=10):
            healthy = await registry.list("orders")

Backends by URL: ``memory://`` (in-process), ``sqlite:///path`` (the embedded default: several processes on one
host share the file), ``redis://`` and ``etcd://`` (several hosts). docs/discovery.md has the details.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from meshkit.discovery.base import Capabilities, Change, ChangeKind, HealthStatus, Instance, Lease, Registry, Watch
from meshkit.errors import ConfigurationError

__all__ = [
    "Capabilities",
    "Change",
    "ChangeKind",
    "HealthStatus",
    "Instance",
    "Lease",
    "Registry",
    "Watch",
    "connect",
]

#: URL scheme -> the backend module that opens it (``from_url(url, **options) -> Registry``), loaded on demand so a
#: missing optional driver only matters to the URL that needs it.
_BACKENDS = {
    "memory": "memory",
    "sqlite": "sqlite",
    "redis": "redis",
    "rediss": "redis",
    "etcd": "etcd",
}


def connect(url: str, **options: Any) -> Registry:
    """A registry for ``url``. Use it as ``async with connect(url) as registry:``.

    ``memory://`` is in-process. ``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` is the embedded
    default shared by the processes of one host. ``redis://host:port/db`` reaches a Redis server (``pip install
    'meshkit[redis]'``); ``etcd://host:port`` reaches an etcd v3 server (``pip install 'meshkit[etcd]'``).
    ``options`` go to the backend (docs/discovery.md lists each backend's); every backend takes ``clock``.
    """
    scheme = urlsplit(url).scheme
    name = _BACKENDS.get(scheme)
    if name is None:
        raise ConfigurationError(
            f"unknown registry URL scheme {scheme!r} in {url!r}",
            hint="use one of memory://, sqlite:///path, redis://, etcd://",
        )
    module = importlib.import_module(f"meshkit.discovery.{name}")
    registry: Registry = module.from_url(url, **options)
    return registry
