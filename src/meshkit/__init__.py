"""meshkit: the microservice patterns, for real, in one package.

The public surface is re-exported here and in the public subpackages (``meshkit.resilience``, ``meshkit.testing``,
...); modules whose name starts with ``_`` are private. Importing meshkit does no work: no threads, no sockets, no
logging configuration.
"""

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

__all__ = [
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpen",
    "Clock",
    "ConfigurationError",
    "Constant",
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
    "SettingsError",
    "ThreadPoolBulkhead",
    "Timeout",
    "TimeoutExceeded",
    "Unavailable",
    "__version__",
]
