"""What tracing costs: an in-process service call and a message round trip, untraced, traced by meshkit, and with
the same spans made by hand with the bare OpenTelemetry SDK (the floor: what any instrumentation must pay).

    .venv/bin/python benchmarks/tracing.py [--calls 3000] [--messages 3000] [--rounds 5] [--native]

``--native`` also measures the span recorder compiled with mypyc (``scripts/build-native.sh``: the wheel a release
builds; needs a C compiler): each round runs once as the Python source and once compiled, alternately, each in a
process of its own.

Spans go through the SDK's BatchSpanProcessor to an exporter that drops them (export cost is off the request path
either way; the collector's ingest rate is benchmarks/tracing_collector.py). Target: tracing adds <= 10 % to an
untraced in-process call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from _native import native_env
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from meshkit import Service, discovery, messaging
from meshkit.client import AsgiTransport, ServiceClient
from meshkit.messaging import Message
from meshkit.runtime import RunContext
from meshkit.tracing.spans import provider

ROOT = Path(__file__).resolve().parent.parent


class Drop(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def sdk_provider() -> Any:
    """The OpenTelemetry SDK's own provider, configured as meshkit's: every span recorded, batch export."""
    made = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    made.add_span_processor(
        BatchSpanProcessor(Drop(), max_queue_size=65536, max_export_batch_size=2048, schedule_delay_millis=500)
    )
    return made


async def scenario(mode: str, calls: int, messages: int, folder: Path) -> tuple[float, float]:
    """(microseconds per call, microseconds per message round trip) in ``mode``: none, meshkit, sdk."""
    made = (sdk_provider() if mode == "sdk" else provider("bench", exporter=Drop())) if mode != "none" else None
    tracer = made.get_tracer("bench") if made is not None else None
    service = Service("stock")
    got: list[int] = []
    done = asyncio.Event()
    hand = tracer if mode == "sdk" else None

    @service.http.get("/stock/{sku}")
    async def stock(sku: str) -> dict[str, int]:
        if hand is not None:
            with hand.start_as_current_span("GET /stock/{sku}", kind=trace.SpanKind.SERVER):
                return {"quantity": 1}
        return {"quantity": 1}

    @service.subscribe("tick")
    async def tick(message: Message) -> None:
        if hand is not None:
            with hand.start_as_current_span("tick process", kind=trace.SpanKind.CONSUMER):
                got.append(1)
        else:
            got.append(1)
        if len(got) == messages:
            done.set()

    async with messaging.connect("memory://") as broker, discovery.connect("memory://") as registry:
        transport = AsgiTransport({"stock": service.asgi})
        ctx_tracer = tracer if mode == "meshkit" else None
        await service.start(RunContext(broker, registry, transport, folder, tracer=ctx_tracer))
        await service.register("127.0.0.1", 8000)
        async with ServiceClient("stock", registry, transport=transport, tracer=ctx_tracer) as client:
            call: Callable[[], Awaitable[Any]]
            if hand is not None:

                async def call() -> Any:
                    with hand.start_as_current_span("GET stock", kind=trace.SpanKind.CLIENT):
                        return await client.get("/stock/book")
            else:

                async def call() -> Any:
                    return await client.get("/stock/book")

            for _ in range(200):
                await call()
            start = time.perf_counter()
            for _ in range(calls):
                await call()
            per_call = (time.perf_counter() - start) / calls * 1e6
        start = time.perf_counter()
        for i in range(messages):
            if hand is not None:
                with hand.start_as_current_span("tick publish", kind=trace.SpanKind.PRODUCER):
                    await broker.publish("tick", i)
            else:
                await service.publish("tick", i)
        async with asyncio.timeout(120):
            await done.wait()
        per_message = (time.perf_counter() - start) / messages * 1e6
        await service.stop()
        await transport.aclose()
    if made is not None:
        made.shutdown()
    return per_call, per_message


Results = dict[str, list[tuple[float, float]]]


def measure(rounds: int, calls: int, messages: int) -> Results:
    """``rounds`` results of every mode, in this process."""
    results: Results = {"none": [], "meshkit": [], "sdk": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(rounds):
            for mode, runs in results.items():  # interleaved, so drift hits every mode alike
                runs.append(asyncio.run(scenario(mode, calls, messages, Path(folder))))
    return results


def one_round(calls: int, messages: int, pythonpath: str | None) -> Results:
    """One round in a process of its own (``pythonpath``: the compiled build's folder, or None for the source)."""
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    command = [sys.executable, __file__, "--rounds", "1", "--calls", str(calls), "--messages", str(messages)]
    done = subprocess.run([*command, "--json"], check=True, capture_output=True, text=True, env=env)
    loaded: Results = json.loads(done.stdout)
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--native", action="store_true", help="also measure the recorder compiled with mypyc")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a --native round's child
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.rounds, args.calls, args.messages)))
        return
    if not args.native:
        report(measure(args.rounds, args.calls, args.messages), args)
        return
    native = native_env()
    if native is None:
        sys.exit("error: the compiled recorder cannot be built here (see above)")
    site = native["PYTHONPATH"]
    builds: dict[str, Results] = {"Python source": {}, "compiled (mypyc)": {}}
    for _ in range(args.rounds):
        for results, path in zip(builds.values(), (None, site), strict=True):  # alternately
            for mode, runs in one_round(args.calls, args.messages, path).items():
                results.setdefault(mode, []).extend((call, message) for call, message in runs)
    for build, results in builds.items():
        print(f"-- {build}")
        report(results, args)


def report(results: Results, args: argparse.Namespace) -> None:
    base_call = statistics.median(r[0] for r in results["none"])
    base_msg = statistics.median(r[1] for r in results["none"])
    print(f"{'mode':<34}{'call us':>10}{'added':>9}{'msg us':>10}{'added':>9}")
    labels = {"none": "untraced", "meshkit": "meshkit instrumentation", "sdk": "bare OpenTelemetry SDK (same spans)"}
    for mode, runs in results.items():
        call = statistics.median(r[0] for r in runs)
        msg = statistics.median(r[1] for r in runs)
        added_call, added_msg = (call - base_call) / base_call, (msg - base_msg) / base_msg
        print(f"{labels[mode]:<34}{call:>10.1f}{added_call:>9.1%}{msg:>10.1f}{added_msg:>9.1%}")
    print(f"(medians of {args.rounds} rounds; {args.calls} calls and {args.messages} messages per round)")


if __name__ == "__main__":
    main()
