from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """meshkit is built on asyncio; anyio's pytest plugin runs our async tests on it."""
    return "asyncio"
