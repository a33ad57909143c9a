"""The database of the data patterns (meshkit._core.database) against a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshkit._core.database import connect_database, to_numbered
from meshkit.errors import ConfigurationError, ConflictError, DatabaseError, Unavailable
from tests.servers import free_port

pytestmark = pytest.mark.anyio

SCHEMA = {
    "sqlite": "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, n BIGINT, x DOUBLE PRECISION, note TEXT);",
    "postgresql": "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, n BIGINT, x DOUBLE PRECISION, note TEXT);",
}


async def test_a_transaction_commits_together_or_not_at_all(database_url: str) -> None:
    db = await connect_database(database_url)
    try:
        await db.migrate(SCHEMA)
        await db.migrate(SCHEMA)  # safe to repeat
        async with db.transaction() as tx:
            assert await tx.execute("INSERT INTO items (id, n, x, note) VALUES (?, ?, ?, ?)", "a", 1, 0.5, "?") == 1
            await tx.executemany("INSERT INTO items (id, n, x, note) VALUES (?, ?, ?, 'what?')", [("b", 2, 1.5)])

        async def fail_midway() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO items (id, n, x, note) VALUES (?, ?, ?, ?)", "c", 3, 2.5, None)
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await fail_midway()
        rows = await db.fetch("SELECT id, n, x, note FROM items ORDER BY id")
        assert rows == [("a", 1, 0.5, "?"), ("b", 2, 1.5, "what?")]
        assert await db.fetchone("SELECT n FROM items WHERE id = ?", "b") == (2,)
        assert await db.fetchone("SELECT n FROM items WHERE id = ?", "zz") is None
        assert await db.execute("UPDATE items SET n = n + 1") == 2
    finally:
        await db.aclose()
        await db.aclose()  # twice is fine


async def test_a_taken_key_is_a_conflict_and_bad_sql_a_database_error(database_url: str) -> None:
    db = await connect_database(database_url)
    try:
        await db.migrate(SCHEMA)
        await db.execute("INSERT INTO items (id, n) VALUES (?, ?)", "a", 1)
        with pytest.raises(ConflictError) as conflict:
            await db.execute("INSERT INTO items (id, n) VALUES (?, ?)", "a", 2)
        assert conflict.value.__cause__ is not None
        with pytest.raises(DatabaseError) as bad:
            await db.fetch("SELECT nope FROM items")
        assert not isinstance(bad.value, ConflictError)
        # the failed statements left no transaction open
        assert await db.fetch("SELECT n FROM items") == [(1,)]
    finally:
        await db.aclose()


async def test_concurrent_transactions_do_not_lose_updates(database_url: str) -> None:
    db = await connect_database(database_url)
    try:
        await db.migrate(SCHEMA)
        await db.execute("INSERT INTO items (id, n) VALUES ('counter', 0)")

        async def bump() -> None:
            for _ in range(10):
                async with db.transaction() as tx:
                    await tx.execute("UPDATE items SET n = n + 1 WHERE id = 'counter'")

        await asyncio.gather(*(bump() for _ in range(5)))
        assert await db.fetch("SELECT n FROM items WHERE id = 'counter'") == [(50,)]
    finally:
        await db.aclose()


async def test_a_cancelled_transaction_rolls_back_and_the_next_one_runs(tmp_path: Path) -> None:
    db = await connect_database(f"sqlite:///{tmp_path / 'd.db'}")
    try:
        await db.migrate(SCHEMA)
        entered = asyncio.Event()

        async def hang() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO items (id, n) VALUES ('lost', 1)")
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(hang())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await db.execute("INSERT INTO items (id, n) VALUES ('kept', 2)")
        assert await db.fetch("SELECT id FROM items") == [("kept",)]
    finally:
        await db.aclose()


async def test_bad_urls_and_closed_databases_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown database URL scheme"):
        await connect_database("mysql://localhost/x")
    with pytest.raises(ConfigurationError, match="does not exist"):
        await connect_database(f"sqlite:///{tmp_path / 'missing' / 'd.db'}")
    with pytest.raises(ConfigurationError, match="unknown PostgreSQL database option 'pool'"):
        await connect_database("postgresql://postgres@127.0.0.1/test?pool=3")
    with pytest.raises(Unavailable, match="cannot reach the database"):
        await connect_database(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/test?connect_timeout=5")
    db = await connect_database(f"sqlite:///{tmp_path / 'd.db'}")
    await db.aclose()
    with pytest.raises(ConfigurationError, match="closed"):
        await db.fetch("SELECT 1")


async def test_an_unreachable_server_hides_its_password() -> None:
    with pytest.raises(Unavailable) as info:
        await connect_database(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/test")
    assert "secret" not in str(info.value)


def test_placeholders_are_numbered_outside_quotes() -> None:
    assert to_numbered("SELECT ? , '?', \"a?\", ?") == "SELECT $1 , '?', \"a?\", $2"
    assert to_numbered("SELECT 1") == "SELECT 1"


async def test_errors_of_the_block_itself_go_through_unmapped(database_url: str) -> None:
    db = await connect_database(database_url)
    try:

        async def failing_call_inside() -> None:
            async with db.transaction() as tx:
                await tx.fetch("SELECT 1")
                raise ConnectionRefusedError("the payments service refused")  # an OSError, not the database's

        with pytest.raises(ConnectionRefusedError, match="payments"):
            await failing_call_inside()
        assert await db.fetch("SELECT 1") == [(1,)]  # and the connection went back in a usable state
    finally:
        await db.aclose()


async def test_a_second_transaction_in_the_same_task_is_refused_not_a_deadlock(database_url: str) -> None:
    db = await connect_database(
        f"{database_url}?pool_size=1" if database_url.startswith("postgresql") else database_url
    )
    try:
        async with db.transaction() as tx:
            await tx.fetch("SELECT 1")
            with pytest.raises(ConfigurationError, match="already open in this task") as info:
                await db.fetch("SELECT 1")
            assert info.value.hint is not None and "tx." in info.value.hint

            async def elsewhere() -> list[tuple[object, ...]]:  # another task waits its turn instead
                return await db.fetch("SELECT 2")

            other = asyncio.create_task(elsewhere())
        assert await other == [(2,)]
    finally:
        await db.aclose()


async def test_processes_starting_together_on_a_new_file_all_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    databases = [await connect_database(url) for _ in range(8)]
    try:
        schema = "".join(
            f"CREATE TABLE IF NOT EXISTS t{n} (id TEXT PRIMARY KEY, note TEXT DEFAULT ';');" for n in range(30)
        )
        await asyncio.gather(*(db.migrate({"sqlite": schema}) for db in databases))
        rows = await databases[0].fetch("SELECT count(*) FROM sqlite_master WHERE type = 'table'")
        assert rows == [(30,)]
    finally:
        for db in databases:
            await db.aclose()
