"""The orchestrator: :class:`Sagas` runs sagas step by step, writes down every move, compensates in reverse on a
failure and takes over the sagas a crash left unfinished."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, NoReturn

from meshkit._core.clock import Clock, MonotonicClock
from meshkit._core.database import Database
from meshkit._core.ids import new_id
from meshkit._core.optional import require
from meshkit.errors import ConfigurationError, ConflictError, SagaFailed
from meshkit.resilience.backoff import Backoff, Exponential
from meshkit.saga._definition import Saga, SagaContext, Step
from meshkit.saga._record import SagaRecord, SagaStatus
from meshkit.saga._store import Lost, Store
from meshkit.tracing.propagation import current_headers, extracted
from meshkit.tracing.spans import current_links, span

__all__ = ["Sagas"]

log = logging.getLogger("meshkit.saga")


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _as_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-able: {exc}") from exc


class _StepFailed(Exception):
    """An action failed for the last time (the saga row already says ``compensating``). ``done``: its effect is
    known to have happened (it returned, but its result could not be kept), so its compensation runs too."""

    def __init__(self, error: Exception, *, done: bool = False) -> None:
        super().__init__(_describe(error))
        self.error = error
        self.reason = _describe(error)
        self.done = done


class Sagas:
    """Runs sagas and keeps their state in ``database`` (tables ``meshkit_sagas`` and ``meshkit_saga_steps``).

    - ``owner``: who runs these sagas (usually the service's name). Recovery takes over only this owner's sagas,
      so replicas of one service share an owner, and different services never take each other's sagas.
    - ``tracer``: an OpenTelemetry tracer; None records no spans.
    - ``stale_after``: an unfinished saga not updated for this many seconds is taken for abandoned by a crash and
      recovered. A running saga refreshes its row at each step and every ``stale_after / 3`` seconds while a step
      runs, so a slow step is not taken for a dead one.
    - ``recover_interval``: how often (seconds) a started instance looks for abandoned sagas.
    - ``compensation_attempts``: how many times a failing compensation is tried before the saga ends ``failed``;
      ``backoff`` is the wait between tries (also between the tries of an action with ``Step(retry=n)``), spent on
      ``clock``.
    """

    def __init__(
        self,
        database: Database,
        *,
        owner: str,
        tracer: Any = None,
        stale_after: float = 30.0,
        recover_interval: float = 5.0,
        compensation_attempts: int = 5,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not owner:
            raise ConfigurationError(f"a Sagas needs an owner name, not {owner!r}", hint="pass owner=<service name>")
        if not stale_after > 0:
            raise ConfigurationError(f"stale_after must be > 0 seconds, not {stale_after!r}")
        if not recover_interval > 0:
            raise ConfigurationError(f"recover_interval must be > 0 seconds, not {recover_interval!r}")
        if compensation_attempts < 1:
            raise ConfigurationError(f"compensation_attempts must be >= 1, not {compensation_attempts!r}")
        self.database = database
        self.owner = owner
        self.tracer = tracer
        self.stale_after = float(stale_after)
        self.recover_interval = float(recover_interval)
        self.compensation_attempts = compensation_attempts
        self.backoff: Backoff = backoff if backoff is not None else Exponential(0.1, cap=10.0, jitter="full")
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self._store = Store(database)
        self._sagas: dict[str, Saga] = {}
        self._rng = random.Random()
        self._running: set[str] = set()  # ids of the sagas this instance is running (its recovery skips them)
        self._warned: set[str] = set()  # ids of sagas of unknown names, logged once
        self._tasks: set[asyncio.Task[None]] = set()  # recovered sagas being continued
        self._loop: asyncio.Task[None] | None = None
        self._migrated = False
        self._closed = False

    def __repr__(self) -> str:
        return f"Sagas(owner={self.owner!r}, database={self.database.url!r})"

    # -- definitions ------------------------------------------------------------------------------------------------

    def register(self, saga: Saga) -> Saga:
        """Make ``saga`` known by its name, so recovery can continue its unfinished runs. Registering the same
        definition twice is harmless; another definition under a taken name is a ``ConfigurationError``."""
        if not isinstance(saga, Saga):
            raise ConfigurationError(f"register() takes a Saga, not {saga!r}")
        known = self._sagas.get(saga.name)
        if known is not None and known != saga:
            raise ConfigurationError(f"another saga named {saga.name!r} is already registered")
        self._sagas[saga.name] = saga
        return saga

    @property
    def sagas(self) -> Mapping[str, Saga]:
        """The registered definitions, by name."""
        return dict(self._sagas)

    # -- lifecycle --------------------------------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Create the tables (safe to repeat, and from several processes at once)."""
        await self._store.migrate()
        self._migrated = True

    async def start(self) -> None:
        """Migrate, take over this owner's abandoned sagas, and keep looking for more every ``recover_interval``
        seconds until :meth:`aclose`. Register the definitions first. Calling it again does nothing."""
        if self._closed:
            raise ConfigurationError(f"{self!r} is closed")
        if self._loop is not None:
            return
        await self.migrate()
        try:
            await self.recover()
        except BaseException:
            await self.aclose()  # the sagas it had taken stop here; recovery continues them later
            raise
        self._loop = asyncio.create_task(self._recover_forever(), name=f"meshkit-saga-recovery-{self.owner}")

    async def aclose(self) -> None:
        """Stop looking for abandoned sagas and stop the recovered ones this instance is continuing (they stay
        unfinished in the database, and recovery continues them later). The database is not closed."""
        self._closed = True
        tasks = [*self._tasks, *([self._loop] if self._loop is not None else [])]
        self._loop = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def __aenter__(self) -> Sagas:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- reading ----------------------------------------------------------------------------------------------------

    async def get(self, saga_id: str) -> SagaRecord | None:
        """The saga ``saga_id`` with its step log, or None."""
        stored = await self._store.load(saga_id)
        return None if stored is None else stored.record

    async def list(
        self, *, name: str | None = None, status: str | None = None, limit: int = 100
    ) -> builtins.list[SagaRecord]:
        """Sagas, newest first, optionally only those named ``name`` and/or in ``status``."""
        if limit < 1:
            raise ConfigurationError(f"limit must be >= 1, not {limit!r}")
        return await self._store.list_records(name=name, status=status, limit=limit)

    # -- running ----------------------------------------------------------------------------------------------------

    async def run(
        self, saga: Saga | str, data: Mapping[str, Any] | None = None, *, saga_id: str | None = None
    ) -> SagaRecord:
        """Run ``saga`` (a :class:`Saga`, or the name of a registered one) on ``data`` (a JSON-able mapping) to its
        end and return its record (status ``completed``).

        On a failing step the completed steps are compensated in reverse order and :class:`SagaFailed` is raised
        (``status`` ``"compensated"``, or ``"failed"`` when a compensation kept failing); the step's error is its
        ``__cause__``. ``saga_id`` defaults to a new id; an id already used raises :class:`ConflictError` (look at
        the first run with :meth:`get`). If the task running this is cancelled (or the process dies), the saga
        stays unfinished in the database and recovery continues it.
        """
        if isinstance(saga, str):
            known = self._sagas.get(saga)
            if known is None:
                raise ConfigurationError(f"no saga named {saga!r} is registered", hint="register(Saga(...)) it first")
            saga = known
        self.register(saga)
        if saga_id is None:
            saga_id = new_id()
        elif not saga_id or len(saga_id) > 200:
            raise ConfigurationError(f"bad saga_id {saga_id!r}: use a non-empty string of at most 200 characters")
        try:
            data_json = _as_json(dict(data or {}), f"the data of saga {saga.name!r}")
        except TypeError as exc:
            raise ConfigurationError(str(exc)) from exc
        attributes = {"meshkit.saga.name": saga.name, "meshkit.saga.id": saga_id}
        lease = new_id()
        with span(self.tracer, f"saga {saga.name}", attributes=attributes) as current:
            traceparent = current_headers().get("traceparent") if self.tracer is not None else None
            await self._store.create(
                saga_id, saga.name, self.owner, data_json, lease=lease, now=time.time(), trace=traceparent
            )
            self._running.add(saga_id)  # (only now: a taken id must not touch the run that holds it)
            try:
                log.info(
                    "saga %s %s started",
                    saga.name,
                    saga_id,
                    extra={"saga": saga.name, "saga_id": saga_id, "owner": self.owner},
                )
                context = SagaContext(saga_id, saga.name, json.loads(data_json), {})
                await _Run(self, saga, context, lease, current).forward(0)
            except Lost:
                raise ConflictError(
                    f"saga {saga.name!r} ({saga_id}) was taken over by another process",
                    hint=f"a step ran longer than stale_after={self.stale_after:g}s without the saga's row being"
                    " refreshed (is the database reachable?)",
                ) from None
            finally:
                self._running.discard(saga_id)
        record = await self.get(saga_id)
        assert record is not None
        return record

    # -- recovery ---------------------------------------------------------------------------------------------------

    async def recover(self, *, limit: int = 100) -> int:
        """Take over (at most ``limit`` of) this owner's sagas that are unfinished and were not updated for
        ``stale_after`` seconds, and continue each in a task of this instance; returns how many it took. ``start``
        calls it, then every ``recover_interval`` seconds."""
        if self._closed:
            return 0
        taken = 0
        before = time.time() - self.stale_after
        # the definitions this process knows first (others would fill every page), then a look at the rest to say so
        known = await self._store.stale(self.owner, list(self._sagas), before, limit, known=True)
        unknown = await self._store.stale(self.owner, list(self._sagas), before, limit, known=False)
        for saga_id, name, lease, updated in [*known, *unknown]:
            if saga_id in self._running:
                continue
            saga = self._sagas.get(name)
            if saga is None:
                if saga_id not in self._warned:
                    self._warned.add(saga_id)
                    log.warning(
                        "saga %s %s is unfinished, but no saga of that name is registered: left as it is",
                        name,
                        saga_id,
                        extra={"saga": name, "saga_id": saga_id, "owner": self.owner},
                    )
                continue
            new_lease = new_id()
            if not await self._store.claim(saga_id, lease=lease, updated=updated, new_lease=new_lease, now=time.time()):
                continue  # another process took it first
            taken += 1
            log.warning(
                "saga %s %s was abandoned (not updated for %gs): recovering it",
                name,
                saga_id,
                self.stale_after,
                extra={"saga": name, "saga_id": saga_id, "owner": self.owner},
            )
            self._spawn(self._resume(saga, saga_id, new_lease), f"meshkit-saga-{saga_id}")
        return taken

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover_forever(self) -> None:
        while True:
            await asyncio.sleep(self.recover_interval)
            try:
                await self.recover()
            except Exception as exc:  # the database may be away for a while: try again next time
                log.warning(
                    "looking for abandoned sagas failed: %s",
                    _describe(exc),
                    exc_info=True,
                    extra={"owner": self.owner},
                )

    async def _resume(self, saga: Saga, saga_id: str, lease: str) -> None:
        self._running.add(saga_id)
        extra = {"saga": saga.name, "saga_id": saga_id, "owner": self.owner}
        try:
            stored = await self._store.load(saga_id)
            if stored is None:  # (deleted by hand meanwhile)
                return
            record = stored.record
            count = len(saga.steps)
            if stored.step_index > count or [s.name for s in saga.steps[: len(record.results)]] != list(record.results):
                log.error(
                    "saga %s %s does not match the registered definition (steps changed?): left as it is",
                    saga.name,
                    saga_id,
                    extra=extra,
                )
                return
            root, links = self._new_trace(stored.trace)
            attributes = {"meshkit.saga.name": saga.name, "meshkit.saga.id": saga_id, "meshkit.saga.recovered": True}
            with span(self.tracer, f"saga {saga.name}", attributes=attributes, context=root, links=links) as current:
                run = _Run(
                    self, saga, SagaContext(saga_id, saga.name, record.data, dict(record.results)), lease, current
                )
                with contextlib.suppress(SagaFailed):  # (logged where it happened)
                    if record.status == "running":
                        await run.forward(stored.step_index)
                    else:
                        await run.backward(
                            stored.step_index, record.failed_step or "?", record.error or "unknown error", None
                        )
        except Lost:
            log.warning("saga %s %s was taken over by another process", saga.name, saga_id, extra=extra)
        except Exception as exc:
            log.error(
                "continuing saga %s %s failed: %s (recovery will try again)",
                saga.name,
                saga_id,
                _describe(exc),
                exc_info=True,
                extra=extra,
            )
        finally:
            self._running.discard(saga_id)

    def _new_trace(self, traceparent: str | None) -> tuple[Any, builtins.list[Any]]:
        """A recovered saga starts a new trace (not a child of whatever started this instance), linked to the span
        of the run that started it."""
        if self.tracer is None:
            return None, []
        links: builtins.list[Any] = []
        if traceparent:
            with extracted({"traceparent": traceparent}):
                links = current_links()
        return require("opentelemetry.context", "otel").Context(), links


class _Run:
    """One saga being driven by one instance, under one lease."""

    def __init__(self, sagas: Sagas, saga: Saga, context: SagaContext, lease: str, saga_span: Any) -> None:
        self.sagas = sagas
        self.store = sagas._store
        self.saga = saga
        self.context = context
        self.lease = lease
        self.span = saga_span
        self.extra = {"saga": saga.name, "saga_id": context.saga_id, "owner": sagas.owner}

    @property
    def saga_id(self) -> str:
        return self.context.saga_id

    def _status(self, status: SagaStatus) -> None:
        if self.span is not None:
            self.span.set_attribute("meshkit.saga.status", status)

    def _attributes(self, step: Step, attempt: int) -> dict[str, Any]:
        return {
            "meshkit.saga.name": self.saga.name,
            "meshkit.saga.id": self.saga_id,
            "meshkit.saga.step": step.name,
            "meshkit.saga.attempt": attempt,
        }

    @contextlib.asynccontextmanager
    async def _heartbeat(self) -> AsyncIterator[None]:
        """Refresh the saga's row while a step runs, so a slow step is not taken for an abandoned saga."""
        task = asyncio.create_task(self._beat(), name=f"meshkit-saga-heartbeat-{self.saga_id}")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait([task])

    async def _beat(self) -> None:
        every = self.sagas.stale_after / 3
        while True:
            await asyncio.sleep(every)
            try:
                if not await self.store.touch(self.saga_id, self.lease, time.time()):
                    return  # lost: the next write of the run finds out and stops it
            except Exception as exc:
                log.warning("refreshing saga %s failed: %s", self.saga_id, _describe(exc), extra=self.extra)

    async def _wait(self, attempt: int, previous: float) -> float:
        delay = self.sagas.backoff.delay(attempt, previous, self.sagas._rng)
        await self.sagas.clock.asleep(delay)
        return delay

    async def forward(self, start: int) -> None:
        """Run the steps from ``steps[start]`` on; on a failure, compensate (raises :class:`SagaFailed`)."""
        steps = self.saga.steps
        for index in range(start, len(steps)):
            step = steps[index]
            try:
                await self._act(index, step)
            except _StepFailed as failed:
                # the failing step is undone too when its effect happened or may have (compensate_failed)
                undo = index + 1 if failed.done or step.compensate_failed else index
                await self.backward(undo, step.name, failed.reason, failed.error)
        await self.store.end(
            self.saga_id, self.lease, time.time(), seq=None, changes={"status": "completed", "step_index": len(steps)}
        )
        self._status("completed")
        log.info("saga %s %s completed", self.saga.name, self.saga_id, extra=self.extra)

    async def _act(self, index: int, step: Step) -> None:
        previous = 0.0
        name = f"saga {self.saga.name} step {step.name}"
        for attempt in range(1, step.retry + 2):
            seq = await self.store.begin(
                self.saga_id,
                self.lease,
                time.time(),
                step=step.name,
                phase="action",
                attempt=attempt,
                changes={"step_index": index},
            )
            returned = False
            try:
                with span(self.sagas.tracer, name, attributes=self._attributes(step, attempt)):
                    async with self._heartbeat():
                        result = await step.action(self.context)
                    returned = True
                    stored = _as_json(result, f"the result of step {step.name!r}")
            except Exception as exc:
                reason = _describe(exc)
                extra = {**self.extra, "step": step.name, "attempt": attempt}
                # the last try, or one that did its work but returned a result that cannot be kept (trying again
                # would do the work twice)
                if attempt > step.retry or returned:
                    await self.store.end(
                        self.saga_id,
                        self.lease,
                        time.time(),
                        seq=seq,
                        status="failed",
                        error=reason,
                        changes={
                            "status": "compensating",
                            "error": reason,
                            "failed_step": step.name,
                            # what recovery compensates from: this step too when it may have done its work
                            "step_index": index + 1 if returned or step.compensate_failed else index,
                        },
                    )
                    log.warning(
                        "saga %s %s: step %s failed: %s; compensating",
                        self.saga.name,
                        self.saga_id,
                        step.name,
                        reason,
                        extra=extra,
                    )
                    raise _StepFailed(exc, done=returned) from exc
                await self.store.end(self.saga_id, self.lease, time.time(), seq=seq, status="failed", error=reason)
                log.info(
                    "saga %s %s: step %s failed (attempt %d): %s; retrying",
                    self.saga.name,
                    self.saga_id,
                    step.name,
                    attempt,
                    reason,
                    extra=extra,
                )
                previous = await self._wait(attempt, previous)
                continue
            self.context.results[step.name] = json.loads(stored)
            await self.store.end(
                self.saga_id,
                self.lease,
                time.time(),
                seq=seq,
                changes={"results": _as_json(self.context.results, "results"), "step_index": index + 1},
            )
            return

    async def backward(self, count: int, failed_step: str, reason: str, cause: BaseException | None) -> NoReturn:
        """Undo the first ``count`` steps, last first; raises :class:`SagaFailed` (``compensated`` or ``failed``)."""
        for index in range(count, 0, -1):
            step = self.saga.steps[index - 1]
            if step.compensate is None:
                continue
            error = await self._compensate(index, step)
            if error is not None:
                message = f"{reason}; compensation of step {step.name!r} failed: {error}"
                await self.store.end(
                    self.saga_id,
                    self.lease,
                    time.time(),
                    seq=None,
                    changes={"status": "failed", "error": message, "step_index": index},
                )
                self._status("failed")
                log.error(
                    "saga %s %s failed: compensation of step %s failed %d times (%s); a person must look",
                    self.saga.name,
                    self.saga_id,
                    step.name,
                    self.sagas.compensation_attempts,
                    error,
                    extra={**self.extra, "step": step.name, "failed_step": failed_step},
                )
                raise SagaFailed(
                    self.saga.name, self.saga_id, step=failed_step, status="failed", reason=message
                ) from cause
        await self.store.end(
            self.saga_id, self.lease, time.time(), seq=None, changes={"status": "compensated", "step_index": 0}
        )
        self._status("compensated")
        log.warning(
            "saga %s %s compensated after step %s failed: %s",
            self.saga.name,
            self.saga_id,
            failed_step,
            reason,
            extra={**self.extra, "failed_step": failed_step},
        )
        raise SagaFailed(self.saga.name, self.saga_id, step=failed_step, status="compensated", reason=reason) from cause

    async def _compensate(self, index: int, step: Step) -> str | None:
        """Undo ``steps[index - 1]``, retrying with backoff; None when done, else the last error."""
        assert step.compensate is not None
        name = f"saga {self.saga.name} compensate {step.name}"
        previous = 0.0
        reason = ""
        for attempt in range(1, self.sagas.compensation_attempts + 1):
            if attempt > 1:
                previous = await self._wait(attempt - 1, previous)
            seq = await self.store.begin(
                self.saga_id,
                self.lease,
                time.time(),
                step=step.name,
                phase="compensation",
                attempt=attempt,
                changes={"step_index": index},
            )
            try:
                with span(self.sagas.tracer, name, attributes=self._attributes(step, attempt)):
                    async with self._heartbeat():
                        await step.compensate(self.context)
            except Exception as exc:
                reason = _describe(exc)
                await self.store.end(self.saga_id, self.lease, time.time(), seq=seq, status="failed", error=reason)
                log.warning(
                    "saga %s %s: compensation of step %s failed (attempt %d of %d): %s",
                    self.saga.name,
                    self.saga_id,
                    step.name,
                    attempt,
                    self.sagas.compensation_attempts,
                    reason,
                    extra={**self.extra, "step": step.name, "attempt": attempt},
                )
                continue
            await self.store.end(self.saga_id, self.lease, time.time(), seq=seq, changes={"step_index": index - 1})
            return None
        return reason
