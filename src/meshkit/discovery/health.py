"""Health: active checks that mark instances in the registry, and passive outlier detection for clients.

Active checks (:class:`HealthChecker`) probe every instance of a service every ``interval`` seconds, with
``HttpProbe`` (``GET /healthz``, any 2xx passes) or ``TcpProbe`` (a TCP connect), each bounded by ``timeout``. An
instance goes ``critical`` after ``unhealthy_threshold`` failures in a row and back to ``passing`` after
``healthy_threshold`` successes in a row; the checker writes those transitions to the registry, and
``registry.list(name)`` (``healthy_only=True``) leaves critical instances out of rotation.

Passive outlier detection (:class:`OutlierDetector`) is sans-I/O: the service client records the outcome of every
call it makes; ``consecutive_errors`` 5xx answers or connect errors in a row eject the instance for
``base_ejection * n`` seconds (``n``: how many times it was ejected, capped by ``max_ejection``), after which it is
back in rotation. ``n`` decays by one for each ``base_ejection`` period the instance then spends in rotation.
At most ``max_ejected_fraction`` of the instances a client knows are ejected at once (but always at least one), so a
bad deploy that fails everything does not leave a client with nothing to call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from meshkit._core.clock import Clock, MonotonicClock
from meshkit._core.optional import require
from meshkit.discovery.base import HealthStatus, Instance, Registry
from meshkit.errors import ConfigurationError, MeshkitError

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "CheckPolicy",
    "HealthChecker",
    "HttpProbe",
    "OutlierDetector",
    "OutlierPolicy",
    "Probe",
    "ProbeFailed",
    "TcpProbe",
]

log = logging.getLogger("meshkit.discovery.health")


class ProbeFailed(Exception):
    """A probe's verdict: the instance is not healthy (the message says why). Internal to health checking."""


class Probe(Protocol):
    """Checks one instance: returns if it is healthy, raises :class:`ProbeFailed` (or ``OSError``) if not."""

    async def __call__(self, instance: Instance) -> None: ...

    async def aclose(self) -> None: ...


class HttpProbe:
    """``GET http://<host>:<port><path>``: healthy on any 2xx. Owns one aiohttp session (closed by :meth:`aclose`)."""

    def __init__(self, path: str = "/healthz", *, scheme: str = "http") -> None:
        self.path = path if path.startswith("/") else f"/{path}"
        self.scheme = scheme
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, instance: Instance) -> None:
        aiohttp = require("aiohttp", "http")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"{self.scheme}://{instance.address}{self.path}"
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                await response.read()
                if not 200 <= response.status < 300:
                    raise ProbeFailed(f"GET {url} answered {response.status}")
        except aiohttp.ClientError as exc:
            raise ProbeFailed(f"GET {url} failed: {exc}") from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class TcpProbe:
    """Healthy if a TCP connection to ``host:port`` opens."""

    async def __call__(self, instance: Instance) -> None:
        _, writer = await asyncio.open_connection(instance.host, instance.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class CheckPolicy:
    """When active checks run and how many results in a row change an instance's status."""

    interval: float = 10.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ConfigurationError("interval and timeout must be positive")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ConfigurationError("thresholds must be at least 1")


@dataclass
class _Streak:
    status: HealthStatus
    successes: int = 0
    failures: int = 0

    def record(self, ok: bool, policy: CheckPolicy) -> HealthStatus | None:
        """Count one result; the new status if it changes."""
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.status is not HealthStatus.PASSING and self.successes >= policy.healthy_threshold:
                self.status = HealthStatus.PASSING
                return self.status
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.status is not HealthStatus.CRITICAL and self.failures >= policy.unhealthy_threshold:
                self.status = HealthStatus.CRITICAL
                return self.status
        return None


class HealthChecker:
    """Active checks of every instance of ``services`` in ``registry``. ``async with`` it (or :meth:`start` and
    :meth:`aclose`) to run checks every ``policy.interval``; :meth:`check_once` runs one round now."""

    def __init__(
        self,
        registry: Registry,
        services: str | Sequence[str],
        probe: Probe | None = None,
        policy: CheckPolicy | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.registry = registry
        self.services = (services,) if isinstance(services, str) else tuple(services)
        self.probe: Probe = probe or HttpProbe()
        self.policy = policy or CheckPolicy()
        self.clock = clock or registry.clock
        self._streaks: dict[tuple[str, str], _Streak] = {}
        self._task: asyncio.Task[None] | None = None

    async def check_once(self) -> dict[tuple[str, str], HealthStatus]:
        """Probe every instance once, concurrently; write status changes to the registry. Returns the transitions."""
        instances = [i for service in self.services for i in await self.registry.list(service, healthy_only=False)]
        live = {(i.service, i.id) for i in instances}
        for gone in self._streaks.keys() - live:
            del self._streaks[gone]
        results = await asyncio.gather(*(self._probe(i) for i in instances))
        transitions: dict[tuple[str, str], HealthStatus] = {}
        for instance, ok in zip(instances, results, strict=True):
            key = (instance.service, instance.id)
            streak = self._streaks.get(key)
            if streak is None:
                streak = self._streaks[key] = _Streak(instance.status)
            streak.status = instance.status  # someone else (another checker) may have changed it
            new = streak.record(ok, self.policy)
            if new is not None:
                transitions[key] = new
                await self.registry.set_status(instance.service, instance.id, new)
                log.info(
                    "%s/%s is now %s",
                    instance.service,
                    instance.id,
                    new,
                    extra={"service": instance.service, "instance": instance.id, "status": str(new)},
                )
        return transitions

    async def _probe(self, instance: Instance) -> bool:
        try:
            async with self.clock.deadline(self.policy.timeout):
                await self.probe(instance)
        except TimeoutError:
            log.debug("check of %s timed out", instance.address, extra={"instance": instance.id})
            return False
        except (ProbeFailed, OSError) as exc:
            log.debug("check of %s failed: %s", instance.address, exc, extra={"instance": instance.id})
            return False
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"meshkit-health-{','.join(self.services)}")

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except MeshkitError as exc:  # the registry is unreachable: try again next round
                log.warning("health check round failed: %s", exc, extra={"services": self.services})
            await self.clock.asleep(self.policy.interval)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.probe.aclose()

    async def __aenter__(self) -> HealthChecker:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """When passive outlier detection ejects an instance, and for how long."""

    consecutive_errors: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejected_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.consecutive_errors < 1 or self.base_ejection <= 0 or self.max_ejection < self.base_ejection:
            raise ConfigurationError("need consecutive_errors >= 1 and 0 < base_ejection <= max_ejection")
        if not 0 <= self.max_ejected_fraction <= 1:
            raise ConfigurationError("max_ejected_fraction is between 0 and 1")


@dataclass
class _Outlier:
    errors: int = 0  # consecutive
    ejections: int = 0  # the multiplier of the next ejection's length
    until: float = -math.inf  # ejected while clock.now() < until
    back_since: float = -math.inf  # when it last came back into rotation


class OutlierDetector:
    """Passive outlier detection, sans-I/O: record call outcomes per instance id, ask who is in rotation."""

    def __init__(self, policy: OutlierPolicy | None = None, *, clock: Clock | None = None) -> None:
        self.policy = policy or OutlierPolicy()
        self.clock = clock or MonotonicClock()
        self._state: dict[str, _Outlier] = {}
        self._known: set[str] = set()

    @staticmethod
    def is_error(status: int | None) -> bool:
        """Whether :meth:`record` counts an outcome as an error: a 5xx, or no answer (``None``)."""
        return status is None or status >= 500

    def record(self, instance_id: str, status: int | None) -> bool:
        """Record one call: an HTTP ``status``, or None for a connect error. True if it ejected the instance."""
        if self.is_error(status):
            return self.record_failure(instance_id)
        self.record_success(instance_id)
        return False

    def record_success(self, instance_id: str) -> None:
        self._known.add(instance_id)
        state = self._state.get(instance_id)
        if state is not None:
            state.errors = 0

    def record_failure(self, instance_id: str) -> bool:
        """Count a 5xx or connect error; True if this one ejected the instance."""
        self._known.add(instance_id)
        state = self._state.setdefault(instance_id, _Outlier())
        now = self.clock.now()
        if state.until > now:
            return False  # already ejected: calls that were in flight do not extend it
        self._come_back(state, now)
        state.errors += 1
        if state.errors < self.policy.consecutive_errors:
            return False
        ejected = self._ejected_count(now)
        if ejected and ejected + 1 > self.policy.max_ejected_fraction * len(self._known):
            log.info("not ejecting %s: too many instances are ejected already", instance_id)
            return False
        state.ejections += 1
        duration = min(self.policy.base_ejection * state.ejections, self.policy.max_ejection)
        state.until = now + duration
        state.errors = 0
        log.warning(
            "ejecting %s for %gs after %d errors in a row",
            instance_id,
            duration,
            self.policy.consecutive_errors,
            extra={"instance": instance_id, "ejection_seconds": duration, "ejections": state.ejections},
        )
        return True

    def _come_back(self, state: _Outlier, now: float) -> None:
        """Account for time in rotation since the last ejection ended: the multiplier decays by one per period."""
        if state.until == -math.inf:
            return
        state.back_since = max(state.back_since, state.until)
        periods = int((now - state.back_since) // self.policy.base_ejection)
        if periods > 0:
            state.ejections = max(0, state.ejections - periods)
            state.back_since += periods * self.policy.base_ejection

    def _ejected_count(self, now: float) -> int:
        return sum(1 for state in self._state.values() if state.until > now)

    def is_ejected(self, instance_id: str) -> bool:
        state = self._state.get(instance_id)
        return state is not None and state.until > self.clock.now()

    def ejected_until(self, instance_id: str) -> float | None:
        """When (``clock.now()`` time) the instance comes back, or None if it is in rotation."""
        state = self._state.get(instance_id)
        return state.until if state is not None and state.until > self.clock.now() else None

    def available(self, instances: Iterable[Instance]) -> list[Instance]:
        """The instances in rotation: those not ejected. Remembers them as known (for ``max_ejected_fraction``)."""
        listed = list(instances)
        self._known.update(i.id for i in listed)
        return [i for i in listed if not self.is_ejected(i.id)]

    def forget(self, instance_id: str) -> None:
        """The instance left the registry: drop what is known about it."""
        self._state.pop(instance_id, None)
        self._known.discard(instance_id)
