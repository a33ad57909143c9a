"""The dead-letter audit kept in a file (``audit_path``): it outlives the dashboard, a damaged line costs only that
line, and the file is plain JSON lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshkit.dashboard import AuditEntry, DashboardApp, ServiceInfo
from meshkit.dashboard import audit as audit_module
from meshkit.errors import ConfigurationError
from meshkit.messaging import Broker, connect
from meshkit.testing import FakeClock
from meshkit.tracing.collector import TraceStore

from .asgi import get_json, post_json

WALL = 1_800_000_000.0
INFOS = {"payments": ServiceInfo("payments", subscriptions=[("payment.done", "payments")])}
KEYS = {"time", "action", "topic", "ids", "requested", "count", "error", "client"}


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with connect("memory://") as b:
        yield b


async def dead_letters(broker: Broker, n: int) -> list[str]:
    for i in range(n):
        await broker.publish("payment.done.dlq", {"n": i}, headers={"dlqid": f"orig-{i}", "dlqgroup": "payments"})
    return [m.id for m in await broker.dead_letters("payment.done").list()]


def dashboard(store: TraceStore, broker: Broker, path: Path, clock: FakeClock, **more: Any) -> DashboardApp:
    return DashboardApp(store, broker=broker, services=lambda: INFOS, clock=clock, audit_path=path, **more)


async def settle(app: DashboardApp, action: str, ids: list[str]) -> None:
    reply = await post_json(app, f"/api/messaging/payment.done/dlq/{action}", {"ids": ids, "confirm": True})
    assert reply.status == 200, reply.body


def entry(n: int, action: str = "replay") -> AuditEntry:
    return AuditEntry(WALL + n, action, "payment.done", (f"id-{n}",), 1, client="127.0.0.1")


def line(e: AuditEntry) -> str:
    return json.dumps(e.to_json()) + "\n"


@pytest.mark.anyio
async def test_entries_survive_a_new_dashboard_on_the_same_file(
    store: TraceStore, broker: Broker, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "audit.jsonl"  # its folder is made on the first write
    clock = FakeClock(wall_start=WALL)
    ids = await dead_letters(broker, 3)
    first = dashboard(store, broker, path, clock)
    await settle(first, "replay", ids[:1])
    clock.advance(5)
    await settle(first, "discard", [ids[1], "no-such-id"])
    served = (await get_json(first, "/api/audit"))["entries"]
    await first.aclose()

    again = dashboard(store, broker, path, FakeClock(wall_start=WALL + 60))
    assert again.audit == first.audit
    assert [(e.action, e.ids, e.count, e.time, e.client) for e in again.audit] == [
        ("replay", (ids[0],), 1, WALL, "127.0.0.1"),
        ("discard", (ids[1], "no-such-id"), 1, WALL + 5, "127.0.0.1"),
    ]
    assert (await get_json(again, "/api/audit"))["entries"] == served

    await settle(again, "discard", ids[2:])  # appended after what was read back
    third = dashboard(store, broker, path, clock)
    assert [e.action for e in third.audit] == ["replay", "discard", "discard"]
    assert third.audit[-1].time == WALL + 60
    for app in (again, third):
        await app.aclose()


@pytest.mark.anyio
async def test_the_file_is_json_lines_a_person_can_read(store: TraceStore, broker: Broker, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ids = await dead_letters(broker, 2)
    app = dashboard(store, broker, path, FakeClock(wall_start=WALL))
    await settle(app, "replay", ids[:1])
    await settle(app, "discard", ids[1:])
    await app.aclose()

    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 2, "one line per action"
    documents = [json.loads(raw) for raw in lines]
    assert all(set(d) == KEYS for d in documents)
    assert documents[0] == {
        "time": WALL,
        "action": "replay",
        "topic": "payment.done",
        "ids": [ids[0]],
        "requested": 1,
        "count": 1,
        "error": None,
        "client": "127.0.0.1",
    }
    assert documents[1]["action"] == "discard"


@pytest.mark.anyio
async def test_corrupt_lines_are_skipped_with_a_warning(
    store: TraceStore, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    good = [entry(n) for n in range(3)]
    path.write_bytes(
        (
            line(good[0])
            + "not json at all\n"
            + "\n"  # blank lines are not entries, nor corrupt
            + line(good[1])
            + '{"time": "yesterday", "action": "replay"}\n'  # JSON, but not an entry
            + "[1, 2]\n"
            + line(good[2])
        ).encode()
        + b"\xff\xfe\n"  # not UTF-8
        + line(entry(3)).encode()[:25]  # the process died while writing this one
    )
    with caplog.at_level(logging.WARNING, logger="meshkit.dashboard.audit"):
        app = dashboard(store, broker, path, FakeClock(wall_start=WALL + 10))
    assert app.audit == good
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert all(getattr(r, "path", None) == str(path) for r in warnings)
    data = path.read_bytes()
    starts = [data.index(marker) for marker in (b"not json", b'{"time": "yes', b"[1, 2]", b"\xff\xfe")]
    assert sorted(getattr(r, "offset", -1) for r in warnings) == [*starts, data.rindex(b'{"time"')]

    # the next entry starts on a line of its own: only the cut-short line is lost
    ids = await dead_letters(broker, 1)
    await settle(app, "replay", ids)
    await app.aclose()
    again = dashboard(store, broker, path, FakeClock(wall_start=WALL))
    assert [e.time for e in again.audit] == [WALL, WALL + 1, WALL + 2, WALL + 10]
    await again.aclose()


@pytest.mark.anyio
async def test_only_the_last_audit_size_entries_are_read_back(
    store: TraceStore, broker: Broker, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    # more than one 64 KiB block read from the end, with a damaged line among the newest
    lines = [line(entry(n)) for n in range(3000)]
    lines.insert(2990, "{broken\n")
    path.write_text("".join(lines), encoding="utf-8")
    assert path.stat().st_size > 3 * audit_module._AUDIT_BLOCK
    app = dashboard(store, broker, path, FakeClock(wall_start=WALL), audit_size=1000)
    assert [e.time - WALL for e in app.audit] == list(range(2000, 3000))
    await app.aclose()


@pytest.mark.anyio
async def test_a_missing_file_is_an_empty_audit_and_an_unreadable_one_an_error(
    store: TraceStore, broker: Broker, tmp_path: Path
) -> None:
    app = dashboard(store, broker, tmp_path / "none-yet.jsonl", FakeClock())
    assert app.audit == []
    await app.aclose()
    with pytest.raises(ConfigurationError, match="audit file"):
        dashboard(store, broker, tmp_path, FakeClock())  # a folder


@pytest.mark.anyio
async def test_a_file_that_cannot_be_written_is_logged_and_the_action_still_answers(
    store: TraceStore, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    app = dashboard(store, broker, path, FakeClock(wall_start=WALL))
    path.mkdir()  # after it was read: now every append fails
    ids = await dead_letters(broker, 1)
    with caplog.at_level(logging.ERROR, logger="meshkit.dashboard._app"):
        await settle(app, "replay", ids)
    assert [e.ids for e in app.audit] == [tuple(ids)], "kept in memory"
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None
    assert getattr(record, "path", None) == str(path)
    await app.aclose()


def test_entries_round_trip_and_wrong_shapes_are_refused() -> None:
    failed = AuditEntry(WALL, "discard", "t", ("a", "b"), 0, "Unavailable: broker down", None)
    assert AuditEntry.from_json(json.loads(json.dumps(failed.to_json()))) == failed
    assert AuditEntry.from_json({**entry(1).to_json(), "time": int(WALL)}).time == WALL
    older = {k: v for k, v in entry(1).to_json().items() if k != "client"}
    assert AuditEntry.from_json(older).client is None
    wrongs: list[Any] = [
        [],
        {**older, "time": True},
        {**older, "time": None},
        {**older, "action": 1},
        {**older, "ids": "a"},
        {**older, "ids": [1]},
        {**older, "count": 1.5},
        {**older, "error": 3},
        {**older, "client": ["x"]},
    ]
    for wrong in wrongs:
        with pytest.raises(TypeError):
            AuditEntry.from_json(wrong)


@given(
    st.lists(st.binary().map(lambda b: b.replace(b"\n", b"")), max_size=20),
    st.booleans(),
    st.integers(min_value=1, max_value=9),
)
def test_lines_are_read_backwards_across_blocks(lines: list[bytes], newline_at_end: bool, block: int) -> None:
    data = b"\n".join(lines) + (b"\n" if newline_at_end else b"")
    expected = []
    start = 0
    for part in data.split(b"\n"):
        expected.append((start, part))
        start += len(part) + 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(audit_module, "_AUDIT_BLOCK", block)
        got = list(audit_module._lines_backwards(io.BytesIO(data)))
    assert got == expected[::-1]


@pytest.mark.anyio
async def test_what_another_process_appends_shows_without_losing_what_the_file_refused(
    store: TraceStore, broker: Broker, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    app = dashboard(store, broker, path, FakeClock(wall_start=WALL + 10))
    ids = await dead_letters(broker, 2)
    await settle(app, "replay", ids[:1])
    audit_module.append_audit(path, entry(20, "discard"))  # as meshkit dlq discard does, from its process
    served = (await get_json(app, "/api/audit"))["entries"]
    assert [(e["action"], e["time"]) for e in served] == [("discard", WALL + 20), ("replay", WALL + 10)]
    assert (await get_json(app, "/api/audit"))["entries"] == served, "unchanged file: the same entries"

    path.rename(tmp_path / "moved.jsonl")
    path.mkdir()  # now every append fails, and the file cannot be read again
    await settle(app, "discard", ids[1:])
    served = (await get_json(app, "/api/audit"))["entries"]
    assert [(e["action"], e["time"]) for e in served] == [
        ("discard", WALL + 10),  # kept in memory
        ("discard", WALL + 20),
        ("replay", WALL + 10),
    ]
    path.rmdir()
    (tmp_path / "moved.jsonl").rename(path)
    audit_module.append_audit(path, entry(30))  # readable again: the refused entry stays, among the file's
    served = (await get_json(app, "/api/audit"))["entries"]
    assert [(e["action"], e["time"]) for e in served] == [
        ("replay", WALL + 30),
        ("discard", WALL + 20),
        ("discard", WALL + 10),
        ("replay", WALL + 10),
    ]
    assert [e.time for e in app.audit] == [WALL + 10, WALL + 10, WALL + 20, WALL + 30]
    await app.aclose()


@pytest.mark.anyio
async def test_an_entry_kept_while_the_file_is_being_read_again_is_not_lost(
    store: TraceStore, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    app = dashboard(store, broker, path, FakeClock(wall_start=WALL + 10))
    audit_module.append_audit(path, entry(1))  # another process: the next /api/audit reads the file again
    reading, go = threading.Event(), threading.Event()
    read = app._read_audit_file

    def slow_read(p: Path) -> Any:  # the re-read, held halfway
        reading.set()
        assert go.wait(30)
        return read(p)

    def refuse(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(app, "_read_audit_file", slow_read)
    monkeypatch.setattr("meshkit.dashboard._app.append_audit", refuse)
    again = asyncio.create_task(app._reread_audit(path))
    assert await asyncio.to_thread(reading.wait, 30)
    kept = asyncio.create_task(app._record(entry(2, "discard")))  # the write will fail: the entry lives in memory
    await asyncio.sleep(0)  # (it runs up to where it waits)
    go.set()
    await asyncio.gather(again, kept)
    assert [e.time for e in app.audit] == [WALL + 1, WALL + 2]
    served = (await get_json(app, "/api/audit"))["entries"]
    assert [e["time"] for e in served] == [WALL + 2, WALL + 1], "and it stays once the file is read again"
    await app.aclose()
