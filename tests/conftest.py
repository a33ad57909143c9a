from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshkit import Database, connect_database
from tests.databases import fresh_database_url


@pytest.fixture
def anyio_backend() -> str:
    """meshkit is built on asyncio; anyio's pytest plugin runs our async tests on it."""
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each kind the data patterns run on (SQLite, and PostgreSQL on the local server)."""
    async with fresh_database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """A connection to each kind of :func:`database_url`, closed after the test."""
    db = await connect_database(database_url)
    yield db
    await db.aclose()
