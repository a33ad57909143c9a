"""Fresh databases for the tests of the data patterns: a SQLite file in the test's folder, or a new PostgreSQL
database on the local server (``MESHKIT_TEST_POSTGRES`` names its admin URL), dropped when the test ends."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

__all__ = ["DATABASE_KINDS", "POSTGRES_ADMIN_URL", "fresh_database_url"]

POSTGRES_ADMIN_URL = os.environ.get("MESHKIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
DATABASE_KINDS = ("sqlite", "postgresql")


@contextlib.asynccontextmanager
async def fresh_database_url(kind: str, folder: Path) -> AsyncIterator[str]:
    """The URL of an empty database of ``kind`` ("sqlite" or "postgresql"), removed afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'data.db'}"
        return
    name = f"meshkit_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
