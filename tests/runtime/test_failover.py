"""Processes mode under load: an instance killed, one stopped gracefully, and the callers never notice.

Three instances of a small service run under the supervisor (``meshkit run``'s processes mode) with the SQLite
registry; the test is a caller with a :class:`~meshkit.client.ServiceClient` and 8 concurrent request loops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections import Counter
from collections.abc import Awaitable
from io import StringIO
from pathlib import Path

import aiohttp
import pytest

from meshkit import discovery
from meshkit._core.serving import bind
from meshkit.client import ServiceClient
from meshkit.discovery.health import CheckPolicy
from meshkit.errors import MeshkitError
from meshkit.resilience import Exponential
from meshkit.runner import Supervisor, load_system
from meshkit.testing import eventually

ECHO = """
import asyncio
import os

from meshkit import Service

service = Service("echo")


@service.http.get("/work")
async def work(ms: int = 20) -> dict[str, object]:
    await asyncio.sleep(ms / 1000)
    return {"instance": service.instance.id if service.instance else None, "pid": os.getpid()}


@service.readiness("flag")
async def flag() -> None:
    if os.path.exists(f"sick-{os.getpid()}"):
        raise RuntimeError("told to be sick")


@service.http.post("/work")
async def work_once(ms: int = 20) -> dict[str, object]:
    return await work(ms)
"""


@pytest.mark.anyio
async def test_killed_and_stopped_instances_cost_the_callers_nothing(tmp_path: Path) -> None:
    (tmp_path / "echo.py").write_text(ECHO)
    (tmp_path / "meshkit.toml").write_text('[services.echo]\napp = "echo:service"\nreplicas = 3\n')
    system = load_system(tmp_path)
    out = StringIO()
    supervisor = Supervisor(system, out=out, colour=False)
    stop = asyncio.Event()
    ready = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop, on_ready=lambda rows: ready.set()))
    failures: list[str] = []
    served: Counter[str] = Counter()
    loading = True
    try:
        await eventually(lambda: ready.is_set() or running.done(), "every instance ready", timeout=180)
        assert not running.done(), out.getvalue()
        async with (
            discovery.connect(system.registry_url("processes")) as registry,
            ServiceClient("echo", registry) as client,
        ):

            async def ids_in_rotation() -> set[str]:
                return {i.id for i in await client.instances()}

            async def ids_registered() -> set[str]:
                return {i.id for i in await registry.list("echo")}

            await eventually(lambda: _len(ids_in_rotation(), 3), "three instances in rotation")

            async def load(method: str = "GET") -> None:
                while loading:
                    try:
                        response = await client.request(method, "/work", params={"ms": "20"})
                    except MeshkitError as exc:
                        failures.append(repr(exc))
                        continue
                    if response.status != 200:
                        failures.append(f"{response.status} from {response.instance and response.instance.id}")
                    else:
                        served[response.json()["instance"]] += 1

            loaders = [asyncio.create_task(load()) for _ in range(8)]
            try:
                await eventually(lambda: len(served) == 3, "traffic reaches all three instances")

                # 1. SIGKILL: in-flight requests to it fail over; it leaves rotation before its lease expires
                victim = supervisor.children[0]
                assert victim.process is not None
                victim_id = f"echo-1-{victim.process.pid}"
                assert victim_id in await ids_registered()
                os.kill(victim.process.pid, signal.SIGKILL)
                await eventually(lambda: _lacks(ids_in_rotation(), victim_id), "the killed instance out of rotation")
                assert victim_id in await ids_registered(), "ejected passively, before the registry's TTL expired"
                await eventually(lambda: _lacks(ids_registered(), victim_id), "its lease expires", timeout=90)

                # 2. the supervisor restarts it, and the new instance re-enters rotation and gets traffic
                def restarted() -> str | None:
                    p = victim.process
                    return f"echo-1-{p.pid}" if p is not None and f"echo-1-{p.pid}" != victim_id else None

                await eventually(lambda: restarted() is not None, "the supervisor restarted it", timeout=90)
                fresh = restarted()
                assert fresh is not None
                await eventually(lambda: served[fresh] > 0, "the restarted instance serves traffic", timeout=90)

                # 3. SIGTERM: the instance leaves the registry, finishes what it holds, exits 0; nothing fails,
                # not even POSTs, which the client never retries: no request in flight is dropped
                loaders += [asyncio.create_task(load("POST")) for _ in range(4)]
                leaving = supervisor.children[1]
                assert leaving.process is not None
                leaving_id = f"echo-2-{leaving.process.pid}"
                leaving.process.send_signal(signal.SIGTERM)
                await eventually(lambda: _lacks(ids_registered(), leaving_id), "it deregistered at once")
                before = sum(served.values())
                await eventually(lambda: sum(served.values()) > before + 50, "more traffic after it left")
                await eventually(lambda: "exited with code 0;" in out.getvalue(), "it finished and exited with 0")
            finally:
                loading = False
                await asyncio.gather(*loaders)
        assert failures == [], failures[:10]
        assert "exited with code -9; restarting" in out.getvalue()
    finally:
        stop.set()
        await running
    assert all(c.process is None or c.process.returncode is not None for c in supervisor.children)


async def _len(ids: Awaitable[set[str]], n: int) -> bool:
    return len(await ids) == n


async def _lacks(ids: Awaitable[set[str]], member: str) -> bool:
    return member not in await ids


@pytest.mark.anyio
async def test_an_instance_failing_its_health_checks_leaves_rotation_and_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor's active checks (GET /readyz) mark an instance critical in the registry after repeated
    failures; clients drop it from rotation; once it passes again it is back."""
    (tmp_path / "echo.py").write_text(ECHO)
    (tmp_path / "meshkit.toml").write_text('[services.echo]\napp = "echo:service"\nreplicas = 2\n')
    system = load_system(tmp_path)
    supervisor = Supervisor(system, out=StringIO(), colour=False, health=CheckPolicy(interval=0.2, timeout=2.0))
    stop = asyncio.Event()
    ready = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop, on_ready=lambda rows: ready.set()))
    try:
        await eventually(lambda: ready.is_set() or running.done(), "every instance ready", timeout=180)
        assert not running.done()
        sick = supervisor.children[0]
        assert sick.process is not None
        sick_id = f"echo-1-{sick.process.pid}"
        async with (
            discovery.connect(system.registry_url("processes")) as registry,
            ServiceClient("echo", registry) as client,
        ):

            async def in_rotation() -> set[str]:
                return {i.id for i in await client.instances()}

            await eventually(lambda: _len(in_rotation(), 2), "both in rotation")
            flag = tmp_path / f"sick-{sick.process.pid}"  # the children run in the folder of meshkit.toml
            flag.write_text("")
            await eventually(lambda: _lacks(in_rotation(), sick_id), "the failing instance out of rotation")
            (status,) = [i.status for i in await registry.list("echo", healthy_only=False) if i.id == sick_id]
            assert status.value == "critical"
            flag.unlink()
            await eventually(lambda: _len(in_rotation(), 2), "back in rotation once it passes again")
    finally:
        stop.set()
        await running


async def _readyz(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.anyio
async def test_a_chosen_port_taken_while_its_instance_is_down_is_chosen_again(tmp_path: Path) -> None:
    """The supervisor binds each instance's socket and hands it down, so the port cannot be taken between its
    choice and the child's start; a port taken while the instance was down (it is free then) gives the restarted
    instance a new one, where it used to fail its start on the old port again and again."""
    (tmp_path / "echo.py").write_text(ECHO)
    (tmp_path / "meshkit.toml").write_text('[services.echo]\napp = "echo:service"\n')
    system = load_system(tmp_path)
    out = StringIO()
    supervisor = Supervisor(system, out=out, colour=False)
    supervisor.backoff = Exponential(5.0, cap=5.0, jitter="none")  # time to take the port while it is down
    stop = asyncio.Event()
    ready = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop, on_ready=lambda rows: ready.set()))
    squatter: socket.socket | None = None
    try:
        await eventually(lambda: ready.is_set() or running.done(), "the instance ready", timeout=180)
        assert not running.done(), out.getvalue()
        (child,) = supervisor.children
        old_port = child.port
        assert child.process is not None
        first = child.process
        first.kill()
        await eventually(lambda: "exited with code -9; restarting in 5.0 s" in out.getvalue(), "the exit seen")
        squatter = bind("127.0.0.1", old_port)
        await eventually(lambda: child.process is not first and child.port != old_port, "a restart elsewhere")
        await eventually(lambda: _readyz(f"http://127.0.0.1:{child.port}"), "the restarted instance ready", timeout=90)
        assert "cannot listen" not in out.getvalue()
    finally:
        if squatter is not None:
            squatter.close()
        stop.set()
        await running


@pytest.mark.anyio
async def test_a_configured_port_in_use_is_reported_and_tried_again_until_free(tmp_path: Path) -> None:
    squatter = bind("127.0.0.1", 0)
    port = squatter.getsockname()[1]
    (tmp_path / "echo.py").write_text(ECHO)
    (tmp_path / "meshkit.toml").write_text(f'[services.echo]\napp = "echo:service"\nport = {port}\n')
    system = load_system(tmp_path)
    out = StringIO()
    supervisor = Supervisor(system, out=out, colour=False)
    supervisor.backoff = Exponential(0.2, cap=0.2, jitter="none")
    stop = asyncio.Event()
    ready = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop, on_ready=lambda rows: ready.set()))
    try:
        await eventually(lambda: "not started; restarting in 0.2 s" in out.getvalue(), "the refusal reported")
        assert f"echo.1 | cannot listen on 127.0.0.1:{port}: Address already in use" in out.getvalue()
        assert not ready.is_set()
        squatter.close()
        await eventually(lambda: ready.is_set() or running.done(), "ready once the port is free", timeout=180)
        assert not running.done(), out.getvalue()
        assert supervisor.children[0].port == port
        assert await _readyz(f"http://127.0.0.1:{port}")
    finally:
        squatter.close()
        stop.set()
        await running


def test_the_socket_the_supervisor_hands_down_refuses_callers_until_the_child_serves(tmp_path: Path) -> None:
    """Held but not listening: a caller of a restarting instance is refused at once (and its client moves on),
    rather than waiting in the backlog through the child's start-up."""
    (tmp_path / "echo.py").write_text(ECHO)
    (tmp_path / "meshkit.toml").write_text('[services.echo]\napp = "echo:service"\n')
    supervisor = Supervisor(load_system(tmp_path), out=StringIO(), colour=False)
    child = supervisor.children[0]
    with supervisor._listen(child) as held:
        assert held.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", child.port), timeout=5).close()
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", child.port))  # the port is held all the same
        held.listen()  # what the child's server does once it serves
        socket.create_connection(("127.0.0.1", child.port), timeout=5).close()
