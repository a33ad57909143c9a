"""The service client: per-call overhead beside plain pooled HTTP clients, resolve cost, and time to eject.

    .venv/bin/python benchmarks/discovery.py [--calls 3000] [--concurrent-calls 10000] [--repeat 3] [--markdown]

1. Call overhead: ``--calls`` sequential GETs and ``--concurrent-calls`` GETs with 64 in flight, to one local
   server, through ``ServiceClient`` (memory registry, one instance, ``HttpTransport``, default options: p2c,
   retry, breakers, bulkhead, outlier detection, trace headers) and through a plain pooled aiohttp session (and a
   pooled httpx.AsyncClient when httpx is installed). The server is a minimal aiohttp app in another process, so
   what differs between rows is the client side. Best of ``--repeat`` runs, in requests per second.
2. Resolve cost: microseconds per ``await client.resolve()`` (the balancer's pick from the cached rotation), 10
   instances in rotation.
3. Time to eject a dead instance, per registry backend (memory, sqlite, and redis at 127.0.0.1:6379 when it
   answers): *passive*: 3 server processes under load (16 callers), one is killed (SIGKILL); the time from the kill
   to the client's last attempt on it (outlier ejection / open circuit), and how many calls failed (should be 0).
   *active*: an instance registered with a 1 s TTL stops heartbeating; the time from its last heartbeat until it
   leaves the client's rotation (lease expiry, seen through the registry watch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import logging
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve()
IN_FLIGHT = 64
TTL = 1.0


# -- the server: a separate process ---------------------------------------------------------------------------------


def serve() -> None:
    """A minimal aiohttp app on a free port: prints the port, answers every GET with ``ok``."""
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=b"ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None)


class Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE), "--serve"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"
        _wait_listening(self.port)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the benchmark server on port {port} did not start")
        time.sleep(0.01)


@contextlib.contextmanager
def servers(n: int) -> Iterator[list[Server]]:
    started = [Server() for _ in range(n)]
    try:
        yield started
    finally:
        for server in started:
            server.kill()


# -- 1. call overhead -----------------------------------------------------------------------------------------------


async def sequential(get: Callable[[], Awaitable[object]], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await get()
    return calls / (time.perf_counter() - start)


async def concurrent(get: Callable[[], Awaitable[object]], calls: int) -> float:
    share, extra = divmod(calls, IN_FLIGHT)

    async def worker(n: int) -> None:
        for _ in range(n):
            await get()

    start = time.perf_counter()
    await asyncio.gather(*(worker(share + (1 if w < extra else 0)) for w in range(IN_FLIGHT)))
    return calls / (time.perf_counter() - start)


async def best(
    get: Callable[[], Awaitable[object]], calls: int, concurrent_calls: int, repeat: int
) -> dict[str, float]:
    await sequential(get, min(200, calls))  # warm up: connections open, code paths hot
    seq = max([await sequential(get, calls) for _ in range(repeat)])
    conc = max([await concurrent(get, concurrent_calls) for _ in range(repeat)])
    return {"sequential": seq, "concurrent": conc}


async def overhead(url: str, port: int, calls: int, concurrent_calls: int, repeat: int) -> dict[str, dict[str, float]]:
    import aiohttp

    from meshkit.client import ServiceClient
    from meshkit.discovery import Instance, connect

    results: dict[str, dict[str, float]] = {}

    async with connect("memory://") as registry:
        await registry.register(Instance("bench", "b-1", "127.0.0.1", port), ttl=600)
        async with ServiceClient("bench", registry) as client:

            async def mk_get() -> object:
                response = await client.get("/ping")
                assert response.status == 200
                return response.content

            results["meshkit ServiceClient"] = await best(mk_get, calls, concurrent_calls, repeat)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

        async def aio_get() -> object:
            async with session.get(f"{url}/ping") as response:
                assert response.status == 200
                return await response.read()

        results["aiohttp ClientSession"] = await best(aio_get, calls, concurrent_calls, repeat)

    if importlib.util.find_spec("httpx") is not None:
        httpx = importlib.import_module("httpx")  # optional: not a dependency of meshkit

        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(limits=limits) as hx:

            async def hx_get() -> object:
                response = await hx.get(f"{url}/ping")
                assert response.status_code == 200
                return response.content

            results["httpx AsyncClient"] = await best(hx_get, calls, concurrent_calls, repeat)
    return results


# -- 2. resolve cost ------------------------------------------------------------------------------------------------


async def resolve_cost(picks: int) -> dict[str, float]:
    from meshkit.client import ClientOptions, ServiceClient
    from meshkit.discovery import Instance, connect

    costs: dict[str, float] = {}
    async with connect("memory://") as registry:
        for n in range(10):
            await registry.register(Instance("bench", f"b-{n}", "127.0.0.1", 9000 + n), ttl=600)
        for name in ("p2c", "round_robin", "random", "least_outstanding"):
            async with ServiceClient("bench", registry, options=ClientOptions(balancer=name)) as client:
                assert len(await client.instances()) == 10
                timings = []
                for _ in range(3):
                    start = time.perf_counter_ns()
                    for _ in range(picks):
                        await client.resolve()
                    timings.append((time.perf_counter_ns() - start) / picks / 1000)
                costs[name] = min(timings)
    return costs


# -- 3. time to eject -----------------------------------------------------------------------------------------------


class Stamping:
    """A transport wrapper that remembers when each instance was last sent an attempt."""

    def __init__(self) -> None:
        from meshkit.client import HttpTransport

        self.inner = HttpTransport()
        self.last: dict[str, float] = {}

    async def send(self, instance, request, timeout):  # type: ignore[no-untyped-def]
        self.last[instance.id] = time.perf_counter()
        return await self.inner.send(instance, request, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def passive(url: str) -> dict[str, float]:
    from meshkit.client import ServiceClient
    from meshkit.discovery import Instance, connect

    with servers(3) as procs:
        async with connect(url) as registry:
            for n, server in enumerate(procs):
                await registry.register(Instance("eject", f"e-{n}", "127.0.0.1", server.port), ttl=10)
            transport = Stamping()
            failed = ok = 0
            stop = asyncio.Event()
            try:
                async with ServiceClient("eject", registry, transport=transport) as client:

                    async def caller() -> None:
                        nonlocal failed, ok
                        while not stop.is_set():
                            try:
                                response = await client.get("/work")
                                ok += response.status == 200
                                failed += response.status != 200
                            except Exception:
                                failed += 1

                    callers = [asyncio.create_task(caller()) for _ in range(16)]
                    await asyncio.sleep(0.5)
                    killed = time.perf_counter()
                    procs[0].kill()
                    await asyncio.sleep(1.5)
                    stop.set()
                    await asyncio.gather(*callers)
                    still = "e-0" in {i.id for i in client.rotation}
            finally:
                await transport.aclose()
    last = transport.last.get("e-0", killed)
    return {
        "passive ms": max(last - killed, 0.0) * 1000,
        "failed calls": float(failed),
        "calls": float(ok + failed),
        "ejected": 0.0 if still else 1.0,
    }


async def active(url: str) -> dict[str, float]:
    from meshkit.client import ServiceClient
    from meshkit.discovery import Instance, connect

    async with connect(url) as registry:
        lease = await registry.register(Instance("ttl", "t-0", "127.0.0.1", 9), ttl=TTL)
        async with ServiceClient("ttl", registry) as client:
            assert [i.id for i in await client.instances()] == ["t-0"]
            await lease.stop()  # the process "dies": no more heartbeats
            await lease.heartbeat()  # its last one: the lease ends TTL seconds from now
            beat = time.perf_counter()
            while client.rotation:  # noqa: ASYNC110 - polling at 1 ms is the measurement's resolution
                await asyncio.sleep(0.001)
            gone = time.perf_counter()
        await registry.deregister("ttl", "t-0")
    return {"active ms": (gone - beat) * 1000}


async def redis_url() -> str | None:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return None
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=1)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError):
        return None
    finally:
        await client.aclose()
    return f"redis://127.0.0.1:6379/0?prefix=meshkit-bench-{uuid.uuid4().hex[:8]}:"


async def drop_redis_keys(url: str) -> None:
    import redis.asyncio as aioredis

    prefix = url.split("prefix=", 1)[1]
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def ejection(folder: str) -> dict[str, dict[str, float]]:
    backends = {"memory": "memory://", "sqlite": f"sqlite:///{folder}/registry.db"}
    redis = await redis_url()
    if redis is not None:
        backends["redis"] = redis
    results: dict[str, dict[str, float]] = {}
    for name, url in backends.items():
        try:
            results[name] = {**await passive(url), **await active(url)}
        finally:
            if name == "redis":
                await drop_redis_keys(url)
    return results


# -- the report -----------------------------------------------------------------------------------------------------


def report(
    calls: dict[str, dict[str, float]], picks: dict[str, float], eject: dict[str, dict[str, float]], markdown: bool
) -> list[str]:
    lines: list[str] = []
    base = calls["aiohttp ClientSession"]
    mine = calls["meshkit ServiceClient"]
    if markdown:
        lines += ["| client | sequential req/s | 64 in flight req/s |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['sequential']:,.0f} | {v['concurrent']:,.0f} |" for k, v in calls.items()]
    else:
        lines.append(f"{'client':24} {'sequential req/s':>17} {'64 in flight req/s':>19}")
        lines += [f"{k:24} {v['sequential']:17,.0f} {v['concurrent']:19,.0f}" for k, v in calls.items()]
    if "httpx AsyncClient" not in calls:
        lines.append("(httpx is not installed in .venv: its row is skipped)")
    seq_ratio = mine["sequential"] / base["sequential"]
    conc_ratio = mine["concurrent"] / base["concurrent"]
    lines.append(f"meshkit / aiohttp: sequential {seq_ratio:.2f}x, 64 in flight {conc_ratio:.2f}x")
    for kind in ("sequential", "concurrent"):
        added = 1e6 / mine[kind] - 1e6 / base[kind]
        lines.append(f"  meshkit adds {added:.1f} us per call ({kind}, wall time per call)")
    lines.append("")
    if markdown:
        lines += ["| balancer | µs per resolve (10 instances) |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in picks.items()]
    else:
        lines.append("resolve from cache, 10 instances (us per pick):")
        lines += [f"  {k:20} {v:6.2f}" for k, v in picks.items()]
    lines.append("")
    if markdown:
        lines += [
            f"| registry | passive: kill -> last attempt ms | failed calls / calls | active: TTL {TTL:g}s -> out ms |",
            "|---|---:|---:|---:|",
        ]
        for k, v in eject.items():
            lines.append(
                f"| {k} | {v['passive ms']:.0f} | {v['failed calls']:.0f} / {v['calls']:.0f} | {v['active ms']:.0f} |"
            )
    else:
        lines.append(f"time to eject a dead instance (passive: kill -9 under load; active: TTL {TTL:g}s lease expiry):")
        for k, v in eject.items():
            lines.append(
                f"  {k:7} passive {v['passive ms']:6.0f} ms ({v['failed calls']:.0f} failed of {v['calls']:.0f} "
                f"calls{'' if v['ejected'] else ', NOT ejected'})   active {v['active ms']:6.0f} ms"
            )
    if "redis" not in eject:
        lines.append("(no Redis at 127.0.0.1:6379: its row is skipped)")
    return lines


async def main_async(args: argparse.Namespace) -> list[str]:
    with servers(1) as (server,):
        calls = await overhead(server.url, server.port, args.calls, args.concurrent_calls, args.repeat)
    picks = await resolve_cost(args.picks)
    with tempfile.TemporaryDirectory() as folder:
        eject = await ejection(folder)
    return report(calls, picks, eject, args.markdown)


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3000, help="sequential GETs per run")
    parser.add_argument("--concurrent-calls", type=int, default=10_000, help="GETs per run with 64 in flight")
    parser.add_argument("--picks", type=int, default=100_000, help="resolves per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables for benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.getLogger("meshkit").setLevel(logging.ERROR)  # the ejections are expected: do not print them
    print(
        f"python {platform.python_version()} on {platform.machine()}, aiohttp {version('aiohttp')}; "
        f"{args.calls} sequential / {args.concurrent_calls} concurrent calls, best of {args.repeat}",
        file=sys.stderr,
    )
    for line in asyncio.run(main_async(args)):
        print(line)


if __name__ == "__main__":
    main()
