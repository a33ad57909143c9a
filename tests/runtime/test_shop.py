"""``meshkit run examples/shop``: the same example, the same checks, in monolith and in processes mode.

The shop is copied to a temporary folder (its .meshkit/ state stays out of the repository) and run as a user
runs it; the test reads the instance URLs from the ready table, places an order through the orders service
(whose checkout saga calls payments, inventory and shipping through the service client, and whose outbox relays
``order.created``) and waits for it to reach email, inventory and analytics; an order that runs out of stock is
compensated; the event-sourced accounts service keeps its read model. Ctrl-C (SIGINT) must stop everything
cleanly: exit 0, no traceback, no process left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"
SERVICES = {"orders", "payments", "inventory", "shipping", "email", "analytics", "accounts"}
STEPS = ("record", "charge", "reserve", "schedule", "confirm")


class Running:
    """A ``meshkit run`` process whose output is collected by a thread (so a full pipe never blocks it)."""

    def __init__(self, folder: Path, *args: str) -> None:
        # the gateway on a free port: tests run beside other things that may hold the shop's 8080
        # 80 columns: the token and the curl lines must come out whole on a narrow terminal (or in a log)
        env = {**os.environ, "COLUMNS": "80", "PYTHONUNBUFFERED": "1", "MESHKIT_GATEWAY__PORT": "0"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshkit", "run", str(folder), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def urls(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for match in re.finditer(r"│\s*([a-z]+)\s*│\s*(\S+)\s*│\s*(http://[\d.:]+)\s*│", self.output):
            found.setdefault(match.group(1), []).append(match.group(3))
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"meshkit run did not stop on SIGINT:\n{self.output}") from None
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def call(method: str, url: str, body: object | None = None, token: str | None = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def checkout_trace(traces_url: str) -> list[dict[str, Any]] | None:
    """The spans of the latest trace rooted at the gateway's POST orders, once all eighteen of its spans arrived."""
    _, found = call("GET", f"{traces_url}?service=gateway&operation=POST%20orders&limit=1")
    if not isinstance(found, dict) or not found.get("traces"):
        return None
    _, trace = call("GET", f"{traces_url}/{found['traces'][0]['trace_id']}")
    if not isinstance(trace, dict):
        return None
    spans = trace["spans"]
    assert isinstance(spans, list)
    # gateway, orders, the saga, its 5 steps, 3 calls, 3 served calls, the outbox relay, 3 consumers
    return spans if len(spans) >= 18 else None


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    folder = tmp_path / "shop"
    shutil.copytree(SHOP, folder, ignore=shutil.ignore_patterns(".meshkit", "__pycache__"))
    return folder


def pids_of(folder: Path) -> list[int]:
    """Processes whose command line names ``folder`` (the children of processes mode)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(folder) in cmdline and "meshkit.runner.child" in cmdline:
                out.append(int(entry.name))
    return out


@pytest.mark.parametrize("mode", ["monolith", "processes"])
def test_the_shop_takes_an_order_and_fans_it_out(shop: Path, mode: str) -> None:
    run = Running(shop, "--mode", mode)
    try:
        wait_until(
            lambda: "Ctrl-C stops everything" in run.output or run.process.poll() is not None,
            "the ready table",
            timeout=180,
            every=0.1,
        )
        assert run.process.poll() is None, f"meshkit run exited early:\n{run.output}"
        urls = run.urls()
        assert set(urls) == SERVICES, run.output
        assert "curl -s -X POST http://" in run.output, "the ready output shows what to try"
        orders = urls["orders"][0]

        status, order = call(
            "POST", f"{orders}/orders", {"customer": "ada", "email": "a@x", "sku": "book", "quantity": 2}
        )
        assert status == 201, order
        assert isinstance(order, dict) and order["total"] == 3000
        status, stored = call("GET", f"{orders}/orders/{order['id']}")
        assert status == 200 and isinstance(stored, dict) and stored["charge"] == order["charge"]

        def fanned_out() -> bool:
            _, sent = call("GET", f"{urls['email'][0]}/sent")
            _, stock = call("GET", f"{urls['inventory'][0]}/stock/book")
            _, stats = call("GET", f"{urls['analytics'][0]}/stats")
            return (
                isinstance(sent, list)
                and [s["order"] for s in sent] == [order["id"]]
                and isinstance(stock, dict)
                and stock["quantity"] == 98
                and isinstance(stats, dict)
                and stats["orders"] == 1
            )

        wait_until(fanned_out, "order.created handled by email, inventory and analytics", timeout=60, every=0.2)

        status, declined = call(
            "POST", f"{orders}/orders", {"customer": "bo", "email": "b@x", "sku": "lamp", "quantity": 3}
        )
        assert status == 402, declined  # 14,700 cents: payments declines, orders says so and cancels the order
        status, stored = call("GET", f"{orders}/orders/{order['id']}")
        assert status == 200 and isinstance(stored, dict) and stored["status"] == "confirmed", stored
        status, unknown = call(
            "POST", f"{orders}/orders", {"customer": "bo", "email": "b@x", "sku": "car", "quantity": 1}
        )
        assert status == 404 and "unknown sku" in json.dumps(unknown)

        # through the gateway: JWT on the order API, the BFF routes shaped per client type
        gateway = re.search(r"│\s*gateway\s*│\s*│\s*(http://[\d.:]+)\s*│", run.output)
        token = re.search(r"TOKEN=(\S+)", run.output)
        assert gateway is not None and token is not None, run.output
        base = gateway.group(1)
        body = {"customer": "cy", "email": "c@x", "sku": "book", "quantity": 1}
        status, refused = call("POST", f"{base}/api/orders", body)
        assert status == 401 and isinstance(refused, dict) and refused["status"] == 401
        status, placed = call("POST", f"{base}/api/orders", body, token=token.group(1))
        assert status == 201 and isinstance(placed, dict), placed
        status, mobile = call("GET", f"{base}/bff/mobile/orders/{placed['id']}", token=token.group(1))
        assert status == 200, mobile
        assert mobile == {"id": placed["id"], "sku": "book", "total": 1500, "paid": 1500, "items": 1}
        status, web = call("GET", f"{base}/bff/web/orders/{placed['id']}", token=token.group(1))
        assert status == 200 and isinstance(web, dict) and set(web) == {"order", "shipment", "charge"}
        status, stock = call("GET", f"{base}/api/stock/book")
        assert status == 200 and isinstance(stock, dict) and "quantity" in stock

        # the checkout's trace arrives complete in the built-in collector
        traces = re.search(r"│\s*traces\s*│\s*│\s*(http://[\d.:]+/api/traces)\s*│", run.output)
        assert traces is not None, run.output
        wait_until(lambda: checkout_trace(traces.group(1)) is not None, "the checkout trace", timeout=60, every=0.3)
        spans = checkout_trace(traces.group(1))
        assert spans is not None
        assert len({s["trace_id"] for s in spans}) == 1
        ids = {s["span_id"] for s in spans}
        roots = [s for s in spans if s["parent_span_id"] is None]
        assert [(r["service"], r["name"]) for r in roots] == [("gateway", "POST orders")], roots
        assert all(s["parent_span_id"] is None or s["parent_span_id"] in ids for s in spans), "a parent is missing"
        # the outbox relays order.created in the request's trace, from the saga's last step (confirm)
        publish = [s for s in spans if s["name"] == "outbox relay order.created"]
        assert len(publish) == 1 and publish[0]["service"] == "orders"
        (saga,) = [s for s in spans if s["name"] == "saga checkout"]
        steps = sorted((s for s in spans if s["name"].startswith("saga checkout step ")), key=lambda s: s["start_ns"])
        assert [s["name"].rsplit(" ", 1)[1] for s in steps] == list(STEPS)
        assert all(s["parent_span_id"] == saga["span_id"] for s in steps)
        by_id = {s["span_id"]: s for s in spans}
        assert by_id[publish[0]["parent_span_id"]]["name"] == "saga checkout step confirm"
        for call_span in (s for s in spans if s["kind"] == "client"):
            assert by_id[call_span["parent_span_id"]]["name"].startswith("saga checkout step "), call_span
        consumers = [s for s in spans if s["name"] == "order.created process"]
        assert sorted(s["service"] for s in consumers) == ["analytics", "email", "inventory"]
        for consumer in consumers:
            assert consumer["parent_span_id"] == publish[0]["span_id"]
            assert [link["span_id"] for link in consumer["links"]] == [publish[0]["span_id"]]
        calls = {(s["service"], s["name"]) for s in spans if s["kind"] == "client"}
        assert calls == {("orders", "POST payments"), ("orders", "POST inventory"), ("orders", "POST shipping")}

        # the saga compensates: 5 mugs are charged, then out of stock (3 left), so the charge is refunded
        status, refused = call(
            "POST", f"{base}/api/orders", {**body, "sku": "mug", "quantity": 5}, token=token.group(1)
        )
        assert status == 409 and "out of stock" in json.dumps(refused), refused
        shown = re.search(r"│\s*dashboard\s*│\s*│\s*(http://[\d.:]+/?)\s*│", run.output)
        assert shown is not None, run.output
        dashboard = shown.group(1).rstrip("/") + "/api"
        _, compensated = call("GET", f"{dashboard}/sagas?status=compensated")
        assert isinstance(compensated, dict) and compensated.get("available") is True, compensated
        # newest first: the mugs, then the lamps that payments declined (only the order's record to undo)
        assert [g["failed_step"] for g in compensated["sagas"]] == ["reserve", "charge"]
        _, detail = call("GET", f"{dashboard}/sagas/{compensated['sagas'][0]['id']}")
        assert isinstance(detail, dict)
        assert [(st["step"], st["phase"], st["status"]) for st in detail["steps"]] == [
            ("record", "action", "done"),
            ("charge", "action", "done"),
            ("reserve", "action", "failed"),
            ("reserve", "compensation", "done"),  # compensate_failed: a lost answer may hide a reservation
            ("charge", "compensation", "done"),
            ("record", "compensation", "done"),
        ]
        _, cancelled = call("GET", f"{orders}/orders/{detail['id']}")
        assert isinstance(cancelled, dict) and cancelled["status"] == "cancelled", cancelled
        _, refund = call("GET", f"{urls['payments'][0]}/charges/{detail['results']['charge']['id']}")
        assert isinstance(refund, dict) and refund["refunded"] is True
        _, mugs = call("GET", f"{urls['inventory'][0]}/stock/mug")
        assert isinstance(mugs, dict) and mugs["quantity"] == 3

        # event sourcing: an account is its events, /balances a read model kept by a projection
        accounts = urls["accounts"][0]
        status, opened = call("POST", f"{accounts}/accounts", {"owner": "ada", "initial": 1000})
        assert status == 201 and isinstance(opened, dict), opened
        status, overdrawn = call("POST", f"{accounts}/accounts/{opened['id']}/withdrawals", {"amount": 5000})
        assert status == 409 and "insufficient funds" in json.dumps(overdrawn)
        status, after = call("POST", f"{accounts}/accounts/{opened['id']}/withdrawals", {"amount": 200})
        assert status == 200 and isinstance(after, dict) and after["balance"] == 800 and after["version"] == 2
        status, nobody = call("GET", f"{accounts}/accounts/no%20such%20id/events")
        assert status == 404 and "no account" in json.dumps(nobody)  # not a 500 from the stream name check
        _, history = call("GET", f"{accounts}/accounts/{opened['id']}/events")
        assert isinstance(history, list) and [e["type"] for e in history] == ["AccountOpened", "MoneyWithdrawn"]
        wait_until(
            lambda: call("GET", f"{accounts}/balances")[1] == [{"id": opened["id"], "owner": "ada", "balance": 800}],
            "the balances read model",
            timeout=60,
            every=0.2,
        )
        _, projections = call("GET", f"{dashboard}/projections")
        assert isinstance(projections, dict)
        assert [(p["name"], p["lag"]) for p in projections["projections"]] == [("account_balances", 0)]

        status, ready = call("GET", f"{urls['payments'][0]}/readyz")
        assert status == 200 and isinstance(ready, dict) and ready["ready"] is True
        assert ready["checks"] == {"started": "ok", "registered": "ok", "broker": "ok", "database": "ok"}
    finally:
        code = run.stop()
    assert code == 0, run.output
    assert "Traceback" not in run.output, run.output
    assert "stopped." in run.output
    if mode == "processes":
        assert pids_of(shop) == [], "a child outlived meshkit run"


def test_meshkit_run_explains_a_folder_without_meshkit_toml(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshkit", "run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
    assert "error: no meshkit.toml at" in out.stderr and "hint:" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--mode", "cluster"], "unknown mode 'cluster'"),
        (["--replicas", "orders"], "is not name=N"),
        (["--replicas", "nope=2"], "'nope', not a service"),
        (["--mode", "monolith", "--replicas", "orders=2"], "--replicas needs --mode processes"),
    ],
)
def test_meshkit_run_refuses_bad_options_clearly(shop: Path, args: list[str], expected: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshkit", "run", str(shop), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_service_that_cannot_be_imported_is_named(shop: Path) -> None:
    (shop / "shop" / "email.py").write_text("import no_such_module_here\n")
    out = subprocess.run(
        [sys.executable, "-m", "meshkit", "run", str(shop), "--mode", "monolith"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot import 'shop.email' for service 'email'" in out.stderr
