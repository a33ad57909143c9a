"""The value types (headers, requests, responses), the public surface and the import layering of the client."""

from __future__ import annotations

import subprocess
import sys

import pytest

import meshkit.client
from meshkit.client import ClientOptions, Headers, Request, Response
from meshkit.client._client import _build
from meshkit.discovery import Instance
from meshkit.errors import HTTPStatusError, MeshkitError


def test_all_names_are_importable_unique_and_sorted() -> None:
    exported = meshkit.client.__all__
    assert len(exported) == len(set(exported))
    assert exported == sorted(exported, key=lambda n: (n.startswith("_"), n.upper() != n, n))
    assert [n for n in exported if not hasattr(meshkit.client, n)] == []


def test_importing_the_client_does_no_work() -> None:
    code = (
        "import sys, threading\n"
        "before = threading.active_count()\n"
        "import meshkit.client\n"
        "assert threading.active_count() == before\n"
        "print([m for m in ('aiohttp', 'yarl', 'starlette', 'httpx') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_headers_are_case_insensitive_and_keep_repeats() -> None:
    headers = Headers([("Set-Cookie", "a=1"), ("Content-Type", "text/plain"), ("set-cookie", "b=2")])
    assert headers["content-type"] == headers["CONTENT-TYPE"] == "text/plain"
    assert headers["Set-Cookie"] == "a=1, b=2"
    assert headers.get_list("SET-COOKIE") == ["a=1", "b=2"]
    assert "Content-type" in headers
    assert "missing" not in headers
    assert list(headers) == ["set-cookie", "content-type"]
    assert len(headers) == 2
    assert headers == {"SET-COOKIE": "a=1, b=2", "content-type": "text/plain"}
    assert headers.raw()[0] == ("Set-Cookie", "a=1")
    assert Headers(headers) == headers
    assert Headers({"A": "1"}) == Headers([("a", "1")])


def test_a_response_decodes_its_body() -> None:
    latin = Response(200, Headers({"Content-Type": 'text/plain; charset="latin-1"'}), "café".encode("latin-1"))
    assert latin.encoding == "latin-1"
    assert latin.text == "café"
    doc = Response(200, Headers({"content-type": "application/json"}), b'{"a": [1, 2]}')
    assert doc.encoding == "utf-8"
    assert doc.json() == {"a": [1, 2]}
    assert doc.is_success
    assert not Response(302, Headers(), b"").is_success


def test_raise_for_status_names_the_call_and_the_instance() -> None:
    instance = Instance("payments", "p-1", "10.0.0.7", 8080)
    request = Request("POST", "/charges", "dry=1")
    response = Response(409, Headers(), b'{"error":\n "duplicate"}', instance, request)
    with pytest.raises(HTTPStatusError) as info:
        response.raise_for_status()
    assert isinstance(info.value, MeshkitError)
    assert str(info.value) == (
        'POST /charges?dry=1 answered 409 (client error) (payments at 10.0.0.7:8080): {"error": "duplicate"}'
    )
    assert info.value.status == 409
    assert info.value.response is response
    with pytest.raises(HTTPStatusError, match=r"the request answered 500 \(server error\): x{197}\.\.\.$"):
        Response(500, Headers(), b"x" * 1000).raise_for_status()


def test_a_request_is_built_once_with_query_body_and_trace_headers() -> None:
    request = _build("post", "charges?v=1", {"tag": ["a", "b"], "none": None, "n": 3}, {"X-A": "1"}, None, "hi")
    assert (request.method, request.path, request.query) == ("POST", "/charges", "v=1&tag=a&tag=b&n=3")
    assert request.target == "/charges?v=1&tag=a&tag=b&n=3"
    assert request.content == b"hi"
    assert request.headers["content-type"] == "text/plain; charset=utf-8"
    assert request.headers["x-a"] == "1"
    assert "traceparent" not in request.headers  # no trace context here
    raw = _build("PUT", "/blob", [("k", "v")], None, None, b"\x00\x01")
    assert (raw.query, raw.content, "content-type" in raw.headers) == ("k=v", b"\x00\x01", False)


def test_options_are_immutable_values() -> None:
    options = ClientOptions()
    with pytest.raises(AttributeError):
        options.timeout = 1.0  # type: ignore[misc]
    assert options.balancer == "p2c"
    assert options.retry is not None
    assert options.retry.attempts == 3
