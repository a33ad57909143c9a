"""The dashboard of a running shop in a real browser: Debian's Chromium driven by Playwright (no browser download:
scripts/install-browser.sh installs chromium, Playwright is given its path). Screenshots go to
``test-artifacts/dashboard/`` (``MESHKIT_ARTIFACTS`` overrides the folder)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

from tests.helpers import wait_until
from tests.runtime.test_shop import SHOP, Running, call

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("MESHKIT_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (scripts/install-browser.sh)"),
]


def url_of(run: Running, name: str) -> str:
    match = re.search(rf"│\s*{name}\s*│\s*│\s*(http://[\d.:]+)", run.output)
    assert match is not None, run.output
    return match.group(1)


async def test_the_dashboard_shows_a_trace_its_flame_chart_and_replays_a_dead_letter(tmp_path: Path) -> None:
    shots = ARTIFACTS / "dashboard"
    shots.mkdir(parents=True, exist_ok=True)
    folder = tmp_path / "shop"
    shutil.copytree(SHOP, folder, ignore=shutil.ignore_patterns(".meshkit", "__pycache__"))
    run = Running(folder, "--mode", "monolith")
    try:
        wait_until(lambda: "Ctrl-C stops everything" in run.output or run.process.poll() is not None, "ready", 180)
        assert run.process.poll() is None, run.output
        gateway, dashboard = url_of(run, "gateway"), url_of(run, "dashboard")
        token = re.search(r"TOKEN=(\S+)", run.output)
        assert token is not None
        good = {"customer": "ada", "email": "ada@example.com", "sku": "book", "quantity": 1}
        assert call("POST", f"{gateway}/api/orders", good, token=token.group(1))[0] == 201
        broken = {**good, "email": "not-an-address"}  # email's handler gives up on it: a dead letter
        assert call("POST", f"{gateway}/api/orders", broken, token=token.group(1))[0] == 201
        mugs = {**good, "sku": "mug", "quantity": 5}  # charged, then out of stock: the checkout saga compensates
        assert call("POST", f"{gateway}/api/orders", mugs, token=token.group(1))[0] == 409
        status, account = call("POST", f"{run.urls()['accounts'][0]}/accounts", {"owner": "ada", "initial": 100})
        assert status == 201 and isinstance(account, dict)

        def dead_letters() -> int:
            _, data = call("GET", f"{dashboard}/api/messaging")
            assert isinstance(data, dict)
            return sum(t["dlq"] or 0 for t in data["topics"])

        wait_until(lambda: dead_letters() == 1, "the broken order's message in the dead letter topic", 60, every=0.3)

        def traced() -> bool:
            _, data = call("GET", f"{dashboard}/api/traces?service=gateway&limit=5")
            return isinstance(data, dict) and len(data.get("traces", [])) >= 2

        wait_until(traced, "both checkouts in the trace store", 60, every=0.3)
        # the failed deliveries' log records carry the broken checkout's trace id
        _, failed = call("GET", f"{dashboard}/api/traces?status=error&limit=1")
        assert isinstance(failed, dict) and failed["traces"], failed
        trace_id = failed["traces"][0]["trace_id"]
        _, logged = call("GET", f"{dashboard}/api/logs?trace_id={trace_id}")
        assert isinstance(logged, dict) and logged["records"], logged
        assert all(r["trace_id"] == trace_id for r in logged["records"])

        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=str(CHROMIUM),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
            )
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{dashboard}/#/services")
            await page.wait_for_selector("#services-table")
            await page.screenshot(path=str(shots / "services.png"), full_page=True)

            await page.goto(f"{dashboard}/#/traces")
            await page.wait_for_selector("#trace-list .trace-row")
            await page.screenshot(path=str(shots / "traces.png"), full_page=True)
            # the good checkout (newer traces are the accounts call and the compensated checkout)
            _, found = call("GET", f"{dashboard}/api/traces?service=gateway&operation=POST%20orders&limit=10")
            assert isinstance(found, dict)
            checkout = max((t for t in found["traces"] if not t["error_count"]), key=lambda t: t["span_count"])
            await page.goto(f"{dashboard}/#/traces/{checkout['trace_id']}")
            await page.wait_for_selector("#waterfall .span-row")
            rows = await page.locator("#waterfall .span-row").count()
            assert rows >= 18, rows  # gateway, orders, the saga and its steps, calls, served calls, relay, consumers
            await page.wait_for_selector("#flamechart")
            # the flame chart drew something: its canvas is not blank
            painted = await page.evaluate(
                """() => {
                    const c = document.querySelector('#flamechart');
                    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0;
                    for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) n++;
                    return n;
                }"""
            )
            # not blank: a few hundred pixels at least (how many depends on the trace's shape: one long span can
            # leave the others a pixel wide; a threshold of 1000 failed on such a trace at 946)
            assert painted > 200, painted
            await page.locator("#waterfall .span-row").nth(1).click()
            await page.wait_for_selector("#span-details")
            details = await page.inner_text("#span-details")
            assert "http.request.method" in details or "messaging." in details, details
            assert await page.locator("#waterfall .span-row.critical").count() >= 1
            await page.screenshot(path=str(shots / "trace.png"), full_page=True)

            await page.goto(f"{dashboard}/#/topology")
            await page.wait_for_selector("#topology .edge", state="attached")  # a straight path has no height
            assert await page.locator("#topology .edge.async").count() >= 1  # order.created, dashed
            assert await page.locator("#topology .edge.sync").count() >= 1
            label = await page.locator('#topology .edge-label[data-source="gateway"]').first.text_content()
            assert label is not None and re.fullmatch(r"[\d.]+/(s|min)( · .*)?", label), label  # a rate
            await page.screenshot(path=str(shots / "topology.png"), full_page=True)

            # orders' clients to payments and shipping, reported by the orders service itself
            await page.goto(f"{dashboard}/#/resilience")
            client = '#resilience-table .breaker-row[data-kind="client"][data-service="orders"]'
            await page.wait_for_selector(client)
            names = sorted(await page.locator(client).evaluate_all("rows => rows.map(r => r.dataset.name)"))
            assert names == ["inventory", "payments", "shipping"], names
            assert await page.locator(f"{client}[data-state='closed']").count() == 3
            assert await page.locator('#rejections-table .rejection-row[data-kind="rate_limited"]').count() >= 1
            await page.screenshot(path=str(shots / "resilience.png"), full_page=True)

            # the checkout sagas, the compensated one's step log, and the accounts' projection
            await page.goto(f"{dashboard}/#/data")
            await page.wait_for_selector('#sagas-table .saga-row[data-status="completed"]')
            await page.wait_for_selector('#projections-table .projection-row[data-name="account_balances"]')
            await page.screenshot(path=str(shots / "sagas.png"), full_page=True)
            await page.locator('#sagas-table .saga-row[data-status="compensated"] a').first.click()
            await page.wait_for_selector('#saga-steps .saga-step[data-phase="compensation"]')
            steps = await page.locator("#saga-steps .saga-step").evaluate_all(
                "rows => rows.map(r => [r.dataset.step, r.dataset.phase, r.dataset.status])"
            )
            assert steps == [
                ["record", "action", "done"],
                ["charge", "action", "done"],
                ["reserve", "action", "failed"],
                ["reserve", "compensation", "done"],
                ["charge", "compensation", "done"],
                ["record", "compensation", "done"],
            ]
            assert "out of stock" in await page.inner_text("#saga-summary")
            await page.screenshot(path=str(shots / "saga.png"), full_page=True)

            await page.goto(f"{dashboard}/#/messaging")
            await page.wait_for_selector('#messaging-table .topic-row[data-topic="order.created"] .lag')
            lags = await page.locator('#messaging-table .topic-row[data-topic="order.created"] .lag').all_inner_texts()
            assert lags and all(text.strip().startswith("· lag") for text in lags), lags
            await page.screenshot(path=str(shots / "messaging.png"), full_page=True)

            await page.goto(f"{dashboard}/#/messaging/order.created")
            await page.wait_for_selector("#dlq-table .dlq-row")
            await page.screenshot(path=str(shots / "dead-letters.png"), full_page=True)
            await page.locator("#dlq-table .dlq-row .replay").first.click()
            await page.wait_for_selector("#confirm-dialog[open]")
            await page.click("#confirm-yes")
            await page.wait_for_selector("#audit-list :text('replay')")
            await page.screenshot(path=str(shots / "replayed.png"), full_page=True)
            await browser.close()
        _, audit = call("GET", f"{dashboard}/api/audit")
        assert isinstance(audit, dict)
        assert [(e["action"], e["topic"], e["count"]) for e in audit["entries"]] == [("replay", "order.created", 1)]
        assert errors == [], errors
    finally:
        code = run.stop()
    assert code == 0, run.output
    assert "Traceback" not in run.output, run.output
    for name in ("services", "traces", "trace", "topology", "resilience", "sagas", "saga", "dead-letters", "replayed"):
        assert (shots / f"{name}.png").stat().st_size > 5000
