"""The transformation plugins: headers, query parameters and JSON bodies, called hook by hook."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from meshkit.errors import ConfigurationError, MeshkitError
from meshkit.gateway.plugin import Headers, Plugin, ProxyRequest, ResponseHead
from meshkit.gateway.transform import (
    BodyRejected,
    HeaderOperations,
    HeaderTransform,
    JsonBodyTransform,
    JsonOperations,
    QueryTransform,
)


def make_request(
    headers: list[tuple[str, str]] | None = None,
    *,
    query: str = "",
    consumer: str | None = None,
    params: dict[str, str] | None = None,
) -> ProxyRequest:
    return ProxyRequest(
        method="GET",
        path="/orders/42",
        query=query,
        headers=Headers(headers or []),
        client="203.0.113.7",
        route="orders",
        params=params or {},
        consumer=consumer,
    )


def headers_plugin(**options: Any) -> HeaderTransform:
    return HeaderTransform(HeaderTransform.Options.model_validate(options))


def query_plugin(**options: Any) -> QueryTransform:
    return QueryTransform(QueryTransform.Options.model_validate(options))


def json_plugin(**options: Any) -> JsonBodyTransform:
    return JsonBodyTransform(JsonBodyTransform.Options.model_validate(options))


# -- headers ------------------------------------------------------------------------------------------------------


def test_header_operations_in_order() -> None:
    plugin = headers_plugin(
        request={
            "remove": ["X-Debug"],
            "rename": {"X-Old": "X-New"},
            "set": {"X-Mode": "strict"},
            "add": {"X-Via": "gateway"},
        }
    )
    req = make_request([("x-debug", "1"), ("x-old", "a"), ("x-old", "b"), ("x-new", "stale"), ("x-mode", "lax")])
    plugin.request(req)
    assert req.headers.get("x-debug") is None
    assert req.headers.get_all("x-new") == ["a", "b"]  # renamed values replace the target's own
    assert "x-old" not in req.headers
    assert req.headers.get_all("x-mode") == ["strict"]
    assert req.headers.get_all("x-via") == ["gateway"]


def test_add_keeps_existing_values_and_rename_of_absent_header_does_nothing() -> None:
    plugin = headers_plugin(request={"add": {"X-Tag": "two"}, "rename": {"X-Missing": "X-Target"}})
    req = make_request([("x-tag", "one"), ("x-target", "keep")])
    plugin.request(req)
    assert req.headers.get_all("x-tag") == ["one", "two"]
    assert req.headers.get_all("x-target") == ["keep"]


def test_response_headers_are_transformed() -> None:
    plugin = headers_plugin(response={"remove": ["Server"], "set": {"X-Route": "{route}"}})
    req = make_request()
    resp = ResponseHead(200, Headers([("server", "nginx/1.2"), ("content-type", "text/plain")]))
    plugin.response(req, resp)
    assert resp.headers.items() == [("content-type", "text/plain"), ("x-route", "orders")]


def test_templates_are_rendered_per_request() -> None:
    plugin = headers_plugin(
        request={"set": {"X-Who": "{consumer}@{client} on {route} for order {param.id} {{literal}}"}}
    )
    req = make_request(consumer="alice", params={"id": "42"})
    plugin.request(req)
    assert req.headers.get("x-who") == "alice@203.0.113.7 on orders for order 42 {literal}"


def test_set_with_missing_value_removes_a_client_supplied_header() -> None:
    plugin = headers_plugin(request={"set": {"X-Consumer": "{consumer}"}, "add": {"X-Item": "{param.item}"}})
    req = make_request([("x-consumer", "admin")])  # a spoofing attempt by an anonymous client
    plugin.request(req)
    assert "x-consumer" not in req.headers
    assert "x-item" not in req.headers


def test_template_value_with_line_break_is_not_injected() -> None:
    plugin = headers_plugin(request={"set": {"X-Id": "{param.id}"}})
    req = make_request([("x-id", "client")], params={"id": "1\r\nX-Admin: yes"})
    plugin.request(req)
    assert "x-id" not in req.headers
    assert "x-admin" not in req.headers


def test_only_configured_directions_are_touched() -> None:
    plugin = headers_plugin(response={"add": {"X-A": "1"}})
    req = make_request([("x-a", "0")])
    plugin.request(req)
    assert req.headers.items() == [("x-a", "0")]


@pytest.mark.parametrize(
    "options",
    [
        {"request": {"set": {"X-A": "{user}"}}},
        {"request": {"add": {"X-A": "{param.}"}}},
        {"request": {"add": {"X-A": "open {brace"}}},
        {"response": {"set": {"Bad Name": "x"}}},
        {"response": {"remove": ["X:Colon"]}},
        {"request": {"rename": {"X-A": "X B"}}},
        {"request": {"set": {"X-A": "line\r\nbreak"}}},
        {"request": {"add": {"X-A": "nul\x00"}}},
        {"request": {"remove": ["Content-Length"]}},
        {"request": {"set": {"Transfer-Encoding": "chunked"}}},
        {"request": {"sett": {"X-A": "1"}}},
    ],
)
def test_header_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HeaderTransform.Options.model_validate(options)


def test_header_config_errors_also_raise_at_init_without_validation() -> None:
    ops = HeaderOperations.model_construct(set={"X-A": "{nope}"}, add={}, remove=[], rename={})
    options = HeaderTransform.Options.model_construct(request=ops, response=HeaderOperations())
    with pytest.raises(ConfigurationError, match="unknown placeholder"):
        HeaderTransform(options)
    bad_name = HeaderOperations.model_construct(set={}, add={}, remove=["bad name"], rename={})
    with pytest.raises(ConfigurationError, match="not a valid header name"):
        HeaderTransform(HeaderTransform.Options.model_construct(request=bad_name, response=HeaderOperations()))


def test_unknown_placeholder_message_names_the_allowed_ones() -> None:
    with pytest.raises(ValidationError, match=r"unknown placeholder \{tenant\}"):
        HeaderTransform.Options.model_validate({"request": {"set": {"X-T": "{tenant}"}}})


def test_hooks_are_sync_and_only_the_header_hooks_are_overridden() -> None:
    assert HeaderTransform.overrides("request")
    assert HeaderTransform.overrides("response")
    assert not HeaderTransform.overrides("request_body")
    assert not HeaderTransform.overrides("response_body")
    assert isinstance(headers_plugin(), Plugin)


# -- query --------------------------------------------------------------------------------------------------------


def test_query_operations_keep_untouched_parameters_byte_for_byte() -> None:
    plugin = query_plugin(remove=["debug"], rename={"q": "search"}, set={"v": "2"}, add={"tag": "a b&c"})
    req = make_request(query="x=1&q=hello%20world&debug=1&x=2&v=1&y=%7E+z&v=3")
    plugin.request(req)
    assert req.query == "x=1&search=hello%20world&x=2&v=2&y=%7E+z&tag=a%20b%26c"


def test_query_untouched_when_no_operation_applies() -> None:
    plugin = query_plugin(remove=["debug"])
    req = make_request(query="b=2&a=1&&b=3&flag")
    plugin.request(req)
    assert req.query == "b=2&a=1&&b=3&flag"


def test_query_set_appends_when_absent_and_add_to_empty_query() -> None:
    plugin = query_plugin(set={"api": "v2"})
    req = make_request(query="a=1")
    plugin.request(req)
    assert req.query == "a=1&api=v2"
    empty = make_request()
    query_plugin(add={"k": "v"}).request(empty)
    assert empty.query == "k=v"


def test_query_names_are_matched_decoded_and_blank_values_kept() -> None:
    plugin = query_plugin(remove=["a b"], rename={"c": "d"})
    req = make_request(query="a+b=1&a%20b=2&c=&e=5")
    plugin.request(req)
    assert req.query == "d=&e=5"


def test_query_rename_replaces_the_targets_own_values() -> None:
    plugin = query_plugin(rename={"old": "new"})
    req = make_request(query="new=1&old=2&old=3")
    plugin.request(req)
    assert req.query == "new=2&new=3"


def test_query_templates() -> None:
    plugin = query_plugin(set={"tenant": "{consumer}"}, add={"item": "{param.id}"})
    req = make_request(query="tenant=evil", consumer="acme co", params={"id": "7/8"})
    plugin.request(req)
    assert req.query == "tenant=acme%20co&item=7%2F8"
    anonymous = make_request(query="tenant=evil&z=1")
    plugin.request(anonymous)
    assert anonymous.query == "z=1"


@pytest.mark.parametrize(
    "options",
    [{"add": {"": "x"}}, {"remove": [""]}, {"rename": {"a": ""}}, {"set": {"a": "{nope}"}}, {"drop": ["a"]}],
)
def test_query_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        QueryTransform.Options.model_validate(options)


# -- JSON bodies --------------------------------------------------------------------------------------------------

JSON = [("content-type", "application/json; charset=utf-8")]


def run_request_body(plugin: JsonBodyTransform, data: Any, headers: list[tuple[str, str]] | None = None) -> Any:
    req = make_request(JSON if headers is None else headers)
    return json.loads(plugin.request_body(req, json.dumps(data).encode()))


def run_response_body(plugin: JsonBodyTransform, body: bytes, content_type: str = "application/json") -> bytes:
    resp = ResponseHead(200, Headers([("content-type", content_type)]))
    return plugin.response_body(make_request(), resp, body)


def test_json_remove_rename_set_in_nested_objects() -> None:
    plugin = json_plugin(
        request={
            "remove": ["password", "card.number"],
            "rename": {"user.mail": "email"},
            "set": {"source": "gateway", "meta.trace": {"on": True}},
        }
    )
    got = run_request_body(
        plugin, {"password": "x", "card": {"number": "4111", "exp": "12/30"}, "user": {"mail": "a@b", "id": 1}}
    )
    assert got == {
        "card": {"exp": "12/30"},
        "user": {"id": 1},
        "email": "a@b",
        "source": "gateway",
        "meta": {"trace": {"on": True}},
    }


def test_json_paths_cross_arrays_element_wise() -> None:
    plugin = json_plugin(
        response={
            "remove": ["items.secret", "items.tags.internal"],
            "rename": {"items.price": "items.cost"},
            "set": {"items.currency": "EUR"},
        }
    )
    body = json.dumps(
        {
            "items": [
                {"price": 1, "secret": "s", "tags": [{"internal": 1, "name": "a"}, {"name": "b"}]},
                {"price": 2},
                "not an object",
            ]
        }
    ).encode()
    got = json.loads(run_response_body(plugin, body))
    assert got == {
        "items": [
            {"cost": 1, "tags": [{"name": "a"}, {"name": "b"}], "currency": "EUR"},
            {"cost": 2, "currency": "EUR"},
            "not an object",
        ]
    }


def test_json_root_array_is_crossed_too() -> None:
    plugin = json_plugin(response={"remove": ["password"]})
    got = json.loads(run_response_body(plugin, b'[{"id":1,"password":"a"},{"id":2,"password":"b"}]'))
    assert got == [{"id": 1}, {"id": 2}]


def test_json_select_keeps_only_listed_fields_then_other_operations_apply() -> None:
    plugin = json_plugin(response={"select": ["id", "owner.name", "lines.sku", "owner"], "set": {"source": "gateway"}})
    body = json.dumps(
        {
            "id": 1,
            "owner": {"name": "a", "ssn": "x"},
            "lines": [{"sku": "A", "cost": 3}, {"sku": "B"}],
            "internal": True,
        }
    ).encode()
    got = json.loads(run_response_body(plugin, body))
    # "owner" (a shorter path) keeps the whole object even though "owner.name" was listed as well
    assert got == {
        "id": 1,
        "owner": {"name": "a", "ssn": "x"},
        "lines": [{"sku": "A"}, {"sku": "B"}],
        "source": "gateway",
    }
    narrow = json_plugin(response={"select": ["owner.name"]})
    assert json.loads(run_response_body(narrow, body)) == {"owner": {"name": "a"}}


def test_json_set_does_not_replace_a_non_object_on_the_way() -> None:
    plugin = json_plugin(request={"set": {"meta.source": "gw"}})
    assert run_request_body(plugin, {"meta": "text"}) == {"meta": "text"}


def test_json_set_values_are_independent_copies() -> None:
    plugin = json_plugin(response={"set": {"items.meta": {"seen": False}}})
    got = json.loads(run_response_body(plugin, b'{"items":[{},{}]}'))
    assert got == {"items": [{"meta": {"seen": False}}, {"meta": {"seen": False}}]}


def test_json_unchanged_body_is_forwarded_byte_for_byte() -> None:
    plugin = json_plugin(response={"remove": ["password"]})
    body = b'{ "id" : 1.0 }'
    assert run_response_body(plugin, body) is body


def test_invalid_json_request_is_rejected_with_400() -> None:
    plugin = json_plugin(request={"remove": ["a"]})
    req = make_request(JSON)
    with pytest.raises(BodyRejected) as info:
        plugin.request_body(req, b'{"a": ')
    assert info.value.status == 400
    assert "not valid JSON" in info.value.message
    assert isinstance(info.value, MeshkitError)
    reply = info.value.reply()
    assert reply.status == 400
    assert json.loads(reply.body)["status"] == 400
    with pytest.raises(BodyRejected):
        plugin.request_body(req, b'{"a": NaN}')  # not JSON, and it would not re-encode as JSON either


def test_invalid_json_response_passes_through_unchanged() -> None:
    plugin = json_plugin(response={"remove": ["a"]})
    assert run_response_body(plugin, b"<html>oops</html>") == b"<html>oops</html>"


@pytest.mark.parametrize(
    ("content_type", "touched"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/problem+json", True),
        ("application/vnd.api+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("text/json-ish", False),
        ("", False),
    ],
)
def test_only_json_content_types_are_touched(content_type: str, touched: bool) -> None:
    plugin = json_plugin(request={"remove": ["a"]}, response={"remove": ["a"]})
    body = b'{"a":1,"b":2}'
    expected = b'{"b":2}' if touched else body
    assert run_response_body(plugin, body, content_type) == expected
    req = make_request([("content-type", content_type)] if content_type else [])
    assert plugin.request_body(req, body) == expected
    if touched:
        with pytest.raises(BodyRejected):
            plugin.request_body(req, b"not json")
    else:
        assert plugin.request_body(req, b"not json") == b"not json"


def test_empty_body_passes() -> None:
    plugin = json_plugin(request={"remove": ["a"]})
    assert plugin.request_body(make_request(JSON), b"") == b""


def test_non_ascii_survives_re_encoding() -> None:
    plugin = json_plugin(response={"set": {"x": 1}})
    out = run_response_body(plugin, '{"name":"Zoë"}'.encode())
    assert out == '{"name":"Zoë","x":1}'.encode()


@pytest.mark.parametrize(
    "options",
    [
        {"request": {"remove": ["a..b"]}},
        {"request": {"remove": [""]}},
        {"response": {"rename": {"a": ".b"}}},
        {"response": {"select": ["a."]}},
        {"response": {"set": {"a": {1, 2}}}},
        {"response": {"drop": ["a"]}},
    ],
)
def test_json_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JsonBodyTransform.Options.model_validate(options)


def test_json_rename_into_itself_is_a_config_error() -> None:
    with pytest.raises(ConfigurationError, match="contain one another"):
        json_plugin(request={"rename": {"a": "a.b"}})
    bad = JsonOperations.model_construct(rename={}, remove=["a..b"], set={}, select=[])
    with pytest.raises(ConfigurationError, match="not a valid dotted path"):
        JsonBodyTransform(JsonBodyTransform.Options.model_construct(request=bad, response=JsonOperations()))
