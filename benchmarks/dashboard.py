"""How fast the dashboard's trace view renders big traces in Chromium, against the same spans rendered naively.

    .venv/bin/python benchmarks/dashboard.py [--sizes 500,2500,10000] [--runs 5]

A :class:`~meshkit.dashboard.DashboardApp` over an in-memory :class:`~meshkit.tracing.collector.TraceStore` holding
one synthetic trace per size (a batch request: a gateway calls orders once per order; orders calls payments and
inventory and publishes ``order.created`` to email, analytics and inventory; payments calls fraud and publishes
``payment.done``; each handler writes to its database; about 1 % of spans fail). Debian's Chromium (Playwright,
``/usr/bin/chromium``) opens each trace's page, ``#/traces/{id}``, in a new tab and the page itself times, with
``performance.now()``:

- **open**: from navigation start to the first frame painted after the waterfall's rows (``#waterfall .span-row``)
  and the flame chart canvas (``#flamechart``, sized and drawn) are in the page;
- **scrolling**: the time per frame while the waterfall scrolls down 400 px a frame (30 frames), each frame
  painted with the rows at its scroll position;
- **scroll to the end**: from setting the waterfall's ``scrollTop`` to its bottom to the first frame painted with
  the last span's row in it;
- **collapse**: from a click on the root's toggle to the first frame painted with the root's row alone.

The peer, measured in the same run and the same browser: the same spans from the same ``/api/traces/{id}``
rendered naively, as one plain HTML ``<table>`` with one row per span (label indented by depth, service,
duration, a positioned bar: what the waterfall shows), built with ``createElement`` like the dashboard; it scrolls
the window and collapses the root by hiding the rows below it. That is what a view that is not
virtualised costs. "open" includes fetching the trace document for both; two rows split it: the server's time to
the first byte of ``/api/traces/{id}`` (the same work for both pages) and the page's work from the end of that
response to the painted frame (parsing the document, building the view, layout and paint: what the page's design
decides).

``--baseline-js FILE`` measures a third page: the dashboard with FILE as its ``app.js`` (an older version), to show
what a change to the page did, in the same run.

Each figure is the median of ``--runs`` page loads (after one warm-up load per size); the machine is shared and
noisy, so read the ratios (meshkit / naive) rather than the absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, async_playwright

from meshkit._core.serving import bind, serve_asgi
from meshkit.dashboard import DashboardApp
from meshkit.tracing.collector import SpanRecord, TraceStore

CHROMIUM = Path("/usr/bin/chromium")
BASE_NS = 1_800_000_000_000_000_000

# -- a synthetic trace ---------------------------------------------------------------------------------------------

#: who calls whom (HTTP), and who publishes what to whom
CALLS: dict[str, tuple[str, ...]] = {
    "orders": ("payments", "inventory"),
    "payments": ("fraud",),
    "inventory": ("shipping",),
}
PUBLISHES: dict[str, tuple[str, tuple[str, ...]]] = {
    "orders": ("order.created", ("email", "analytics", "inventory")),
    "payments": ("payment.done", ("analytics",)),
}
ROUTES = {
    "orders": "POST /orders",
    "payments": "POST /charges",
    "inventory": "POST /reservations",
    "fraud": "POST /checks",
    "shipping": "POST /shipments",
}


@dataclass
class TraceBuilder:
    """Spans of one trace, parents before children, until ``limit`` spans."""

    trace_id: str
    limit: int
    rng: random.Random
    spans: list[SpanRecord] = field(default_factory=list)

    def full(self) -> bool:
        return len(self.spans) >= self.limit

    def add(
        self, parent: str | None, service: str, name: str, kind: str, start: float, end: float, **attributes: Any
    ) -> str | None:
        """A span from ``start`` to ``end`` (ms from the trace's start); its id, or None once the trace is full."""
        if self.full():
            return None
        span_id = f"{len(self.spans) + 1:016x}"
        failed = self.rng.random() < 0.01
        self.spans.append(
            SpanRecord(
                trace_id=self.trace_id,
                span_id=span_id,
                parent_span_id=parent,
                name=name,
                service=service,
                kind=kind,
                start_ns=BASE_NS + int(start * 1e6),
                end_ns=BASE_NS + int(end * 1e6),
                status_code="error" if failed else "unset",
                status_message="simulated failure" if failed else "",
                attributes=attributes,
                resource={"service.name": service, "service.instance.id": f"{service}-1"},
                scope="meshkit",
            )
        )
        return span_id

    def handle(self, parent: str | None, service: str, name: str, kind: str, start: float, end: float) -> None:
        """``service`` handling a request or a message from ``start`` to ``end``: database calls, calls to the
        services it depends on (each a client span around the callee's server span), a publish whose consumers
        run later in other services."""
        own = self.add(parent, service, name, kind, start, end, **{"http.route": name.rsplit(" ", maxsplit=1)[-1]})
        if own is None:
            return
        steps: list[str] = ["db"] * self.rng.randint(1, 2)
        steps += [c for c in CALLS.get(service, ()) if kind == "server" and self.rng.random() < 0.9]
        if service in PUBLISHES and kind == "server":
            steps.append("publish")
        self.rng.shuffle(steps)
        slot = (end - start) / (len(steps) + 1)
        at = start + slot / 4
        for step in steps:
            a, b = at, at + slot * 0.9
            at += slot
            if step == "db":
                self.add(own, service, "SELECT", "client", a, a + (b - a) * 0.5, **{"db.system": "sqlite"})
            elif step == "publish":
                topic, consumers = PUBLISHES[service]
                producer = self.add(own, service, f"{topic} publish", "producer", a, a + 0.2, destination=topic)
                for consumer in consumers:
                    if producer is None:
                        break
                    begin = a + self.rng.uniform(1, 15)  # queued, then handled after the request may have ended
                    self.handle(producer, consumer, f"{topic} process", "consumer", begin, begin + (b - a))
            else:
                client = self.add(own, service, f"POST {step}", "client", a, b, **{"server.address": step})
                if client is not None:
                    self.handle(client, step, ROUTES[step], "server", a + (b - a) * 0.05, b - (b - a) * 0.05)


def synthetic_trace(number: int, size: int) -> list[SpanRecord]:
    """A trace of ``size`` spans: a batch of orders under one gateway request (see the module docstring)."""
    builder = TraceBuilder(f"{number:032x}", size, random.Random(number))
    per_order = 25.0  # ms
    orders = size // 15 + 1  # more than enough: the builder stops at size
    end = orders * per_order
    root = builder.add(None, "gateway", "POST /orders/batch", "server", 0, end)
    for n in range(orders):
        if builder.full():
            break
        a = n * per_order
        call = builder.add(root, "gateway", "POST orders", "client", a + 0.1, a + per_order * 0.9)
        builder.handle(call, "orders", "POST /orders", "server", a + 0.5, a + per_order * 0.85)
    assert len(builder.spans) == size, (len(builder.spans), size)
    return builder.spans


# -- the pages -----------------------------------------------------------------------------------------------------

#: Run in every page before its own scripts: ``__bench.opened`` resolves with the ``performance.now()`` of the first
#: frame painted after the page's trace is in it; ``__bench.frames(done)`` with that of the first frame after
#: which ``done()`` holds.
INIT_SCRIPT = """
(() => {
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
  const ready = {
    meshkit: () => {
      const canvas = document.querySelector("#flamechart");
      return document.querySelector("#waterfall .span-row") !== null && canvas !== null && canvas.width > 0;
    },
    naive: () => document.querySelector("#naive[data-done]") !== null,
  };
  const done = location.pathname.endsWith("naive.html") ? ready.naive : ready.meshkit;
  // a MutationObserver sees the page change right after the task that changed it (the render is not in an
  // animation frame): the next frame is the first that paints it
  const opened = new Promise((resolve) => {
    const observer = new MutationObserver(() => {
      if (!done()) return;
      observer.disconnect();
      frame().then(() => resolve(performance.now()));
    });
    observer.observe(document, { childList: true, subtree: true, attributes: true });
  });
  async function frames(condition, timeoutMs = 60000) {
    const start = performance.now();
    for (;;) {
      await frame();
      if (condition()) return performance.now();
      if (performance.now() - start > timeoutMs) throw new Error("timed out waiting for a frame");
    }
  }
  function fetched() {
    const entry = performance.getEntriesByType("resource").find((e) => e.name.includes("/api/traces/"));
    return { requested: entry.requestStart, firstByte: entry.responseStart, received: entry.responseEnd };
  }
  window.__bench = { opened, frames, fetched };
})();
"""

NAIVE_HTML = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>naive trace table</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 16px; }
table { border-collapse: collapse; width: 100%; }
td, th { border-bottom: 1px solid #e5e7eb; padding: 2px 6px; white-space: nowrap; }
td.timeline { position: relative; width: 50%; }
.bar { position: absolute; top: 5px; height: 12px; border-radius: 2px; }
.error { color: #dc2626; }
</style></head>
<body><script src="naive.js"></script></body></html>
"""

NAIVE_JS = b"""
"use strict";
(async () => {
  const id = location.hash.slice(1);
  const data = await (await fetch(`api/traces/${id}`)).json();
  const colors = new Map();
  const colorOf = (name) => {
    if (!colors.has(name)) colors.set(name, `hsl(${(colors.size * 67) % 360} 60% 55%)`);
    return colors.get(name);
  };
  const cell = (text, style) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (style) Object.assign(td.style, style);
    return td;
  };
  const table = document.createElement("table");
  table.id = "naive";
  const head = table.createTHead().insertRow();
  for (const title of ["span", "service", "duration", "timeline"]) {
    head.append(Object.assign(document.createElement("th"), { textContent: title }));
  }
  const body = table.createTBody();
  const total = Math.max(1, data.duration_ns);
  for (const sp of data.spans) {
    const tr = document.createElement("tr");
    tr.dataset.index = String(body.rows.length);
    if (sp.status_code === "error") tr.className = "error";
    const timeline = cell("");
    timeline.className = "timeline";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.left = `${(100 * sp.offset_ns) / total}%`;
    bar.style.width = `max(2px, ${(100 * sp.duration_ns) / total}%)`;
    bar.style.background = colorOf(sp.service);
    timeline.append(bar);
    tr.append(
      cell(sp.name, { paddingLeft: `${Math.min(sp.depth, 32) * 12 + 4}px` }),
      cell(sp.service),
      cell(`${(sp.duration_ns / 1e6).toFixed(2)} ms`),
      timeline,
    );
    body.append(tr);
  }
  document.body.append(table);
  table.dataset.done = "1";
  window.naive = {
    collapseRoot() {
      const rows = body.rows;
      const end = 1 + data.spans[0].descendants;
      for (let i = 1; i < end; i++) rows[i].style.display = "none";
    },
  };
})();
"""


class WithNaivePage:
    """The dashboard, plus ``/naive.html`` and ``/naive.js`` (same origin, so the naive page reads the same API);
    with ``app_js``, the page's script is that instead of the package's (an older version, to compare)."""

    def __init__(self, dashboard: DashboardApp, app_js: bytes | None = None) -> None:
        self.dashboard = dashboard
        self.files = {"/naive.html": (NAIVE_HTML, b"text/html"), "/naive.js": (NAIVE_JS, b"text/javascript")}
        if app_js is not None:
            self.files["/static/app.js"] = (app_js, b"text/javascript")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        files = self.files
        if scope["type"] == "http" and scope["path"] in files:
            body, kind = files[scope["path"]]
            headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.dashboard(scope, receive, send)


# -- measuring -----------------------------------------------------------------------------------------------------

#: ms per frame while the view scrolls down 400 px a frame (30 frames, or to the end): each frame shows its rows
SCROLLING = """async (naive) => {
  const box = naive ? document.scrollingElement : document.querySelector("#waterfall");
  const shown = naive
    ? () => true
    : () => [...box.querySelectorAll(".span-row")].some((row) => {
        const top = parseFloat(row.style.top);
        return top <= box.scrollTop && top + 24 > box.scrollTop;
      });
  box.scrollTop = 0;
  await __bench.frames(shown);
  const start = performance.now();
  let frames = 0;
  while (frames < 30 && box.scrollTop + box.clientHeight < box.scrollHeight) {
    box.scrollTop += 400;
    frames++;
    await __bench.frames(shown);
  }
  return (performance.now() - start) / frames;
}"""

MESHKIT_SCROLL = """async (last) => {
  const waterfall = document.querySelector("#waterfall");
  const start = performance.now();
  waterfall.scrollTop = waterfall.scrollHeight;
  const end = await __bench.frames(() => waterfall.querySelector(`.span-row[data-index="${last}"]`) !== null);
  return end - start;
}"""

MESHKIT_COLLAPSE = """async () => {
  const waterfall = document.querySelector("#waterfall");
  waterfall.scrollTop = 0;
  await __bench.frames(() => waterfall.querySelector('.span-row[data-index="0"] .toggle') !== null);
  const start = performance.now();
  waterfall.querySelector('.span-row[data-index="0"] .toggle').click();
  const end = await __bench.frames(() => waterfall.querySelectorAll(".span-row").length === 1);
  return end - start;
}"""

NAIVE_SCROLL = """async (last) => {
  const page = document.scrollingElement;
  const start = performance.now();
  page.scrollTop = page.scrollHeight;
  const end = await __bench.frames(() => {
    const row = document.querySelector(`#naive tr[data-index="${last}"]`);
    return row.getBoundingClientRect().bottom <= window.innerHeight;
  });
  return end - start;
}"""

NAIVE_COLLAPSE = """async () => {
  document.scrollingElement.scrollTop = 0;
  await __bench.frames(() => true);
  const start = performance.now();
  naive.collapseRoot();
  const end = await __bench.frames(() => true);
  return end - start;
}"""


@dataclass
class Times:
    """One page's figures over the runs (ms)."""

    opened: list[float] = field(default_factory=list)
    scrolling: list[float] = field(default_factory=list)
    scroll: list[float] = field(default_factory=list)
    collapse: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)  # the trace request's first byte - its start
    render: list[float] = field(default_factory=list)  # opened - the trace response's end

    def median(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return statistics.median(values)


async def measure(browser: Browser, url: str, spans: int, times: Times | None, *, naive: bool) -> None:
    """One load of the page at ``url`` in a new tab, its open, scroll and collapse times added to ``times``."""
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        await context.add_init_script(INIT_SCRIPT)
        page: Page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(url, wait_until="commit")
        opened = await page.evaluate("__bench.opened", None)
        fetched = await page.evaluate("__bench.fetched()")
        if not naive:
            shown = await page.evaluate("meshkitDashboard.trace().span_count")
            assert shown == spans, (shown, spans)
        scroll = await page.evaluate(NAIVE_SCROLL if naive else MESHKIT_SCROLL, spans - 1)
        scrolling = await page.evaluate(SCROLLING, naive)
        collapse = await page.evaluate(NAIVE_COLLAPSE if naive else MESHKIT_COLLAPSE)
        assert not errors, errors
        if times is not None:
            times.opened.append(float(opened))
            times.server.append(float(fetched["firstByte"] - fetched["requested"]))
            times.render.append(float(opened - fetched["received"]))
            times.scrolling.append(float(scrolling))
            times.scroll.append(float(scroll))
            times.collapse.append(float(collapse))
    finally:
        await context.close()


#: One page's figures per trace size, by contender: "meshkit", "naive" and, with --baseline-js, "baseline".
Results = dict[int, dict[str, Times]]


async def run(sizes: list[int], runs: int, baseline_js: bytes | None) -> Results:
    store = await TraceStore.open(":memory:", retention_seconds=None, max_spans=None)
    dashboard = DashboardApp(store)
    results: Results = {}
    servers = []
    try:
        ids = {}
        for n, size in enumerate(sizes, start=1):
            spans = synthetic_trace(n, size)
            await store.add(spans)
            ids[size] = spans[0].trace_id
        # the baseline on its own port: its own origin, so the browser caches its app.js apart
        for app_js in (None, baseline_js) if baseline_js is not None else (None,):
            app = WithNaivePage(dashboard, app_js)
            servers.append(await serve_asgi(app, bind("127.0.0.1", 0), "the benchmark", lifespan="off"))
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=str(CHROMIUM),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            try:
                for size in sizes:
                    pages = {
                        "meshkit": (f"{servers[0].url}/#/traces/{ids[size]}", False),
                        "naive": (f"{servers[0].url}/naive.html#{ids[size]}", True),
                    }
                    if len(servers) > 1:
                        pages["baseline"] = (f"{servers[1].url}/#/traces/{ids[size]}", False)
                    results[size] = {name: Times() for name in pages}
                    for url, naive in pages.values():  # warm-up
                        await measure(browser, url, size, None, naive=naive)
                    for _ in range(runs):  # interleaved, so drift hits every page alike
                        for name, (url, naive) in pages.items():
                            await measure(browser, url, size, results[size][name], naive=naive)
            finally:
                await browser.close()
    finally:
        for serving in servers:
            await serving.aclose()
        await dashboard.aclose()
        await store.aclose()
    return results


def report(results: Results, runs: int) -> None:
    labels = {
        "opened": "open",
        "scrolling": "scrolling: ms per frame",
        "scroll": "scroll to the end",
        "collapse": "collapse",
        "render": "open: render after data",
        "server": "open: server (1st byte)",
    }
    baseline = any("baseline" in by_page for by_page in results.values())
    extra = f" {'baseline ms':>12} {'vs baseline':>12}" if baseline else ""
    print(f"{'spans':>7}  {'measure':<24} {'meshkit ms':>11} {'naive ms':>10} {'ratio':>7}{extra}")
    for size, by_page in results.items():
        for name, label in labels.items():
            a, b = by_page["meshkit"].median(name), by_page["naive"].median(name)
            line = f"{size:>7}  {label:<24} {a:>11.1f} {b:>10.1f} {a / b:>6.2f}x"
            if baseline:
                c = by_page["baseline"].median(name)
                line += f" {c:>12.1f} {a / c:>11.2f}x"
            print(line)
    print(
        f"(medians of {runs} page loads each, after a warm-up; ratio = meshkit / naive, lower is better. 'open' ="
        " navigation start to the first frame painted with the trace; its parts: the server's time to the first"
        " byte of /api/traces/{id}, and the page's work from the end of that response to the frame)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,2500,10000", help="spans per trace, comma-separated")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--baseline-js",
        type=Path,
        help="also measure the dashboard with this app.js (such as an older version: git show REV:src/meshkit/"
        "dashboard/static/app.js > FILE), as a third page",
    )
    args = parser.parse_args()
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is missing: scripts/install-browser.sh installs it")
    sizes = [int(s) for s in args.sizes.split(",")]
    baseline = args.baseline_js.read_bytes() if args.baseline_js else None
    report(asyncio.run(run(sizes, args.runs, baseline)), args.runs)


if __name__ == "__main__":
    main()
