"""Processes mode: one process per service instance, supervised.

The supervisor starts ``replicas`` children per service (``python -m meshkit.runner.child``), each on a socket the
supervisor binds and hands down (so no other process can take a chosen port before the child serves on it; callers
are refused until it does; the port stays the same across restarts while it is free), merges their output into one
stream with a coloured ``service.N |`` prefix (the colour is stable per service), restarts a child that exits on its
own with an exponential backoff (reset once it has run for a minute), waits until every instance answers ``/readyz``
before reporting ready, and on stop sends SIGTERM to every child (they leave the registry and finish their work),
then SIGKILL to any still running after the grace period. Children also stop by themselves if the supervisor dies,
so nothing is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from meshkit import discovery, messaging
from meshkit._core.optional import require
from meshkit.dashboard import LogBuffer, ServiceInfo
from meshkit.discovery.health import CheckPolicy, HealthChecker, HttpProbe
from meshkit.errors import ConfigurationError, Unavailable
from meshkit.resilience import Exponential
from meshkit.runner.edge import front_gateway
from meshkit.runner.monolith import Ready
from meshkit.runner.observe import Tracing, edge_rows, resilience_source, system_dashboard, system_tracing
from meshkit.runner.serve import bind
from meshkit.runner.system import System

__all__ = ["Supervisor"]

log = logging.getLogger("meshkit.runner")

_COLOURS = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92")
_HEALTHY_RUN = 60.0  # a child that ran this long and then died starts its backoff from the beginning


@dataclass
class _Child:
    service: str
    replica: int
    port: int  # 0 until the first start when the port is the supervisor's choice
    fixed: bool  # the port is the system's (configured), not chosen by the supervisor
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    failures: int = 0  # exits in a row without a healthy run
    keeper: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.service}.{self.replica}"


class Supervisor:
    def __init__(
        self,
        system: System,
        *,
        replicas: Mapping[str, int] | None = None,
        host: str = "127.0.0.1",
        out: TextIO | None = None,
        colour: bool | None = None,
        ready_timeout: float = 120.0,
        grace: float = 35.0,
        health: CheckPolicy | None = None,
    ) -> None:
        unknown = sorted(set(replicas or {}) - set(system.services))
        if unknown:
            raise ConfigurationError(
                f"--replicas names {', '.join(map(repr, unknown))}, not a service of this system",
                hint=f"the services are: {', '.join(system.services)}",
            )
        self.system = system
        self.host = host
        self.out = out or sys.stdout
        self.colour = self.out.isatty() if colour is None else colour
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.health = health or CheckPolicy(interval=2.0, timeout=2.0)
        self.backoff = Exponential(0.5, cap=30.0)
        self._halt = asyncio.Event()
        self.tracing = Tracing(None)  # set by run()
        self.logs = LogBuffer()  # the children's output, for the dashboard's Logs page
        self.children: list[_Child] = []
        for name, entry in system.services.items():
            count = (replicas or {}).get(name, entry.replicas)
            for replica in range(1, count + 1):
                port = entry.port + replica - 1 if entry.port else 0
                self.children.append(_Child(name, replica, port, fixed=bool(entry.port)))
        self._width = max(len(c.label) for c in self.children)

    # -- output ----------------------------------------------------------------------------------------------------

    def _prefix(self, child: _Child) -> str:
        text = f"{child.label:<{self._width}} |"
        if not self.colour:
            return text
        code = _COLOURS[zlib.crc32(child.service.encode()) % len(_COLOURS)]
        return f"\x1b[{code}m{text}\x1b[0m"

    def _say(self, child: _Child, line: str) -> None:
        self.out.write(f"{self._prefix(child)} {line}\n")
        self.out.flush()
        self.logs.append_line(child.service, line)

    def _service_infos(self) -> Callable[[], Mapping[str, ServiceInfo]]:
        """The dashboard's view of the services: subscriptions (read from their code), restarts, start time."""
        started = time.time()
        subscriptions = {name: tuple(self.system.load(name).subscriptions) for name in self.system.services}

        def infos() -> Mapping[str, ServiceInfo]:
            return {
                name: ServiceInfo(
                    name,
                    subscriptions=subscriptions[name],
                    restarts=sum(c.restarts for c in self.children if c.service == name),
                    started_at=started,
                )
                for name in self.system.services
            }

        return infos

    async def _pump(self, child: _Child, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self._say(child, line.decode("utf-8", "replace").rstrip())

    # -- children --------------------------------------------------------------------------------------------------

    def _listen(self, child: _Child) -> socket.socket:
        """The child's socket, bound here and handed down (so no other process can take the port between choosing
        it and the child's start). It is bound, not listening: the child's server listens once it serves, and until
        then callers are refused at once, as by a port nobody holds (listening here, their connections would wait
        through the child's start-up, and a client would not eject a killed instance whose restart had begun). A
        port of our choosing stays the same across restarts while it is free, and is chosen again if something
        else took it while the child was down."""
        if child.fixed or not child.port:
            sock = bind(self.host, child.port, listen=False)
        else:
            try:
                sock = bind(self.host, child.port, listen=False)
            except ConfigurationError as exc:
                sock = bind(self.host, 0, listen=False)
                log.warning(
                    "%s; it moves to port %d", exc.message, sock.getsockname()[1], extra={"instance": child.label}
                )
        child.port = int(sock.getsockname()[1])
        return sock

    async def _spawn(self, child: _Child, sock: socket.socket) -> asyncio.subprocess.Process:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.tracing.endpoint is not None:
            env["MESHKIT_TRACING__ENDPOINT"] = self.tracing.endpoint  # the children export where we do
            env["MESHKIT_TRACING__PROTOCOL"] = self.tracing.protocol  # OTLP/HTTP when that is our collector
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshkit.runner.child",
            str(self.system.folder),
            child.service,
            "--host",
            self.host,
            "--fd",
            str(sock.fileno()),
            "--replica",
            str(child.replica),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=(sock.fileno(),),
            env=env,
            cwd=self.system.folder,  # relative paths in a service mean the same in every instance
        )

    async def _keep(self, child: _Child) -> None:
        """Run ``child``, and run it again whenever it exits on its own (with a backoff)."""
        rng = random.Random()
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                sock = self._listen(child)
            except ConfigurationError as exc:  # a configured port someone else holds: tried again like an exit
                self._say(child, f"{exc.message} (hint: {exc.hint})")
                what = "not started"
            else:
                with sock:  # the child holds its own copy once started
                    process = child.process = await self._spawn(child, sock)
                assert process.stdout is not None
                await self._pump(child, process.stdout)
                what = f"exited with code {await process.wait()}"
            if self._halt.is_set():
                return
            child.failures = 1 if time.monotonic() - started >= _HEALTHY_RUN else child.failures + 1
            delay = self.backoff.delay(child.failures, 0.0, rng)
            self._say(child, f"{what}; restarting in {delay:.1f} s")
            log.warning("instance down", extra={"instance": child.label, "why": what, "restart_in": delay})
            with contextlib.suppress(TimeoutError):  # a stop ends the wait at once
                await asyncio.wait_for(self._halt.wait(), delay)
            child.restarts += 1

    async def _ready(self, child: _Child, deadline: float) -> None:
        aiohttp = require("aiohttp", "service")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                url = f"http://{self.host}:{child.port}/readyz"  # the port is known once the child is started
                if child.port:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(url) as response:
                            if response.status == 200:
                                return
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"{child.label} did not become ready at {url} within {self.ready_timeout:.0f} s",
                        hint="its lines above say why (an import error, a port in use, a failing readiness check)",
                    )
                await asyncio.sleep(0.1)

    async def _check_health(self) -> None:
        """Active health checks of every instance (``GET /readyz``): one that fails them leaves the rotation of
        every client (its registry status turns critical) until it passes again."""
        async with discovery.connect(self.system.registry_url("processes")) as registry:
            checker = HealthChecker(registry, list(self.system.services), HttpProbe("/readyz"), self.health)
            async with checker:
                await asyncio.Event().wait()  # until cancelled with the supervisor

    async def _all_ready(self, deadline: float) -> None:
        await asyncio.gather(*(self._ready(c, deadline) for c in self.children))

    async def run(self, stop: asyncio.Event, on_ready: Callable[[Ready], None] | None = None) -> None:
        """Start every child, report ready, run until ``stop`` is set, then stop every child gracefully."""
        async with system_tracing(self.system, self.host) as tracing:
            self.tracing = tracing
            await self._run(stop, on_ready)

    async def _run(self, stop: asyncio.Event, on_ready: Callable[[Ready], None] | None) -> None:
        tracing = self.tracing
        checks = asyncio.create_task(self._check_health(), name="meshkit-health-checks")
        try:
            for child in self.children:
                child.keeper = asyncio.create_task(self._keep(child), name=f"meshkit-keep-{child.label}")
            deadline = time.monotonic() + self.ready_timeout
            waiting = asyncio.create_task(self._all_ready(deadline))
            stopped = asyncio.create_task(stop.wait())
            either: set[asyncio.Task[Any]] = {waiting, stopped}
            done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if waiting in done:
                waiting.result()
                async with (
                    discovery.connect(self.system.registry_url("processes")) as registry,
                    messaging.connect(self.system.broker_url("processes")) as broker,
                    front_gateway(self.system, registry, tracing.tracer("gateway")) as gateway,
                    # the instances are other processes: their /_meshkit/resilience, found in the registry
                    resilience_source(gateway, registry=registry, names=list(self.system.services)) as resilience,
                    system_dashboard(
                        tracing,
                        self.host,
                        registry=registry,
                        broker=broker,
                        services=self._service_infos(),
                        resilience=resilience,
                        logs=self.logs,
                        audit_path=self.system.audit_file,
                        database_url=self.system.database_url(),
                    ) as dashboard,
                ):
                    if on_ready is not None:
                        rows = [(c.service, c.label, f"http://{self.host}:{c.port}") for c in self.children]
                        on_ready(rows + edge_rows(self.host, gateway, tracing, dashboard))
                    await stop.wait()
            else:
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Unavailable):
                    await waiting
            stopped.cancel()
        finally:
            checks.cancel()
            try:
                await checks
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("the health checks stopped with an error")
            await self._stop_all()

    async def _stop_all(self) -> None:
        self._halt.set()
        running = [c for c in self.children if c.process is not None and c.process.returncode is None]
        for child in running:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        keepers = [c.keeper for c in self.children if c.keeper is not None]
        done, pending = await asyncio.wait(keepers, timeout=self.grace) if keepers else (set(), set())
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                self._say(child, f"did not stop within {self.grace:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
        for task in pending:
            task.cancel()
        for task in [*done, *pending]:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await task
                except Exception:
                    log.exception("an instance keeper failed")
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                await child.process.wait()
