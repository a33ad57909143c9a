"""AsgiTransport: the same client calls an ASGI app in process (the monolith run mode), with no socket."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshkit.client import AsgiTransport, ClientOptions, ServiceClient
from meshkit.client.asgi import Receive, Scope, Send
from meshkit.discovery import Instance, Registry, connect
from meshkit.errors import ConfigurationError, Unavailable
from meshkit.resilience import Constant, Retry
from meshkit.tracing import extracted


class EchoApp:
    """A hand-written ASGI app: answers with what it received; ``/boom`` raises, ``/half`` raises mid-response,
    ``/silent`` returns without answering, ``/stream`` answers in three chunks."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        self.scopes.append(scope)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        path = scope["path"]
        if path == "/boom":
            raise RuntimeError("the handler broke")
        if path == "/silent":
            return
        if path == "/half":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            raise RuntimeError("broke while streaming")
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for chunk in (b"one ", b"two ", b"three"):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            after = await receive()  # the request is over: a server says the client is gone
            assert after == {"type": "http.disconnect"}
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        answer = {
            "method": scope["method"],
            "path": path,
            "raw_path": scope["raw_path"].decode(),
            "query": scope["query_string"].decode(),
            "headers": headers,
            "body": body.decode(),
            "http_version": scope["http_version"],
        }
        status = 201 if scope["method"] == "POST" else 200
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"x-app", b"echo")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(answer).encode(), "more_body": False})


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    async with connect("memory://") as reg:
        await reg.register(Instance("echo", "e-1", "127.0.0.1", 9), ttl=600, keepalive=False)
        yield reg


def client(registry: Registry, app: Any, **options: Any) -> ServiceClient:
    opts = ClientOptions(retry=Retry(attempts=2, backoff=Constant(0.0)), **options)
    return ServiceClient("echo", registry, transport=AsgiTransport({"echo": app}), options=opts)


@pytest.mark.anyio
async def test_the_app_receives_the_request_and_its_answer_comes_back(registry: Registry) -> None:
    app = EchoApp()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with client(registry, app) as echo:
        with extracted({"traceparent": traceparent}):
            response = await echo.post(
                "/orders/a%20b", params={"page": 2}, json={"item": "tea"}, headers={"X-Tenant": "acme"}
            )
    assert response.status == 201
    assert response.headers["X-App"] == "echo"
    assert response.instance is not None
    assert response.instance.id == "e-1"
    seen = response.json()
    assert seen["method"] == "POST"
    assert (seen["path"], seen["raw_path"], seen["query"]) == ("/orders/a b", "/orders/a%20b", "page=2")
    assert seen["body"] == '{"item":"tea"}'
    assert seen["http_version"] == "1.1"
    assert seen["headers"]["x-tenant"] == "acme"
    assert seen["headers"]["content-type"] == "application/json"
    assert seen["headers"]["content-length"] == str(len('{"item":"tea"}'))
    assert seen["headers"]["host"] == "127.0.0.1:9"
    assert seen["headers"]["traceparent"] == traceparent
    assert app.scopes[0]["server"] == ("127.0.0.1", 9)


@pytest.mark.anyio
async def test_an_app_exception_becomes_a_500(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    app = EchoApp()
    async with client(registry, app) as echo:
        response = await echo.get("/boom")
        silent = await echo.get("/silent")
    assert (response.status, response.text) == (500, "Internal Server Error")
    assert silent.status == 500
    assert app.calls == 4  # a 500 is retried like one over HTTP (GET: 2 attempts each)
    failures = [r for r in caplog.records if r.name == "meshkit.client" and r.levelname == "ERROR"]
    assert any(r.exc_info and "the handler broke" in str(r.exc_info[1]) for r in failures)


@pytest.mark.anyio
async def test_an_exception_after_the_response_started_is_a_lost_connection(registry: Registry) -> None:
    app = EchoApp()
    async with client(registry, app) as echo:
        with pytest.raises(Unavailable, match="failed in the middle of its response to POST /half"):
            await echo.post("/half")
    assert app.calls == 1  # sent and lost: a POST is not retried


@pytest.mark.anyio
async def test_a_streamed_answer_is_collected(registry: Registry) -> None:
    async with client(registry, EchoApp()) as echo:
        response = await echo.get("/stream")
    assert (response.status, response.text) == (200, "one two three")


@pytest.mark.anyio
async def test_a_service_with_no_app_in_process_is_a_configuration_error(registry: Registry) -> None:
    transport = AsgiTransport({"other": EchoApp()})
    async with ServiceClient("echo", registry, transport=transport) as echo:
        with pytest.raises(ConfigurationError, match="no ASGI app for service 'echo' in this process"):
            await echo.get("/")
