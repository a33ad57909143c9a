"""What the broker restart tests share: publishing through an outage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from meshkit.errors import Unavailable
from meshkit.resilience import Constant, Retry


async def until_accepted(send: Callable[[], Awaitable[object]], *, pause: float = 0.05, timeout: float = 180) -> int:
    """Call ``send`` until the broker accepts it; return how many retries it took.

    Only :class:`~meshkit.errors.Unavailable` is retried: any other error is not the clear "broker down" a restart
    must produce, so it fails the test at once. Retrying a publish is safe where ids are deduplicated; elsewhere the
    test counts the duplicates.
    """
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        await send()

    await Retry(attempts=None, backoff=Constant(pause), max_delay=timeout, on=(Unavailable,)).acall(attempt)
    return calls - 1
