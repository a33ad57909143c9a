"""The page: served by the dashboard itself with the right types, nothing loaded from outside, stable element ids."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from meshkit import dashboard as dashboard_package
from meshkit.dashboard import ASSETS, DashboardApp
from meshkit.tracing.collector import TraceStore

from .asgi import call, serving

STATIC = resources.files("meshkit.dashboard").joinpath("static")
DOCS = Path(__file__).parents[2] / "docs" / "dashboard.md"

#: Element ids and classes the browser tests rely on (docs/dashboard.md lists them).
IDS = [
    "nav",
    "view",
    "services-table",
    "trace-filters",
    "f-service",
    "f-operation",
    "f-errors",
    "f-min-duration",
    "trace-list",
    "minimap",
    "waterfall",
    "flamechart",
    "span-details",
    "topology",
    "topology-window",
    "resilience-table",
    "transitions",
    "rejections-table",
    "resilience-errors",
    "messaging-table",
    "dlq-table",
    "audit-list",
    "confirm-dialog",
    "confirm-yes",
    "confirm-no",
    "log-filters",
    "log-table",
    "log-follow",
]
CLASSES = ["trace-row", "span-row", "span-bar", "toggle", "span-link", "service-row", "breaker-row", "topic-row"]
CLASSES += ["dlq-row", "dlq-select", "replay", "discard", "log-row", "edge", "node", "edge-label", "rejection-row"]
CLASSES += ["transition"]

# The one URL allowed in the static files: the SVG namespace name in app.js, an identifier createElementNS needs
# (never fetched; the comment above it in app.js says so).
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


def static_files() -> dict[str, str]:
    return {f.name: f.read_text(encoding="utf-8") for f in STATIC.iterdir() if f.is_file()}


@pytest.mark.anyio
async def test_the_index_page_and_every_asset_are_served_with_their_content_type(store: TraceStore) -> None:
    dashboard = DashboardApp(store)
    index = await call(dashboard, "GET", "/")
    assert index.status == 200 and index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.body == STATIC.joinpath("index.html").read_bytes()
    assert "default-src 'self'" in index.headers["content-security-policy"]
    assert index.headers["x-content-type-options"] == "nosniff"
    for name, content_type in ASSETS.items():
        reply = await call(dashboard, "GET", f"/static/{name}")
        assert reply.status == 200, name
        assert reply.headers["content-type"] == content_type
        assert reply.body == STATIC.joinpath(name).read_bytes()
        again = await call(dashboard, "GET", f"/static/{name}", headers=[("if-none-match", reply.headers["etag"])])
        assert again.status == 304 and again.body == b""
    assert set(static_files()) == set(ASSETS), "every static file is served, and nothing else"
    assert {"text/javascript; charset=utf-8", "text/css; charset=utf-8"} <= set(ASSETS.values())
    missing = await call(dashboard, "GET", "/static/../_app.py")
    assert missing.status == 404
    missing = await call(dashboard, "GET", "/static/secret.txt")
    assert missing.status == 404 and missing.json()["error"] == "not_found"


def test_the_page_references_every_asset_relatively() -> None:
    html = static_files()["index.html"]
    assert 'src="static/app.js"' in html and 'href="static/style.css"' in html
    assert re.search(r'(src|href)="/', html) is None, "absolute paths break when the dashboard is mounted"
    assert "fetch(`api/" in static_files()["app.js"]


def test_no_static_file_loads_anything_from_outside() -> None:
    for name, text in static_files().items():
        urls = re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'`)]*", text, flags=re.IGNORECASE)
        allowed = [SVG_NAMESPACE] if name == "app.js" else []
        assert [u for u in urls if u not in allowed] == [], name
        assert re.search(r"""(src|href|url)\s*[=(]\s*["']?//""", text) is None, f"protocol-relative URL in {name}"
        assert "@import" not in text and "@font-face" not in text, name
    js = static_files()["app.js"]
    assert js.count(SVG_NAMESPACE) == 1
    assert "never fetched" in js.split(SVG_NAMESPACE)[0].rsplit("\n", 2)[-2], "say why the namespace is there"
    css = static_files()["style.css"]
    assert "url(" not in css
    unsafe = re.search(r"\.(innerHTML|outerHTML)\s*[+]?=|insertAdjacentHTML|document\.write|\beval\(", js)
    assert unsafe is None, "the page builds elements with createElement and textContent only"


def test_the_element_ids_and_classes_tests_rely_on_exist_and_are_documented() -> None:
    files = static_files()
    source = files["index.html"] + files["app.js"]
    docs = DOCS.read_text(encoding="utf-8")
    for element_id in IDS:
        assert re.search(rf"""id(: |=)"{element_id}\"""", source), element_id
        assert f"#{element_id}" in docs, element_id
    for name in CLASSES:
        assert re.search(rf"""[`"]{name}[\s`"$]""", source), name  # a class string starts with it
        assert f".{name}" in docs, name


@pytest.mark.anyio
async def test_the_dashboard_works_mounted_under_a_path(store: TraceStore) -> None:
    dashboard = DashboardApp(store)
    outer = Starlette(routes=[Mount("/dash", app=dashboard)])
    index = await call(outer, "GET", "/dash/")
    assert index.status == 200 and b"static/app.js" in index.body
    script = await call(outer, "GET", "/dash/static/app.js")
    assert script.status == 200 and script.headers["content-type"].startswith("text/javascript")
    info = await call(outer, "GET", "/dash/api/info")
    assert info.json()["title"] == "meshkit"


@pytest.mark.anyio
async def test_served_by_uvicorn_the_page_and_api_answer_and_shutdown_closes_the_app(store: TraceStore) -> None:
    dashboard = DashboardApp(store, title="shop")
    async with serving(dashboard) as url, aiohttp.ClientSession() as http:
        async with http.get(url + "/") as response:
            assert response.status == 200 and response.content_type == "text/html"
            assert "<canvas" not in await response.text()  # the page builds its views from app.js
        async with http.get(url + "/static/style.css") as response:
            assert response.content_type == "text/css"
        async with http.get(url + "/api/info") as response:
            assert (await response.json())["title"] == "shop"
        assert not dashboard.closed
    assert dashboard.closed, "the lifespan shutdown closes the dashboard"


def test_importing_the_dashboard_imports_no_web_framework() -> None:
    frameworks = "('starlette', 'fastapi', 'aiohttp', 'uvicorn')"
    code = f"import sys, meshkit.dashboard; print(sorted(m for m in sys.modules if m.split('.')[0] in {frameworks}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_public_names_are_importable_and_sorted_like_the_rest_of_meshkit() -> None:
    exported = dashboard_package.__all__
    assert exported == sorted(exported, key=lambda n: (n.startswith("_"), n.upper() != n, n))
    assert [n for n in exported if not hasattr(dashboard_package, n)] == []
