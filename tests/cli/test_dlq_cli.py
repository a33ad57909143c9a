from __future__ import annotations

import asyncio
import json
import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshkit.dashboard import AuditEntry, DashboardApp
from meshkit.messaging import Message, SubscriptionOptions, connect
from meshkit.messaging.testing import eventually
from meshkit.resilience import Constant, Retry
from meshkit.tracing.collector import TraceStore
from tests.dashboard.asgi import get_json


def meshkit(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "NO_COLOR": "1", "COLUMNS": "200", **env},
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


def test_replay_and_discard_from_the_cli_are_in_the_audit_the_dashboard_shows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    asyncio.run(make_dead_letters(url))
    rows = [
        json.loads(line)
        for line in meshkit(["dlq", "ls", "shipping.schedule", "--url", url, "--json"], tmp_path).stdout.splitlines()
    ]
    first = next(r["id"] for r in rows if r["data"]["order"] == 1)
    path = tmp_path / ".meshkit" / "audit.jsonl"  # the runner's file in the system's folder (the CLI's cwd)

    async def served_entries(dashboard: DashboardApp) -> list[dict[str, Any]]:
        entries = (await get_json(dashboard, "/api/audit"))["entries"]
        assert isinstance(entries, list)
        return entries

    async def check() -> None:
        store = await TraceStore.open(":memory:", retention_seconds=None, max_spans=None)
        try:
            dashboard = DashboardApp(store, audit_path=path)  # running before the CLI acts
            assert await served_entries(dashboard) == []
            before = time.time()
            out = meshkit(["dlq", "replay", "shipping.schedule", "--url", url, "--id", first, "--yes"], tmp_path)
            assert out.returncode == 0, out.stderr
            out = meshkit(["dlq", "discard", "shipping.schedule", "--url", url, "--yes"], tmp_path)
            assert out.returncode == 0, out.stderr
            newest, oldest = await served_entries(dashboard)  # read again: the file changed
            who = f"cli:{pwd.getpwuid(os.getuid()).pw_name}@{socket.gethostname()}"  # the CLI runs without $USER
            assert {k: oldest[k] for k in ("action", "topic", "ids", "requested", "count", "error", "client")} == {
                "action": "replay",
                "topic": "shipping.schedule",
                "ids": [first],
                "requested": 1,
                "count": 1,
                "error": None,
                "client": who,
            }
            assert (newest["action"], newest["ids"], newest["count"], newest["client"]) == ("discard", [], 1, who)
            assert before - 1 <= oldest["time"] <= newest["time"] <= time.time() + 1
            again = DashboardApp(store, audit_path=path)  # and a dashboard started later reads them back
            assert [e.to_json() for e in reversed(again.audit)] == [newest, oldest]
            await dashboard.aclose()
            await again.aclose()
        finally:
            await store.aclose()

    asyncio.run(check())

    elsewhere = tmp_path / "elsewhere.jsonl"
    out = meshkit(["dlq", "discard", "shipping.schedule", "--url", url, "--yes", "--audit", str(elsewhere)], tmp_path)
    assert out.returncode == 0, out.stderr
    (entry,) = [AuditEntry.from_json(json.loads(raw)) for raw in elsewhere.read_text().splitlines()]
    assert (entry.action, entry.count, entry.ids) == ("discard", 0, ())
    assert len(path.read_text().splitlines()) == 2, "--audit names the file instead of the default one"


def test_a_replay_that_fails_is_audited_with_its_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    (tmp_path / "broker.db").mkdir()  # not a database: connecting fails
    out = meshkit(["dlq", "replay", "shipping.schedule", "--url", url, "--yes"], tmp_path)
    assert out.returncode != 0
    (line,) = (tmp_path / ".meshkit" / "audit.jsonl").read_text().splitlines()
    entry = AuditEntry.from_json(json.loads(line))
    assert (entry.action, entry.count, entry.ids) == ("replay", 0, ())
    assert entry.error is not None and entry.client is not None and entry.client.startswith("cli:")

    out = meshkit(["dlq", "replay", "shipping.schedule", "--url", "memory://", "--yes"], tmp_path)
    assert out.returncode == 2, "a broker the CLI cannot reach is refused before anything is tried"
    assert len((tmp_path / ".meshkit" / "audit.jsonl").read_text().splitlines()) == 1, "and not audited"


def test_the_default_audit_file_is_beside_the_settings_the_cli_reads(tmp_path: Path) -> None:
    system, elsewhere = tmp_path / "shop", tmp_path / "work"
    system.mkdir()
    elsewhere.mkdir()
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    (system / "meshkit.toml").write_text(f'[broker]\nurl = "{url}"\n')
    asyncio.run(make_dead_letters(url))
    out = meshkit(
        ["dlq", "discard", "shipping.schedule", "--yes"], elsewhere, MESHKIT_CONFIG=str(system / "meshkit.toml")
    )
    assert out.returncode == 0, out.stderr
    (line,) = (system / ".meshkit" / "audit.jsonl").read_text().splitlines()
    assert AuditEntry.from_json(json.loads(line)).count == 2
    assert not (elsewhere / ".meshkit").exists(), "not where the command happened to run"
