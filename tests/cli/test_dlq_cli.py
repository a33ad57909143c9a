from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from meshkit.messaging import Message, SubscriptionOptions, connect
from meshkit.messaging.testing import eventually
from meshkit.resilience import Constant, Retry


def meshkit(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "NO_COLOR": "1", "COLUMNS": "200"},
    )


async def make_dead_letters(url: str) -> None:
    async def refuse(message: Message) -> None:
        raise ValueError(f"cannot ship order {message.data['order']}")

    options = SubscriptionOptions(retry=Retry(attempts=2, backoff=Constant(0.01)), poll_interval=0.05)
    async with connect(url) as broker:
        await broker.subscribe("shipping.schedule", refuse, group="shipping", options=options)
        await broker.publish_batch("shipping.schedule", [{"order": n} for n in (1, 2)])
        dlq = broker.dead_letters("shipping.schedule")
        found: list[Message] = []

        async def both() -> None:
            while len(found) < 2:
                found[:] = await dlq.list()
                await asyncio.sleep(0.01)

        await asyncio.wait_for(both(), 60)


def test_dlq_ls_replay_and_discard(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    asyncio.run(make_dead_letters(url))

    out = meshkit(["dlq", "ls", "shipping.schedule", "--url", url, "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["data"]["order"] for r in rows) == [1, 2]
    assert {r["reason"] for r in rows} == {"ValueError: cannot ship order 1", "ValueError: cannot ship order 2"}
    assert {(r["group"], r["deliveries"]) for r in rows} == {("shipping", 2)}

    table = meshkit(["dlq", "ls", "shipping.schedule", "--url", url], tmp_path)
    assert "cannot ship order 1" in table.stdout

    first = next(r["id"] for r in rows if r["data"]["order"] == 1)
    out = meshkit(["dlq", "replay", "shipping.schedule", "--url", url, "--id", first, "--yes"], tmp_path)
    assert (out.returncode, out.stdout.strip()) == (0, "replayed 1 dead letter of shipping.schedule")
    out = meshkit(["dlq", "discard", "shipping.schedule", "--url", url, "--yes"], tmp_path)
    assert out.stdout.strip() == "discarded 1 dead letter of shipping.schedule"

    async def replayed_message_is_back() -> list[int]:
        got: list[int] = []

        async def ok(message: Message) -> None:
            got.append(message.data["order"])

        async with connect(url) as broker:
            options = SubscriptionOptions(poll_interval=0.05)
            await broker.subscribe("shipping.schedule", ok, group="audit", options=options)
            await eventually(lambda: len(got) >= 3, "the log: two originals and one replay")
        return got

    assert sorted(asyncio.run(replayed_message_is_back())) == [1, 1, 2]


def test_dlq_refuses_an_in_process_broker(tmp_path: Path) -> None:
    out = meshkit(["dlq", "ls", "orders", "--url", "memory://"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines()[0] == "error: a memory:// broker lives inside its process; the CLI cannot reach it"
    assert out.stderr.splitlines()[1].startswith("hint: point --url")
