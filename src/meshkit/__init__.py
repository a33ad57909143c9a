"""meshkit: the microservice patterns, for real, in one package.

The public surface is re-exported here and in the public subpackages (``meshkit.resilience``, ``meshkit.testing``,
...); modules whose name starts with ``_`` are private. Importing meshkit does no work: no threads, no sockets, no
logging configuration.
"""

from typing import TYPE_CHECKING, Any

from meshkit._core.clock import Clock, MonotonicClock
from meshkit._version import __version__
from meshkit.errors import (
    BulkheadFull,
    CircuitOpen,
    ConfigurationError,
    MeshkitError,
    MissingDependency,
    RateLimited,
    Rejected,
    SettingsError,
    TimeoutExceeded,
    Unavailable,
)
from meshkit.resilience import (
    Bulkhead,
    CircuitBreaker,
    Constant,
    Exponential,
    Fallback,
    Linear,
    RateLimiter,
    Retry,
    ThreadPoolBulkhead,
    Timeout,
)

if TYPE_CHECKING:
    from meshkit._core.database import Database, Transaction, connect_database
    from meshkit.runtime import Service

__all__ = [
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpen",
    "Clock",
    "ConfigurationError",
    "Constant",
    "Database",
    "Exponential",
    "Fallback",
    "Linear",
    "MeshkitError",
    "MissingDependency",
    "MonotonicClock",
    "RateLimited",
    "RateLimiter",
    "Rejected",
    "Retry",
    "Service",
    "SettingsError",
    "ThreadPoolBulkhead",
    "Timeout",
    "TimeoutExceeded",
    "Transaction",
    "Unavailable",
    "__version__",
    "connect_database",
]


def __getattr__(name: str) -> Any:
    # Service loads the runtime (and with it the messaging, discovery and client packages) on first use, so that
    # ``import meshkit`` stays cheap and works without the optional drivers the runtime needs.
    if name == "Service":
        from meshkit.runtime import Service  # noqa: PLC0415 - on first use, see above

        return Service
    if name in ("Database", "Transaction", "connect_database"):  # the data patterns' database, on first use too
        from meshkit._core import database  # noqa: PLC0415 - on first use, see above

        return getattr(database, name)
    raise AttributeError(f"module 'meshkit' has no attribute {name!r}")
