"""One instance of one service, as processes mode starts it: ``python -m meshkit.runner.child FOLDER SERVICE
--fd N --replica I`` (``--fd``: a socket the supervisor bound and handed down, listened on once serving;
``--port N`` binds one itself).

It serves the service on that socket, registers, and stops gracefully on SIGTERM or SIGINT. It also stops if the
supervisor that started it goes away (its parent process changes), so a killed ``meshkit run`` leaves no orphans.
Logs go to stderr as ``LEVEL logger: message``; the supervisor prefixes each line with the instance's name.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from meshkit import discovery, messaging
from meshkit.client import HttpTransport
from meshkit.errors import MeshkitError
from meshkit.runner.observe import system_tracing
from meshkit.runner.serve import bind, bring_down, bring_up
from meshkit.runner.system import load_system
from meshkit.runtime import RunContext
from meshkit.tracing.spans import console_logging

log = logging.getLogger("meshkit.runner")


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("the supervisor is gone; stopping")
            stop.set()
            return
        await asyncio.sleep(0.5)


async def run_child(folder: str, name: str, host: str, port: int, replica: int, fd: int | None = None) -> None:
    system = load_system(folder)
    service = system.load(name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    watcher = asyncio.create_task(_watch_parent(parent, stop))
    transport = HttpTransport()
    try:
        async with (
            messaging.connect(system.broker_url("processes")) as broker,
            discovery.connect(system.registry_url("processes")) as registry,
            system_tracing(system, host, collector=False) as tracing,
        ):
            ctx = RunContext(
                broker=broker,
                registry=registry,
                transport=transport,
                data_dir=system.data_dir(name),
                instance_id=f"{replica}-{os.getpid()}",
                metadata={"mode": "processes", "replica": str(replica), "pid": str(os.getpid())},
                tracer=tracing.tracer(name),
                database_url=system.database_url(),
            )
            sock = bind(host, port) if fd is None else _inherited(fd)
            served = await bring_up(service, ctx, host, sock)
            log.info("serving %s on %s", name, served.url)
            try:
                await stop.wait()
                log.info("stopping: leaving the registry, finishing requests and handlers")
            finally:
                await bring_down([served])
    finally:
        watcher.cancel()
        await transport.aclose()


def _inherited(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshkit.runner.child")
    parser.add_argument("folder")
    parser.add_argument("service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fd", type=int, default=None, help="a bound socket to serve on, instead of --port")
    parser.add_argument("--replica", type=int, default=1)
    args = parser.parse_args(argv)
    console_logging(os.environ.get("MESHKIT_LOG__LEVEL", "INFO"))
    try:
        asyncio.run(run_child(args.folder, args.service, args.host, args.port, args.replica, args.fd))
    except MeshkitError as exc:
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        log.error("%s%s", exc.message, hint)  # noqa: TRY400 - a configuration error needs no traceback
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
