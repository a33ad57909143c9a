"""The one exception tree of meshkit.

Every error meshkit raises on purpose is a :class:`MeshkitError`. The tree is grouped by what a caller does
about it, not by which module raised it::

    MeshkitError
    ├── ConfigurationError            fix the code or the config; retrying will not help
    │   ├── SettingsError             a bad key or value in meshkit.toml / MESHKIT_* / arguments
    │   └── MissingDependency         an optional driver is not installed (names the extra to install)
    ├── TimeoutExceeded               the work took longer than allowed (also a builtin TimeoutError)
    ├── Unavailable                   the downstream cannot be used right now; try another or later
    │   └── CircuitOpen               a circuit breaker is open: no call was made
    ├── Rejected                      we shed load on purpose; no call was made
    │   ├── BulkheadFull              too many concurrent calls (and the wait queue is full)
    │   └── RateLimited               the rate budget is spent
    ├── MessagingError                a message cannot be published or handled as it is
    │   ├── MessageTooLarge           over the broker's size limit (nothing was published)
    │   └── MessageDecodeError        not a valid CloudEvent, or its data does not decode (goes to the DLQ)
    ├── DatabaseError                 the database of the outbox, sagas or event store refused a statement
    │   └── ConflictError             another writer got there first (a unique key); reload and try again
    │       └── WrongExpectedVersion  an event stream is not at the version the appender expected
    ├── SagaFailed                    a saga step failed; its compensations ran (see ``status``)
    └── HTTPStatusError               a service answered 4xx/5xx and the caller asked to raise for it

Errors that mean "no call was made" (``CircuitOpen``, ``Rejected``) set ``request_sent = False``: retrying
them is safe even for operations that are not idempotent.

Errors raised by drivers (redis, aiohttp, ...) are mapped at the boundary with ``raise MeshkitError(...) from exc``
so callers never have to import a driver to catch its errors.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BulkheadFull",
    "CircuitOpen",
    "ConfigurationError",
    "ConflictError",
    "DatabaseError",
    "HTTPStatusError",
    "MeshkitError",
    "MessageDecodeError",
    "MessageTooLarge",
    "MessagingError",
    "MissingDependency",
    "RateLimited",
    "Rejected",
    "SagaFailed",
    "SettingsError",
    "TimeoutExceeded",
    "Unavailable",
    "WrongExpectedVersion",
]


class MeshkitError(Exception):
    """Root of every error meshkit raises on purpose.

    ``hint`` is an optional sentence that says how to fix the cause; the CLI prints it as ``hint: ...``.
    ``retry_after`` is an optional number of seconds after which trying again may succeed; the retry policy
    honours it (like an HTTP ``Retry-After`` header).
    """

    #: False when the error proves the operation was never started (safe to retry anything).
    request_sent: bool = True

    def __init__(self, message: str, *, hint: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


class ConfigurationError(MeshkitError):
    """The code or the configuration is wrong; retrying will not help."""


class SettingsError(ConfigurationError):
    """A setting is unknown or invalid.

    ``key`` is the dotted key, ``source`` where it came from (``meshkit.toml:3``, ``env MESHKIT_BROKER__URL``,
    ``argument``).
    """

    def __init__(self, message: str, *, key: str, source: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.key = key
        self.source = source


class MissingDependency(ConfigurationError):
    """An optional driver is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"the optional dependency {module!r} is not installed",
            hint=f"pip install 'meshkit[{extra}]'",
        )
        self.module = module
        self.extra = extra

    def __str__(self) -> str:
        return f"{self.message}; install it with: {self.hint}"


class TimeoutExceeded(MeshkitError, TimeoutError):
    """The work took longer than its time budget. Also a builtin ``TimeoutError``."""

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout


class Unavailable(MeshkitError):
    """The downstream cannot be used right now. Another instance, or a later try, may work."""


class CircuitOpen(Unavailable):
    """A circuit breaker is open (or half-open with no probe slot left): the call was not made."""

    request_sent = False

    def __init__(self, name: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"circuit {name!r} is open: failing fast", retry_after=retry_after)
        self.name = name


class Rejected(MeshkitError):
    """Load was shed on purpose before the work started."""

    request_sent = False


class BulkheadFull(Rejected):
    """The bulkhead's concurrent slots and its wait queue are full."""

    def __init__(self, name: str, *, max_concurrent: int, max_wait: float) -> None:
        super().__init__(f"bulkhead {name!r} is full ({max_concurrent} in flight, waited {max_wait:g}s for a slot)")
        self.name = name
        self.max_concurrent = max_concurrent


class RateLimited(Rejected):
    """The rate budget is spent. ``retry_after`` says when a token will be free."""

    def __init__(self, name: str, *, retry_after: float) -> None:
        super().__init__(f"rate limit {name!r} exceeded", retry_after=retry_after)
        self.name = name


class MessagingError(MeshkitError):
    """A message cannot be published or handled as it is; retrying the same message will not help."""


class MessageTooLarge(MessagingError):
    """The encoded message is over the broker's size limit; nothing was published."""

    request_sent = False

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(
            f"message for {topic!r} is {size} bytes, over the limit of {limit} bytes",
            hint="send a reference (an id or a URL) instead of the payload, or raise max_message_bytes",
        )
        self.size = size
        self.limit = limit


class MessageDecodeError(MessagingError):
    """A received message is not a valid CloudEvent, or its data does not decode."""


class DatabaseError(MeshkitError):
    """The database (SQLite or PostgreSQL) refused a statement of the outbox, a saga or the event store. The
    driver's error is the ``__cause__``; a database that cannot be reached is :class:`Unavailable` instead."""


class ConflictError(DatabaseError):
    """Another writer got there first (a unique key was taken): reload what changed and try again."""


class WrongExpectedVersion(ConflictError):
    """An append to an event stream expected it at ``expected`` events, and it holds ``actual``."""

    def __init__(self, stream: str, *, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream!r} is at version {actual}, not the expected {expected}",
            hint="load the stream again, decide again on its current state, and append with its version",
        )
        self.stream = stream
        self.expected = expected
        self.actual = actual


class SagaFailed(MeshkitError):
    """A saga stopped at a failing step. ``status`` says what its compensations did: ``"compensated"`` (every
    completed step was undone) or ``"failed"`` (a compensation failed too, and the saga needs a person). The
    failing step's error is the ``__cause__``."""

    def __init__(self, saga: str, saga_id: str, *, step: str, status: str, reason: str) -> None:
        super().__init__(f"saga {saga!r} ({saga_id}) failed at step {step!r}: {reason}; {status}")
        self.saga = saga
        self.saga_id = saga_id
        self.step = step
        self.status = status
        self.reason = reason


class HTTPStatusError(MeshkitError):
    """A service answered with an error status (4xx or 5xx); raised by ``Response.raise_for_status()``.

    The service client returns error responses instead of raising, because a 404 or a 409 is often an answer the
    caller handles; ``raise_for_status()`` is how a caller says "for me it is an error". ``status`` is the HTTP
    status and ``response`` the :class:`meshkit.client.Response` (typed loosely here: errors sit below the client
    in the layering and cannot import it).
    """

    def __init__(self, message: str, *, status: int, response: Any) -> None:
        super().__init__(message)
        self.status = status
        self.response = response
