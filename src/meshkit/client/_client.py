"""The service client: client-side discovery, balancing and resilience for one downstream service.

How a call runs (``await client.get("/orders/7")``):

1. The request is built once: path, encoded query, headers (plus the current ``traceparent`` / ``tracestate``)
   and body. It is *safe to retry* if its method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE), if the caller
   says ``idempotent=True``, or if it carries an ``Idempotency-Key`` header.
2. It runs through the service's pipeline, outermost first: the service's circuit breaker (which judges the
   outcome of whole calls, after retries: a call that a retry rescued is not a failure of the service), the retry
   policy, and the service's bulkhead (a slot per attempt, so a call waiting between attempts holds none).
3. Each attempt chooses an instance from the rotation with the balancer, preferring instances this call has not
   tried yet, and sends the request through that instance's circuit breaker and the attempt's timeout. Its outcome
   (status, or a connect error / timeout) goes to the outlier detector.

The rotation is the registry's ``passing`` instances of the service, minus those the outlier detector ejected and
those whose breaker is open. If that leaves nothing while healthy instances exist, the client uses them all
anyway (as Envoy's panic threshold does): their breakers then fail fast, and a recovering instance is found as
soon as its breaker lets a probe through. The registry's view is kept by a watch (``registry.watch(service)``) in a
background task that the client starts on first use and cancels in :meth:`ServiceClient.aclose`; calls never wait
for the registry once its first snapshot arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import urlencode

from meshkit._core.clock import Clock, MonotonicClock
from meshkit.client.balancers import Balancer, balancer_named
from meshkit.client.base import Headers, HeadersLike, Request, Response, Transport
from meshkit.client.options import ClientOptions, is_server_error
from meshkit.discovery import Change, Instance, Registry, Watch
from meshkit.discovery.health import OutlierDetector
from meshkit.errors import CircuitOpen, ConfigurationError, TimeoutExceeded, Unavailable
from meshkit.resilience import Bound, BreakerState, BreakerTransition, Bulkhead, CircuitBreaker, Pipeline, Timeout
from meshkit.resilience.events import Event, Listeners
from meshkit.tracing.propagation import current_headers, span_headers
from meshkit.tracing.spans import span_kind, status_code_error

__all__ = ["IDEMPOTENT_METHODS", "QueryParams", "ServiceClient"]

log = logging.getLogger("meshkit.client")

#: Methods whose repetition has the effect of one call (RFC 9110 9.2.2): retried without being asked.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

QueryValue = str | int | float | bool | None
QueryParams = Mapping[str, QueryValue | Sequence[QueryValue]] | Sequence[tuple[str, QueryValue]]
"""Query parameters: a mapping (a sequence value repeats the key) or ``(name, value)`` pairs."""

#: Seconds a call waits for the first registry snapshot when it has no timeout of its own.
_FIRST_SNAPSHOT_WAIT = 30.0
_WATCH_RETRY_FIRST, _WATCH_RETRY_MAX = 0.1, 5.0


class _Member:
    """One known instance and what the client keeps for it."""

    __slots__ = ("breaker", "erred", "instance", "runners", "unsubscribe")

    def __init__(self, instance: Instance, breaker: CircuitBreaker | None) -> None:
        self.instance = instance
        self.breaker = breaker
        #: an error was given to the outlier detector since the last success: it may hold a count to clear (else a
        #: success has nothing to tell it; the detector belongs to this client, which alone feeds it)
        self.erred = False
        self.runners: dict[float | None, Bound | None] = {}  # per attempt timeout: breaker | Timeout
        self.unsubscribe: Callable[[], None] | None = None


class _Call:
    """The state of one call across its attempts."""

    __slots__ = ("request", "timeout", "tried")

    def __init__(self, request: Request, timeout: float | None) -> None:
        self.request = request
        self.timeout = timeout
        self.tried: set[str] = set()


class ServiceClient:
    """Calls one service by name: ``ServiceClient("payments", registry)``. See the module docstring.

    Use it as ``async with`` or call :meth:`aclose`. ``transport`` defaults to an :class:`HttpTransport` the
    client owns (and closes); a transport passed in belongs to the caller, who may share it among clients.
    ``clock`` is used by every policy the client builds (tests pass a :class:`~meshkit.testing.FakeClock`).
    """

    def __init__(
        self,
        service: str,
        registry: Registry,
        *,
        options: ClientOptions | None = None,
        transport: Transport | None = None,
        clock: Clock | None = None,
        tracer: Any = None,
    ) -> None:
        if not service:
            raise ConfigurationError("a service client needs the name of the service it calls")
        self.service = service
        self.registry = registry
        self.tracer = tracer  # an OpenTelemetry tracer: each call is a client span (None: no spans)
        self.options = opts = options or ClientOptions()
        self.clock: Clock = clock or MonotonicClock()
        if transport is None:
            from meshkit.client.http import HttpTransport  # noqa: PLC0415 - its driver loads on first send anyway

            transport, self._owns_transport = HttpTransport(), True
        else:
            self._owns_transport = False
        self.transport: Transport = transport
        self.balancer: Balancer = balancer_named(opts.balancer) if isinstance(opts.balancer, str) else opts.balancer
        self._breaker_factory = opts.breaker
        self.breaker: CircuitBreaker | None = opts.breaker(service, self.clock) if opts.breaker else None
        self.bulkhead: Bulkhead | None = (
            Bulkhead(opts.bulkhead, max_wait=opts.bulkhead_wait, name=f"{service} bulkhead", clock=self.clock)
            if opts.bulkhead is not None
            else None
        )
        self.outlier: OutlierDetector | None = (
            OutlierDetector(opts.outlier, clock=self.clock) if opts.outlier is not None else None
        )
        self._safe, self._unsafe = self._pipelines(opts, clock)
        self._timeouts: dict[float, Timeout] = {}

        self._members: dict[str, _Member] = {}
        # told when an instance breaker is made or dropped
        self._breakers_changed: Listeners[[]] = Listeners(
            what=f"a listener of {service}'s instance breakers", logger=log
        )
        self._breakers_moved = False  # a breaker was made or dropped since the listeners were last told
        self._outstanding: dict[str, int] = {}
        self._open: dict[str, float] = {}  # instance id -> clock time its open breaker may let a probe through
        self._rotation: tuple[Instance, ...] = ()
        self._healthy: tuple[Instance, ...] = ()
        self._dirty = True
        self._next_check = math.inf

        self._task: asyncio.Task[None] | None = None
        self._ready = False
        self._settled: asyncio.Event | None = None  # set at the first snapshot, or the first failure to get one
        self._watch_error: BaseException | None = None
        self._closed = False

    def _pipelines(self, opts: ClientOptions, clock: Clock | None) -> tuple[Bound | None, Bound | None]:
        """The service pipelines for calls that are safe to retry and for those that are not."""
        retry = opts.retry
        if retry is not None and clock is not None:
            retry = replace(retry, clock=clock)
        safe_retry = unsafe_retry = None
        if retry is not None:
            # A 5xx *answer* may be retried only when repeating the request is harmless: Retry's result predicate
            # does not look at idempotency, so the unsafe pipeline gets none.
            safe_retry = retry if retry.on_result is not None else replace(retry, on_result=is_server_error)
            unsafe_retry = retry if retry.on_result is None else replace(retry, on_result=None)
        bound: list[Bound | None] = []
        for idempotent, retry_layer in ((True, safe_retry), (False, unsafe_retry)):
            layers = [p for p in (self.breaker, retry_layer, self.bulkhead) if p is not None]
            bound.append(
                Pipeline(tuple(x for p in layers for x in p.layers)).options(idempotent=idempotent, name=self.service)
                if layers
                else None
            )
        return bound[0], bound[1]

    # -- the call API ---------------------------------------------------------------------------------------------

    async def get(
        self,
        path: str,
        *,
        params: QueryParams | None = None,
        headers: HeadersLike | None = None,
        timeout: float | None = None,
    ) -> Response:
        """``GET path``. Retried (on another instance) after a connect error, a timeout or a 5xx."""
        return await self.request("GET", path, params=params, headers=headers, timeout=timeout)

    async def post(
        self,
        path: str,
        *,
        json: Any = None,
        content: bytes | str | None = None,
        params: QueryParams | None = None,
        headers: HeadersLike | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Response:
        """``POST path``: not retried once sent, unless ``idempotent=True`` or an ``Idempotency-Key`` header."""
        return await self.request(
            "POST", path, json=json, content=content, params=params, headers=headers, timeout=timeout,
            idempotent=idempotent,
        )  # fmt: skip

    async def put(
        self,
        path: str,
        *,
        json: Any = None,
        content: bytes | str | None = None,
        params: QueryParams | None = None,
        headers: HeadersLike | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Response:
        """``PUT path`` (idempotent by definition: retried)."""
        return await self.request(
            "PUT", path, json=json, content=content, params=params, headers=headers, timeout=timeout,
            idempotent=idempotent,
        )  # fmt: skip

    async def patch(
        self,
        path: str,
        *,
        json: Any = None,
        content: bytes | str | None = None,
        params: QueryParams | None = None,
        headers: HeadersLike | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Response:
        """``PATCH path``: not retried once sent, unless ``idempotent=True`` or an ``Idempotency-Key`` header."""
        return await self.request(
            "PATCH", path, json=json, content=content, params=params, headers=headers, timeout=timeout,
            idempotent=idempotent,
        )  # fmt: skip

    async def delete(
        self,
        path: str,
        *,
        json: Any = None,
        content: bytes | str | None = None,
        params: QueryParams | None = None,
        headers: HeadersLike | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Response:
        """``DELETE path`` (idempotent by definition: retried)."""
        return await self.request(
            "DELETE", path, json=json, content=content, params=params, headers=headers, timeout=timeout,
            idempotent=idempotent,
        )  # fmt: skip

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | str | None = None,
        params: QueryParams | None = None,
        headers: HeadersLike | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Response:
        """Send ``method path`` to an instance of the service; the answer, whatever its status.

        ``json`` (serialized, with ``Content-Type: application/json``) or ``content`` is the body; ``timeout`` is
        the budget of each attempt (default: ``options.timeout``). Raises :class:`~meshkit.errors.Unavailable`
        when no instance can be reached (or none is registered), :class:`~meshkit.errors.TimeoutExceeded` when the
        last attempt timed out, :class:`~meshkit.errors.CircuitOpen` / :class:`~meshkit.errors.BulkheadFull` when
        the client shed the call. A 5xx answer to the last attempt is returned, not raised.
        """
        if self._closed:
            raise ConfigurationError(f"the client of {self.service!r} is closed")
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"timeout must be positive, not {timeout!r}")
        budget = timeout if timeout is not None else self.options.timeout
        tracer = self.tracer
        if tracer is None:
            return await self._call(_build(method, path, params, headers, json, content), budget, idempotent)
        # The call in a client span (here, not in a helper coroutine: one coroutine less per traced call); the
        # request is built inside it, so it carries the span's traceparent.
        upper = method.upper()
        attributes = {"http.request.method": upper, "url.path": path, "peer.service": self.service}
        # (positional, in the order of the API's start_as_current_span: no wrapper, no keywords)
        with tracer.start_as_current_span(f"{upper} {self.service}", None, span_kind("client"), attributes) as current:
            request = _build(method, path, params, headers, json, content, span_headers(current))
            response = await self._call(request, budget, idempotent)
            current.set_attribute("http.response.status_code", response.status)
            if response.instance is not None:
                current.set_attribute("server.address", response.instance.host)
                current.set_attribute("server.port", response.instance.port)
            if response.status >= 500:
                current.set_status(status_code_error(), f"HTTP {response.status}")
            return response

    async def _call(self, request: Request, budget: float | None, idempotent: bool) -> Response:
        if not self._ready:
            await self._first_snapshot(budget)
        if not self._current_rotation():  # empty only when no instance is healthy (see _rebuild)
            raise self._no_instance()
        safe = idempotent or request.method in IDEMPOTENT_METHODS or "idempotency-key" in request.headers
        call = _Call(request, budget)
        pipeline = self._safe if safe else self._unsafe
        if pipeline is None:
            return await self._attempt(call)
        return await pipeline.acall(self._attempt, call)

    async def _attempt(self, call: _Call) -> Response:
        member = self._choose(call.tried)
        instance = member.instance
        iid = instance.id
        call.tried.add(iid)
        outstanding = self._outstanding
        outstanding[iid] = outstanding.get(iid, 0) + 1
        try:
            runner = member.runners.get(call.timeout, _NOT_BUILT)
            if runner is _NOT_BUILT:
                runner = self._runner(member, call.timeout)
            if runner is None:
                response = await self.transport.send(instance, call.request, call.timeout)
            else:
                response = await runner.acall(self.transport.send, instance, call.request, call.timeout)
        except CircuitOpen as exc:
            # The instance's breaker refused: nothing was sent, nothing to tell the outlier detector. Its
            # retry_after says when *this* instance may be probed again; the next attempt goes to another one, so
            # that hint must not make the retry wait (it would hold the call for the whole open period).
            if exc.retry_after is None:
                raise
            raise CircuitOpen(exc.name) from exc
        except (Unavailable, TimeoutError) as exc:
            log.debug(
                "%s %s to %s at %s failed: %s",
                call.request.method,
                call.request.path,
                self.service,
                instance.address,
                exc,
                extra={"service": self.service, "instance": iid, "error": type(exc).__name__},
            )
            self._outcome(member, None)
            raise
        finally:
            left = outstanding.get(iid, 1) - 1
            if left > 0:
                outstanding[iid] = left
            else:
                outstanding.pop(iid, None)
        self._outcome(member, response.status)
        return response

    def _runner(self, member: _Member, timeout: float | None) -> Bound | None:
        """The instance's breaker and the attempt's timeout, as one bound pipeline (built once per timeout)."""
        layers: list[CircuitBreaker | Timeout] = [] if member.breaker is None else [member.breaker]
        if timeout is not None:
            policy = self._timeouts.get(timeout)
            if policy is None:
                if len(self._timeouts) > 64:
                    self._timeouts.clear()
                policy = self._timeouts[timeout] = Timeout(timeout, name=f"{self.service} timeout", clock=self.clock)
            layers.append(policy)
        address = member.instance.address
        runner = Pipeline(tuple(layers)).options(name=f"call to {self.service} at {address}") if layers else None
        if len(member.runners) > 64:
            member.runners.clear()
        member.runners[timeout] = runner
        return runner

    def _outcome(self, member: _Member, status: int | None) -> None:
        outlier = self.outlier
        if outlier is None or self._members.get(member.instance.id) is not member:
            return
        failed = outlier.is_error(status)
        if not (failed or member.erred):
            return  # a success after successes: no error count to reset (the rotation learnt the id already)
        member.erred = failed
        if outlier.record(member.instance.id, status):
            self._dirty = True
            log.info(
                "%s at %s leaves the rotation (outlier)",
                self.service,
                member.instance.address,
                extra={
                    "service": self.service,
                    "instance": member.instance.id,
                    "until": outlier.ejected_until(member.instance.id),
                },
            )

    # -- choosing an instance -------------------------------------------------------------------------------------

    def _choose(self, tried: Collection[str]) -> _Member:
        return self._members[self._pick(tried).id]

    def _pick(self, tried: Collection[str]) -> Instance:
        rotation = self._current_rotation()
        if not rotation:
            raise self._no_instance()
        if tried:
            untried = tuple(i for i in rotation if i.id not in tried)
            if untried:  # a retry goes elsewhere when it can; else to one already tried, rather than to the
                rotation = untried  # ejected (they failed more than this one did)
        return self.balancer.choose(rotation, self._outstanding)

    def _current_rotation(self) -> tuple[Instance, ...]:
        if self._dirty or (self._next_check != math.inf and self.clock.now() >= self._next_check):
            self._rebuild()
        return self._rotation

    def _rebuild(self) -> None:
        now = self.clock.now()
        healthy = tuple(sorted((m.instance for m in self._members.values() if m.instance.healthy), key=_by_id))
        next_check = math.inf
        excluded: set[str] = set()
        if self.outlier is not None:
            available = {i.id for i in self.outlier.available(healthy)}
            for instance in healthy:
                if instance.id not in available:
                    excluded.add(instance.id)
                    until = self.outlier.ejected_until(instance.id)
                    next_check = min(next_check, until if until is not None else now)
        for iid, until in list(self._open.items()):
            member = self._members.get(iid)
            if member is None or member.breaker is None:
                self._open.pop(iid, None)
                continue
            if now >= until:
                _ = member.breaker.state  # reading it moves OPEN to HALF_OPEN; the listener takes it off the list
            if iid in self._open:
                excluded.add(iid)
                next_check = min(next_check, max(self._open[iid], now))
        self._dirty = False  # set again if a breaker moved while we looked: that is accounted for above
        self._healthy = healthy
        rotation = tuple(i for i in healthy if i.id not in excluded)
        if not rotation and healthy:
            log.warning(
                "every healthy instance of %s is ejected or has an open circuit: using them all",
                self.service,
                extra={"service": self.service, "healthy": len(healthy)},
            )
            rotation = healthy
        if rotation != self._rotation:
            log.debug(
                "rotation of %s: %s",
                self.service,
                ", ".join(i.address for i in rotation) or "empty",
                extra={"service": self.service, "rotation": [i.id for i in rotation], "excluded": sorted(excluded)},
            )
            self._rotation = rotation
        self._next_check = next_check

    def _no_instance(self) -> Unavailable:
        registered = len(self._members)
        if registered:
            hint = (
                f"{registered} instance(s) of {self.service!r} are registered but none is passing its health "
                "checks; see their /healthz"
            )
        else:
            hint = (
                f"start an instance of {self.service!r}, or check that it registers under that name in the same "
                f"registry ({self.registry!r})"
            )
        return Unavailable(f"no healthy instance of {self.service!r} in the registry", hint=hint)

    # -- the registry's view --------------------------------------------------------------------------------------

    def _start(self) -> asyncio.Event:
        if self._closed:
            raise ConfigurationError(f"the client of {self.service!r} is closed")
        if self._settled is None:
            self._settled = asyncio.Event()
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name=f"meshkit-client-{self.service}")
        return self._settled

    async def _first_snapshot(self, budget: float | None) -> None:
        """Wait until the watch delivered its first snapshot (or failed to)."""
        settled = self._start()
        if not settled.is_set():
            wait = budget if budget is not None else _FIRST_SNAPSHOT_WAIT
            try:
                async with asyncio.timeout(wait):  # real time: the registry answers in real time
                    await settled.wait()
            except TimeoutError:
                raise TimeoutExceeded(
                    f"the registry did not list the instances of {self.service!r} within {wait:g}s", timeout=wait
                ) from None
        if not self._ready:
            error = self._watch_error
            raise Unavailable(
                f"cannot read the instances of {self.service!r} from the registry: {error}",
                hint="check that the registry is reachable; the client keeps trying",
            ) from error

    async def _follow(self) -> None:
        """Keep the view current; after a failure, start a new watch (with backoff) and keep the last view."""
        delay = _WATCH_RETRY_FIRST
        while True:
            try:
                await self._follow_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the registry failed (or worse): the view stays, a new watch will fix it
                if self.registry.closed:
                    log.debug("the registry closed: the view of %s stays as it is", self.service)
                    return
                self._watch_error = exc
                if self._settled is not None:
                    self._settled.set()
                log.warning(
                    "watching %s in the registry failed: %s; retrying in %gs",
                    self.service,
                    exc,
                    delay,
                    extra={"service": self.service, "error": type(exc).__name__, "retry_in": delay},
                )
                await asyncio.sleep(delay)  # real time, like the registry's own polling
                delay = min(delay * 2, _WATCH_RETRY_MAX)
                continue
            if self.registry.closed:
                log.debug("the registry closed: the view of %s stays as it is", self.service)
                return
            delay = _WATCH_RETRY_FIRST

    async def _follow_once(self) -> None:
        """One watch, from its snapshot until it ends.

        The watch yields its snapshot (as ``added`` changes) without waiting for the registry between them, and
        only then waits for new changes. So the changes the watch gives without suspending, after it is ready,
        are the snapshot (and perhaps a few later changes, in order): collected into a fresh view that replaces
        the old one, so instances that left while a previous watch was down are dropped as well.
        """
        watch = self.registry.watch(self.service)
        pending = asyncio.ensure_future(_next_change(watch))
        ready = asyncio.ensure_future(watch.ready.wait())
        try:
            await asyncio.wait({pending, ready}, return_when=asyncio.FIRST_COMPLETED)
            fresh: dict[str, Instance] = {}
            while pending.done():
                change = pending.result()
                if change is None:
                    break
                _apply(fresh, change)
                pending = asyncio.ensure_future(_next_change(watch))
                await asyncio.sleep(0)  # one turn: a change that needs no I/O is there now
            self._replace_view(fresh)
            self._ready = True
            if self._settled is not None:
                self._settled.set()
            while True:
                change = await pending
                if change is None:
                    return
                self._on_change(change)
                pending = asyncio.ensure_future(_next_change(watch))
        finally:
            ready.cancel()
            pending.cancel()
            await asyncio.wait({pending, ready})
            if not pending.cancelled():
                pending.exception()  # retrieved: its error (if any) was raised above already
            await watch.aclose()

    def _replace_view(self, fresh: Mapping[str, Instance]) -> None:
        for iid in [iid for iid in self._members if iid not in fresh]:
            self._forget(iid)
        for instance in fresh.values():
            self._learn(instance)
        self._view_changed()

    def _on_change(self, change: Change) -> None:
        if change.kind == "removed":
            self._forget(change.instance.id)
        else:
            self._learn(change.instance)
        self._view_changed()

    def _view_changed(self) -> None:
        """After a snapshot or a change: the rotation is rebuilt on next use, and the listeners of instance
        breakers hear once that breakers came or went (not once per instance of a snapshot)."""
        self._dirty = True
        if self._breakers_moved:
            self._breakers_moved = False
            self._breakers_changed.emit()

    def _learn(self, instance: Instance) -> None:
        """An instance is added or changed."""
        known = self._members.get(instance.id)
        if known is not None and known.instance.address == instance.address:
            known.instance = instance  # same place: keep its breaker and its record
            return
        if known is not None:
            self._forget(instance.id)
        raw_weight = instance.metadata.get("weight")
        if raw_weight is not None and not _valid_weight(raw_weight):
            log.warning(
                "instance %s of %s has weight %r, not a positive number: using 1",
                instance.id,
                self.service,
                raw_weight,
                extra={"service": self.service, "instance": instance.id, "weight": raw_weight},
            )
        breaker = (
            self._breaker_factory(f"{self.service}@{instance.address}", self.clock) if self._breaker_factory else None
        )
        member = _Member(instance, breaker)
        if breaker is not None:
            member.unsubscribe = breaker.events.subscribe(lambda event: self._on_breaker(member, event))
        self._members[instance.id] = member
        if breaker is not None:
            self._breakers_moved = True
        log.debug(
            "%s instance %s at %s is known",
            self.service,
            instance.id,
            instance.address,
            extra={"service": self.service, "instance": instance.id, "status": str(instance.status)},
        )

    def _forget(self, iid: str) -> None:
        member = self._members.pop(iid, None)
        if member is not None and member.unsubscribe is not None:
            member.unsubscribe()
        self._open.pop(iid, None)
        if self.outlier is not None:
            self.outlier.forget(iid)
        if member is not None and member.breaker is not None:
            self._breakers_moved = True

    def _on_breaker(self, member: _Member, event: Event) -> None:
        if not isinstance(event, BreakerTransition) or member.breaker is None:
            return
        iid = member.instance.id
        if self._members.get(iid) is not member:
            return
        if event.to_state is BreakerState.OPEN:
            self._open[iid] = event.at + member.breaker.wait_in_open
        else:
            self._open.pop(iid, None)
        self._dirty = True
        log.info(
            "circuit of %s at %s: %s -> %s",
            self.service,
            member.instance.address,
            event.from_state,
            event.to_state,
            extra={"service": self.service, "instance": iid, "state": str(event.to_state)},
        )

    # -- looking at the client ------------------------------------------------------------------------------------

    @property
    def rotation(self) -> tuple[Instance, ...]:
        """The instances in rotation now, by id (empty until the first registry snapshot; see :meth:`instances`)."""
        return self._current_rotation()

    @property
    def outstanding(self) -> Mapping[str, int]:
        """Calls in flight from this client, per instance id (instances with none are absent)."""
        return MappingProxyType(self._outstanding)

    async def instances(self) -> list[Instance]:
        """The instances in rotation now (healthy, not ejected, circuit not open), by id."""
        if not self._ready:
            await self._first_snapshot(self.options.timeout)
        return list(self._current_rotation())

    async def resolve(self) -> Instance:
        """The instance the balancer chooses for a call now (a call's first attempt), without calling it."""
        if not self._ready:
            await self._first_snapshot(self.options.timeout)
        return self._choose(set()).instance

    # -- the client's choices without its transport (a proxy forwarding requests itself) -------------------------

    @property
    def ready(self) -> bool:
        """True once the first registry snapshot arrived (before that, :meth:`acquire` raises ``Unavailable``)."""
        return self._ready

    async def start(self, timeout: float | None = None) -> None:
        """Start following the registry and wait (up to ``timeout``) for its first snapshot."""
        await self._first_snapshot(timeout if timeout is not None else self.options.timeout)

    def acquire(self, tried: Collection[str] = ()) -> Instance:
        """Choose the instance for one attempt (preferring one not in ``tried``) and count it as outstanding.

        For proxies that send the request themselves; every instance acquired must be given back with
        :meth:`release`. Raises :class:`~meshkit.errors.Unavailable` when there is none (or before the first
        snapshot: call :meth:`start`)."""
        if not self._ready:
            if self._task is None and not self._closed:
                self._start()
            raise self._no_instance()
        instance = self._pick(tried)
        iid = instance.id
        self._outstanding[iid] = self._outstanding.get(iid, 0) + 1
        return instance

    def release(self, instance: Instance, status: int | None, *, counted: bool = True) -> None:
        """The attempt on ``instance`` ended with ``status`` (``None``: no answer: refused, reset, timed out):
        outstanding count and outlier detection, as for the client's own calls. ``counted=False``: the attempt was
        abandoned by the caller (a client that went away), which says nothing about the instance: only the
        outstanding count is given back."""
        iid = instance.id
        left = self._outstanding.get(iid, 1) - 1
        if left > 0:
            self._outstanding[iid] = left
        else:
            self._outstanding.pop(iid, None)
        member = self._members.get(iid) if counted else None
        if member is not None and (member.erred or OutlierDetector.is_error(status)):
            self._outcome(member, status)  # (else a success after successes: nothing to tell, see _outcome)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop watching the registry and close the transport if the client made it. Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_transport:
            self._owns_transport = False
            await self.transport.aclose()

    async def __aenter__(self) -> ServiceClient:
        self._start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"ServiceClient({self.service!r}, {self.registry!r}, transport={self.transport!r})"

    def instance_breakers(self) -> dict[str, tuple[Instance, CircuitBreaker]]:
        """The circuit breaker of each instance the client knows (in rotation or not), by instance id, with the
        instance: empty without a breaker factory or before the first registry snapshot. A new dict each call;
        an instance that moves to another address gets a new breaker."""
        return {iid: (m.instance, m.breaker) for iid, m in self._members.items() if m.breaker is not None}

    def on_instance_breaker(self, told: Callable[[], None]) -> Callable[[], None]:
        """Call ``told()`` each time :meth:`instance_breakers` changes: an instance's breaker made (before any
        call goes through it) or dropped (the instance left, or moved); returns the function that stops it."""
        return self._breakers_changed.subscribe(told)


_NOT_BUILT: Any = object()


def _valid_weight(raw: str) -> bool:
    try:
        value = float(raw)
    except ValueError:
        return False
    return value > 0 and math.isfinite(value)


def _by_id(instance: Instance) -> str:
    return instance.id


async def _next_change(watch: Watch) -> Change | None:
    """The watch's next change; None when the watch ended (its registry closed)."""
    try:
        return await watch.__anext__()
    except StopAsyncIteration:
        return None


def _apply(view: dict[str, Instance], change: Change) -> None:
    if change.kind == "removed":
        view.pop(change.instance.id, None)
    else:
        view[change.instance.id] = change.instance


def _query(params: QueryParams) -> str:
    pairs: list[tuple[str, str]] = []
    items = params.items() if isinstance(params, Mapping) else params
    for key, value in items:
        values = value if isinstance(value, list | tuple) else (value,)
        for v in values:
            if v is None:
                continue
            pairs.append((key, ("true" if v else "false") if isinstance(v, bool) else str(v)))
    return urlencode(pairs)


def _build(
    method: str,
    path: str,
    params: QueryParams | None,
    headers: HeadersLike | None,
    json_body: Any,
    content: bytes | str | None,
    trace: dict[str, str] | None = None,
) -> Request:
    """The request of one call: the same value goes to every attempt. ``trace``: its trace headers (default: the
    current context's); headers the caller gave win."""
    if not path.startswith("/"):
        path = "/" + path
    path, _, query = path.partition("?")
    if params:
        extra = _query(params)
        query = f"{query}&{extra}" if query and extra else query or extra
    pairs = list(Headers(headers).raw()) if headers is not None else []
    names = {k.lower() for k, _ in pairs}
    if json_body is not None:
        if content is not None:
            raise ConfigurationError("give a request body as json= or as content=, not both")
        body = jsonlib.dumps(json_body, separators=(",", ":")).encode()
        if "content-type" not in names:
            pairs.append(("content-type", "application/json"))
    elif isinstance(content, str):
        body = content.encode()
        if "content-type" not in names:
            pairs.append(("content-type", "text/plain; charset=utf-8"))
    else:
        body = content or b""
    if trace is None:
        trace = current_headers()
    pairs.extend((k, v) for k, v in trace.items() if k not in names)
    return Request(method.upper(), path, query, Headers(pairs), body)
