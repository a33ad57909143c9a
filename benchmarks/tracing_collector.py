"""Trace collector ingest: spans/s over OTLP/HTTP (protobuf) into the SQLite store, beside the raw SQLite ceiling.

    .venv/bin/python benchmarks/tracing_collector.py [--spans 200000] [--batch 512] [--concurrency 4] [--workers 2]

The collector (``serve_collector`` over a file ``TraceStore``) runs in subprocesses, so the client's work is not
counted against it: first one process, then ``--workers`` processes writing the same file (each on a port of its
own here, the senders taking them in turn, so that the load splits evenly; deployed, ``reuse_port=True`` lets them
share one port and the kernel spreads connections). The client pre-encodes ``--spans / --batch``
``ExportTraceServiceRequest`` bodies of ``--batch`` spans each, shaped like a real system's export (see
:func:`bodies`), then POSTs them with aiohttp from ``--concurrency`` senders as fast as they are answered. Figures:

- accepted: spans in 200 responses / time from the first request to the last response. The collector answers
  after the spans are committed, so these are stored too;
- stored: ``SELECT count(*)`` on the file afterwards (every span once: no duplicates, none lost) / the same time;
- ceiling (peer, same run): the same rows, already decoded, written with plain ``sqlite3`` ``executemany`` (one
  statement per row, as a plain program would) into the same schema, page size and pragmas in one transaction per
  batch, no HTTP, no decoding, no threads. The store itself writes 256 rows per statement, so it can beat this;
- decode: ``SpanBatch.from_protobuf`` alone on one core.

Each figure comes in spans/s (wall clock) and in spans per CPU-second: the collectors' CPU seconds (user + system,
from their rusage; they also say how many cores the collectors kept busy), the peers' ``time.process_time()``. On
a machine shared with other work the second holds up better, so compare code by it (and by runs alternating old
and new code).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SERVICES = ("gateway", "orders", "payments", "inventory")
ROUTES = ("/orders/{id}", "/orders", "/payments/{id}/charge", "/inventory/{sku}/reserve", "/carts/{id}")
STACK = "".join(f'  File "/app/orders/handlers.py", line {n}, in handle\n    await charge(order)\n' for n in range(8))


# -- the server (a subprocess) -------------------------------------------------------------------------------------


def serve(db: str, port_file: str) -> None:
    from meshkit.tracing.collector import TraceStore
    from meshkit.tracing.receiver import serve_collector

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with await TraceStore.open(db, retention_seconds=None, max_spans=None) as store:
            server = await serve_collector("127.0.0.1", 0, store)
            with open(port_file + ".tmp", "w") as f:  # noqa: ASYNC230 - once, before the load starts
                f.write(str(server.port))
            os.replace(port_file + ".tmp", port_file)
            await stop.wait()
            await server.aclose()

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())


# -- the load ------------------------------------------------------------------------------------------------------


def bodies(spans: int, batch: int, seed: int = 7) -> list[bytes]:
    """Export requests as four services' SDKs send them: each body is one service's batch (its resource: service
    name, SDK, host, pid, instance id) holding two spans (a SERVER span and a CLIENT or INTERNAL child) of each of
    ``batch / 2`` traces; every trace crosses the four services (the server span of one is the child of the client
    span of the one before), so each trace's spans arrive in four bodies. About 10 attributes a span, 2 of them
    unique (url.path / url.full, a request id); 5% of the traces fail with an exception event and error status."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    rnd = random.Random(seed)

    def kv(key: str, value: Any) -> KeyValue:
        if isinstance(value, bool):
            return KeyValue(key=key, value=AnyValue(bool_value=value))
        if isinstance(value, int):
            return KeyValue(key=key, value=AnyValue(int_value=value))
        return KeyValue(key=key, value=AnyValue(string_value=value))

    shared = {
        svc: [
            kv("http.request.method", "POST"),
            kv("url.scheme", "http"),
            kv("server.address", f"{svc}.internal"),
            kv("server.port", 8080),
            kv("network.protocol.version", "1.1"),
            kv("user_agent.original", "python-aiohttp/3.14 meshkit/0.1"),
        ]
        for svc in SERVICES
    }
    ok = kv("http.response.status_code", 200)
    failed = kv("http.response.status_code", 503)
    clients = [kv("client.address", f"10.0.{n // 250}.{n % 250}") for n in range(100)]
    out: list[bytes] = []
    now = time.time_ns()
    made = 0
    while made < spans:
        traces = [(os.urandom(16), rnd.random() < 0.05, rnd.choice(ROUTES)) for _ in range(batch // 2)]
        parents: list[bytes | None] = [None] * len(traces)
        for hop, svc in enumerate(SERVICES):
            request = ExportTraceServiceRequest()
            rs = request.resource_spans.add()
            rs.resource.attributes.extend(
                [
                    kv("service.name", svc),
                    kv("service.version", "1.4.2"),
                    kv("service.instance.id", f"{svc}-7f9c"),
                    kv("telemetry.sdk.language", "python"),
                    kv("telemetry.sdk.name", "opentelemetry"),
                    kv("telemetry.sdk.version", "1.45.2"),
                    kv("host.name", "node-3"),
                    kv("process.pid", 4242 + hop),
                ]
            )
            ss = rs.scope_spans.add()
            ss.scope.name = "opentelemetry.instrumentation.aiohttp_server"
            ss.scope.version = "0.66b2"
            for t, (trace_id, failing, route) in enumerate(traces):
                start = now + made * 1000
                server_id, child_id = os.urandom(8), os.urandom(8)
                server = ss.spans.add(
                    trace_id=trace_id,
                    span_id=server_id,
                    name=f"POST {route}",
                    kind=Span.SPAN_KIND_SERVER,
                    start_time_unix_nano=start,
                    end_time_unix_nano=start + rnd.randint(200_000, 80_000_000),
                )
                if parents[t] is not None:
                    server.parent_span_id = parents[t]
                server.attributes.extend(shared[svc])
                server.attributes.extend([kv("http.route", route), failed if failing else ok, rnd.choice(clients)])
                server.attributes.extend(
                    [kv("url.path", route.replace("{id}", str(made))), kv("meshkit.request_id", os.urandom(6).hex())]
                )
                child = ss.spans.add(
                    trace_id=trace_id,
                    span_id=child_id,
                    parent_span_id=server_id,
                    name="POST" if hop < len(SERVICES) - 1 else "db.query",
                    kind=Span.SPAN_KIND_CLIENT if hop < len(SERVICES) - 1 else Span.SPAN_KIND_INTERNAL,
                    start_time_unix_nano=start + 100_000,
                    end_time_unix_nano=start + rnd.randint(150_000, 60_000_000),
                )
                child.attributes.extend(shared[svc])
                child.attributes.extend(
                    [
                        failed if failing else ok,
                        kv("url.full", f"http://{svc}.internal:8080/x/{made}"),
                        kv("meshkit.retry", False),
                    ]
                )
                if failing:
                    for span in (server, child):
                        span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="upstream unavailable"))
                    event = server.events.add(name="exception", time_unix_nano=start + 50_000)
                    event.attributes.extend(
                        [
                            kv("exception.type", "meshkit.errors.Unavailable"),
                            kv("exception.message", "payments: no healthy instance"),
                            kv("exception.stacktrace", STACK),
                        ]
                    )
                parents[t] = child_id
                made += 2
            out.append(request.SerializeToString())
    return out


async def send_all(urls: list[str], payloads: list[bytes], concurrency: int) -> tuple[int, float]:
    import aiohttp

    from meshkit.tracing.collector import SpanBatch

    counts = [len(SpanBatch.from_protobuf(b)) for b in payloads]
    queue = iter(range(len(payloads)))
    accepted = 0
    headers = {"content-type": "application/x-protobuf"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def sender(url: str) -> None:
            nonlocal accepted
            for n in queue:
                async with session.post(url, data=payloads[n], headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"the collector answered {response.status}")
                    accepted += counts[n]

        start = time.perf_counter()
        await asyncio.gather(*(sender(urls[i % len(urls)]) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return accepted, elapsed


def ceiling(db: str, payloads: list[bytes]) -> tuple[float, float]:
    """The same rows written by plain sqlite3, no HTTP: what the disk and the schema allow."""
    from meshkit.tracing import collector as c

    batches = [c.SpanBatch.from_protobuf(b) for b in payloads]
    c._create_file(Path(db))  # the store's page size
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(c._SCHEMA)
    for pragma in c._WRITER_PRAGMAS:
        conn.execute(pragma)
    conn.execute(f"PRAGMA wal_autocheckpoint={c._CHECKPOINT_BYTES // c._PAGE_SIZE}")
    conn.execute("INSERT INTO resources (attributes, last_seen_ns) VALUES ('{}', 0)")
    # One statement per row (executemany), as a plain sqlite3 program would write it.
    insert = (
        f"INSERT OR IGNORE INTO spans (trace_seq, {c._COLUMNS}, resource_id) VALUES"
        " ((SELECT seq FROM traces WHERE trace_id = ?1), ?1, ?2, NULLIF(?3, x''), ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11,"
        " ?12, ?13, ?14, ?15, 1)"
    )
    total = sum(len(b) for b in batches)
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        conn.execute("BEGIN IMMEDIATE")
        group = batch.groups[0]
        conn.executemany("INSERT OR IGNORE INTO traces (trace_id) VALUES (?)", [(t,) for t in group.traces])
        conn.executemany(insert, group.rows)
        conn.execute("COMMIT")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    stored = conn.execute("SELECT count(*) FROM spans").fetchone()[0]
    conn.close()
    assert stored == total, (stored, total)
    return total / elapsed, total / cpu


def decode_rate(payloads: list[bytes]) -> tuple[float, float]:
    from meshkit.tracing.collector import SpanBatch

    sample = payloads[: max(len(payloads) // 4, 1)]
    start, cpu = time.perf_counter(), time.process_time()
    total = sum(len(SpanBatch.from_protobuf(b)) for b in sample)
    return total / (time.perf_counter() - start), total / (time.process_time() - cpu)


def run_collectors(db: str, workers: int, payloads: list[bytes], concurrency: int) -> tuple[int, int, float, float]:
    """``workers`` collector processes on the file ``db``: (accepted, stored, seconds, their CPU seconds)."""
    folder = os.path.dirname(db)
    port_files = [os.path.join(folder, f"port-{workers}-{n}") for n in range(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    servers = [subprocess.Popen([sys.executable, str(HERE), "--serve", db, f]) for f in port_files]
    try:
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f) for f in port_files):
            if any(s.poll() is not None for s in servers) or time.monotonic() > deadline:
                raise SystemExit("a collector did not start")
            time.sleep(0.05)
        urls = [f"http://127.0.0.1:{Path(f).read_text()}/v1/traces" for f in port_files]
        accepted, elapsed = asyncio.run(send_all(urls, payloads, concurrency))
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    check = sqlite3.connect(db)
    stored = check.execute("SELECT count(*) FROM spans").fetchone()[0]
    check.close()
    return accepted, stored, elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=200_000, help="spans to send in all")
    parser.add_argument("--batch", type=int, default=512, help="spans per request")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent senders")
    parser.add_argument("--workers", type=int, default=2, help="collector processes on one file, after one alone")
    parser.add_argument("--serve", nargs=2, metavar=("DB", "PORT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return

    print(f"encoding {args.spans:,} spans in bodies of {args.batch} ...", flush=True)
    payloads = bodies(args.spans, args.batch)
    size = sum(map(len, payloads))
    print(f"{len(payloads)} bodies, {size / len(payloads) / 1024:.0f} KiB each on average", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="meshkit-bench-") as tmp:
        for workers in sorted({1, args.workers}):
            db = os.path.join(tmp, f"traces-{workers}.db")
            accepted, stored, elapsed, cpu = run_collectors(db, workers, payloads, args.concurrency)
            if stored != accepted:
                raise SystemExit(f"{workers} collector(s): stored {stored} spans, {accepted} accepted")
            rows.append((workers, accepted / elapsed, stored, stored / elapsed, cpu / elapsed))
        peer = ceiling(os.path.join(tmp, "ceiling.db"), payloads)
    decoded = decode_rate(payloads)

    load = os.getloadavg()[0]
    print()
    print(
        f"{args.spans:,} spans, {len(payloads)} requests of {args.batch}, {args.concurrency} senders, load {load:.2f}"
    )
    print("| measure | spans/s | spans per CPU-second | collector CPU (cores) |\n|---|---:|---:|---:|")
    for workers, accepted_rate, stored, stored_rate, cores in rows:
        what = f"{workers} collector process{'es' if workers > 1 else ''}"
        per_cpu = accepted_rate / cores
        print(
            f"| meshkit, {what}: accepted (HTTP 200 after commit) | {accepted_rate:,.0f} | {per_cpu:,.0f}"
            f" | {cores:.2f} |"
        )
        print(f"| meshkit, {what}: stored (count afterwards: {stored:,}) | {stored_rate:,.0f} | | |")
    print(
        "| peer: raw sqlite3 executemany, same rows and schema, no HTTP (ceiling)"
        f" | {peer[0]:,.0f} | {peer[1]:,.0f} | |"
    )
    print(f"| decode only (SpanBatch.from_protobuf) | {decoded[0]:,.0f} | {decoded[1]:,.0f} | |")
    print()
    for workers, _, _, stored_rate, cores in rows:
        print(
            f"{workers} process(es) / ceiling: {stored_rate / peer[0]:.2f}x wall, {stored_rate / cores / peer[1]:.2f}x"
            " per CPU-second   (target: >= 50,000 spans/s stored)"
        )


if __name__ == "__main__":
    main()
