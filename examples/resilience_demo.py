"""meshkit's resilience policies against a real, deliberately flaky local HTTP server.

Run it with ``make demo`` (or ``python examples/resilience_demo.py``). The server fails its first 2 requests, every
5th one, and has an outage from request 16 to 22. Each call goes through

    Fallback | Retry (exponential backoff, full jitter) | CircuitBreaker | Timeout | Bulkhead

and the demo prints what each policy did: retries, the breaker opening, calls failing fast and served from the
fallback while it is open, the half-open probes, and the recovery.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from rich.console import Console
from rich.table import Table

from meshkit.errors import Unavailable
from meshkit.resilience import (
    BreakerTransition,
    Bulkhead,
    CallRejected,
    CircuitBreaker,
    Exponential,
    Fallback,
    FallbackUsed,
    Retry,
    RetryAttempt,
    Timeout,
)
from meshkit.resilience.events import Event
from meshkit.testing import FlakyHTTPServer

CALLS = 36


def schedule(n: int) -> bool:
    return n <= 2 or n % 5 == 0 or 16 <= n <= 22


async def main() -> None:
    console = Console(highlight=False)
    started = time.monotonic()
    stats = {"retries": 0, "fail_fast": 0, "fallbacks": 0}

    def on_event(event: Event) -> None:
        t = f"[dim]{time.monotonic() - started:5.2f}s[/]"
        if isinstance(event, RetryAttempt):
            stats["retries"] += 1
            delay = f"{event.delay * 1000:.0f} ms"
            console.print(f"{t}   [yellow]retry[/] #{event.attempt} in {delay} after: {event.error}")
        elif isinstance(event, BreakerTransition):
            colour = {"open": "red", "half_open": "yellow", "closed": "green"}[event.to_state.value]
            console.print(
                f"{t} [bold {colour}]breaker {event.from_state.value} -> {event.to_state.value}[/] "
                f"(failure rate {event.failure_rate:.0f}%)"
            )
        elif isinstance(event, CallRejected):
            stats["fail_fast"] += 1
        elif isinstance(event, FallbackUsed):
            stats["fallbacks"] += 1

    breaker = CircuitBreaker(
        name="catalog",
        window_size=10,
        minimum_calls=5,
        failure_rate_threshold=60,
        wait_in_open=0.4,
        half_open_calls=2,
        listeners=[on_event],
    )
    pipeline = (
        Fallback(handler=lambda exc: f"served from cache ({type(exc).__name__})", listeners=[on_event])
        | Retry(attempts=3, backoff=Exponential(0.02, cap=0.2, jitter="full"), max_delay=0.25, listeners=[on_event])
        | breaker
        | Timeout(2.0)
        | Bulkhead(4)
    )
    console.print(f"[bold]meshkit resilience demo[/]: {pipeline!r}\n")

    with FlakyHTTPServer(schedule) as server:
        console.print(f"flaky server at {server.url}: fails requests 1-2, every 5th, and 16-22 (an outage)\n")

        async with aiohttp.ClientSession() as session:

            async def get_item(n: int) -> str:
                async with session.get(f"{server.url}/items/{n}") as response:
                    if response.status >= 500:
                        raise Unavailable(f"HTTP {response.status} from request {(await response.json())['n']}")
                    return f"ok (request {(await response.json())['n']})"

            for call in range(1, CALLS + 1):
                result = await pipeline.acall(get_item, call)
                state = breaker.state.value
                colour = "green" if result.startswith("ok") else "magenta"
                elapsed = f"[dim]{time.monotonic() - started:5.2f}s[/]"
                console.print(f"{elapsed} call {call:2d}: [{colour}]{result}[/] [dim]breaker {state}[/]")
                await asyncio.sleep(0.05)  # pacing, so the breaker's open wait passes during the run

        table = Table(title="what the policies did")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("calls made by the app", str(CALLS))
        table.add_row("requests the server saw", str(server.requests))
        table.add_row("requests that failed", str(len(server.failures)))
        table.add_row("retries", str(stats["retries"]))
        table.add_row("calls refused while the circuit was open", str(stats["fail_fast"]))
        table.add_row("answers served by the fallback", str(stats["fallbacks"]))
        table.add_row("breaker state at the end", breaker.state.value)
        console.print()
        console.print(table)


if __name__ == "__main__":
    asyncio.run(main())
