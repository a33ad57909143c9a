"""Per-call overhead of meshkit's resilience policies, measured beside tenacity and pybreaker in the same run.

    .venv/bin/python benchmarks/resilience.py [--calls 20000] [--repeat 7] [--markdown]

Paths:
- success: the wrapped function returns at once.
- failing: for retries, every call fails once (ConnectionError) and succeeds on the retry (zero wait, so the figure
  is the machinery, not the sleep); for breakers, every call fails and the breaker is set never to open.

Each figure is the best of ``--repeat`` loops of ``--calls`` calls (microseconds per call); "overhead" subtracts the
bare call on the same path. Targets (issue 3): meshkit Retry overhead <= 0.2x tenacity's; the full async pipeline
(retry + breaker + timeout + bulkhead) <= 5 us per call.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import pybreaker
import tenacity

from meshkit.resilience import Bulkhead, CircuitBreaker, Constant, Retry, Timeout


class Flip:
    """Fails every other call: one failure, then the retry succeeds."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        if self.n & 1:
            raise ConnectionError("transient")
        return 1

    async def acall(self) -> int:
        return self()


def ok() -> int:
    return 1


async def aok() -> int:
    return 1


def always_fails() -> int:
    raise ConnectionError("down")


async def aalways_fails() -> int:
    raise ConnectionError("down")


def best_sync(run: Callable[[], object], calls: int, repeat: int, expect_error: bool = False) -> float:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        if expect_error:
            for _ in range(calls):
                try:
                    run()
                except ConnectionError:
                    pass
        else:
            for _ in range(calls):
                run()
        timings.append((time.perf_counter_ns() - start) / calls / 1000)
    return min(timings)


async def best_async(
    run: Callable[[], Awaitable[object]], calls: int, repeat: int, expect_error: bool = False
) -> float:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        if expect_error:
            for _ in range(calls):
                try:
                    await run()
                except ConnectionError:
                    pass
        else:
            for _ in range(calls):
                await run()
        timings.append((time.perf_counter_ns() - start) / calls / 1000)
    return min(timings)


def tenacity_sync() -> tenacity.Retrying:
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_none(),
        retry=tenacity.retry_if_exception_type(ConnectionError),
        reraise=True,
    )


def tenacity_async() -> tenacity.AsyncRetrying:
    return tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_none(),
        retry=tenacity.retry_if_exception_type(ConnectionError),
        reraise=True,
    )


def meshkit_retry() -> Retry:
    return Retry(attempts=3, backoff=Constant(0.0), on=ConnectionError)


def meshkit_full() -> Any:
    return (
        Retry(attempts=3, backoff=Constant(0.0), on=ConnectionError)
        | CircuitBreaker(failure_rate_threshold=100, minimum_calls=10**7, window_size=10**7)
        | Timeout(5.0)
        | Bulkhead(64)
    )


def never_open_breaker() -> CircuitBreaker:
    return CircuitBreaker(failure_rate_threshold=100, minimum_calls=10**7, window_size=10**7)


def measure(calls: int, repeat: int) -> dict[tuple[str, str, str], float]:
    """Returns {(mode, path, subject): microseconds per call}."""
    r: dict[tuple[str, str, str], float] = {}

    # sync, success path
    r["sync", "success", "bare"] = best_sync(ok, calls, repeat)
    retry, full, ten = meshkit_retry(), meshkit_full(), tenacity_sync()
    r["sync", "success", "meshkit Retry"] = best_sync(lambda: retry.call(ok), calls, repeat)
    r["sync", "success", "meshkit pipeline"] = best_sync(lambda: full.call(ok), calls, repeat)
    r["sync", "success", "tenacity Retrying"] = best_sync(lambda: ten(ok), calls, repeat)
    mb, pb = never_open_breaker(), pybreaker.CircuitBreaker(fail_max=10**9)
    r["sync", "success", "meshkit CircuitBreaker"] = best_sync(lambda: mb.call(ok), calls, repeat)
    r["sync", "success", "pybreaker"] = best_sync(lambda: pb.call(ok), calls, repeat)

    # sync, failing path
    flip = Flip()
    r["sync", "failing", "bare"] = best_sync(flip, calls, repeat, expect_error=True)
    flip = Flip()
    r["sync", "failing", "meshkit Retry"] = best_sync(lambda: retry.call(flip), calls, repeat)
    flip = Flip()
    r["sync", "failing", "meshkit pipeline"] = best_sync(lambda: full.call(flip), calls, repeat)
    flip = Flip()
    r["sync", "failing", "tenacity Retrying"] = best_sync(lambda: ten(flip), calls, repeat)
    mb, pb = never_open_breaker(), pybreaker.CircuitBreaker(fail_max=10**9)
    r["sync", "failing", "meshkit CircuitBreaker"] = best_sync(
        lambda: mb.call(always_fails), calls, repeat, expect_error=True
    )
    r["sync", "failing", "pybreaker"] = best_sync(lambda: pb.call(always_fails), calls, repeat, expect_error=True)
    r["sync", "failing", "bare breaker-path"] = best_sync(always_fails, calls, repeat, expect_error=True)

    async def async_part() -> None:
        aretry, afull, aten = meshkit_retry(), meshkit_full(), tenacity_async()
        r["async", "success", "bare"] = await best_async(aok, calls, repeat)
        r["async", "success", "meshkit Retry"] = await best_async(lambda: aretry.acall(aok), calls, repeat)
        r["async", "success", "meshkit pipeline"] = await best_async(lambda: afull.acall(aok), calls, repeat)
        r["async", "success", "tenacity AsyncRetrying"] = await best_async(lambda: aten(aok), calls, repeat)
        amb = never_open_breaker()
        r["async", "success", "meshkit CircuitBreaker"] = await best_async(lambda: amb.acall(aok), calls, repeat)

        aflip = Flip()
        r["async", "failing", "bare"] = await best_async(aflip.acall, calls, repeat, expect_error=True)
        aflip = Flip()
        r["async", "failing", "meshkit Retry"] = await best_async(lambda: aretry.acall(aflip.acall), calls, repeat)
        aflip = Flip()
        r["async", "failing", "meshkit pipeline"] = await best_async(lambda: afull.acall(aflip.acall), calls, repeat)
        aflip = Flip()
        r["async", "failing", "tenacity AsyncRetrying"] = await best_async(lambda: aten(aflip.acall), calls, repeat)

    asyncio.run(async_part())
    return r


def report(r: dict[tuple[str, str, str], float], markdown: bool) -> list[str]:
    lines: list[str] = []
    if markdown:
        lines += ["| mode | path | subject | µs/call | overhead µs |", "|---|---|---|---:|---:|"]
    else:
        lines.append(f"{'mode':6} {'path':8} {'subject':26} {'us/call':>9} {'overhead':>9}")
    for (mode, path, subject), us in r.items():
        bare_key = "bare breaker-path" if "reaker" in subject and path == "failing" and mode == "sync" else "bare"
        overhead = us - r[mode, path, bare_key] if subject not in ("bare", "bare breaker-path") else 0.0
        if markdown:
            lines.append(f"| {mode} | {path} | {subject} | {us:.2f} | {overhead:.2f} |")
        else:
            lines.append(f"{mode:6} {path:8} {subject:26} {us:9.2f} {overhead:9.2f}")

    def over(mode: str, path: str, subject: str) -> float:
        return r[mode, path, subject] - r[mode, path, "bare"]

    lines.append("")
    lines.append("ratios (overhead, lower is better):")
    for mode, peer in (("sync", "tenacity Retrying"), ("async", "tenacity AsyncRetrying")):
        for path in ("success", "failing"):
            ratio = over(mode, path, "meshkit Retry") / over(mode, path, peer)
            lines.append(f"  meshkit Retry / tenacity, {mode} {path}: {ratio:.3f}x   (target <= 0.2x)")
    for path in ("success", "failing"):
        bare = "bare" if path == "success" else "bare breaker-path"
        mk = r["sync", path, "meshkit CircuitBreaker"] - r["sync", path, bare]
        pyb = r["sync", path, "pybreaker"] - r["sync", path, bare]
        lines.append(f"  meshkit CircuitBreaker / pybreaker, sync {path}: {mk / pyb:.3f}x")
    full = r["async", "success", "meshkit pipeline"]
    added = over("async", "success", "meshkit pipeline")
    lines.append(f"  full async pipeline, success: {full:.2f} us/call ({added:.2f} us over a bare call)  (target <= 5)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table for benchmarks/RESULTS.md")
    args = parser.parse_args()
    print(
        f"python {platform.python_version()} on {platform.machine()}, tenacity {version('tenacity')}, "
        f"pybreaker {version('pybreaker')}; {args.calls} calls x best of {args.repeat}",
        file=sys.stderr,
    )
    for line in report(measure(args.calls, args.repeat), args.markdown):
        print(line)


if __name__ == "__main__":
    main()
